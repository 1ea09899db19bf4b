"""Sweeps: a grid of model-parameter values, one run (`bstc train --sweep`) or one report row
(`bstc explain --sweep`) per point.

`--sweep d_model=64,128 --sweep window=16,32` is the grid of every combination (four points,
the last name varying fastest). Values are model-language expressions, as `--set` values
(`bstc.frontend.parse_set_items`): each point is a set of `--set` overrides, checked by the
model checker. A point that fails (a model-file error, a diverging run) is reported in the
summary table and the grid goes on. The training side is bstc.runtime.sweep."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any


def parse_sweep_items(items) -> dict[str, list[str]]:
    """`--sweep NAME=V1,V2,...` items → {NAME: ["V1", "V2", ...]} (values stay text). Raises
    ValueError for an item that is not NAME=VALUES, a name given twice or a value listed twice."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, values = str(item).partition("=")
        name = name.strip()
        vals = [v.strip() for v in values.split(",")]
        if not sep or not name.isidentifier() or not all(vals):
            raise ValueError(f"--sweep expects NAME=VALUE,VALUE,..., got '{item}'")
        if name in out:
            raise ValueError(f"--sweep {name} is given twice: list all its values in one --sweep {name}=A,B")
        dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
        if dup is not None:
            raise ValueError(f"--sweep {name}: the value {dup} is listed twice")
        out[name] = vals
    return out


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def sweep_from_config(d: Any, where: str = "sweep") -> dict[str, list[str]]:
    """A run config's `sweep:` section, {NAME: [values]} (a value list, or one "A,B" string),
    in the form `parse_sweep_items` gives."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must map parameter names to lists of values, e.g. {{d_model: [64, 128]}}")
    items = []
    for k, v in d.items():
        vals = v if isinstance(v, list) else [x for x in str(v).split(",")] if isinstance(v, str) else [v]
        if not vals or any(x is None or isinstance(x, (list, dict)) for x in vals):
            raise ValueError(f"{where}: {k} must be a list of values, got {v!r}")
        items.append(f"{k}=" + ",".join(_text(x) for x in vals))
    return parse_sweep_items(items)


def grid(sweep: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the values, in the order given (the last name varies fastest)."""
    names = list(sweep)
    return [dict(zip(names, combo)) for combo in itertools.product(*(sweep[n] for n in names))]


def label(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def dir_name(point: dict[str, str]) -> str:
    """A point's run directory name: `d_model=64,window=16` (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label(point).replace(" ", ""))


def check_names(sweep: dict, sets: dict, declared: set[str], settings) -> None:
    """Before any point runs: every swept name is a parameter of the model, and not also `--set`."""
    from bstc.errors import suggest

    for name in sweep:
        if name in sets:
            raise ValueError(f"--sweep {name} and --set {name} are both given: keep one")
        if name not in declared and name not in settings:
            hint = suggest(name, declared | set(settings))
            raise ValueError(f"--sweep {name}: the model has no parameter '{name}'" + (f" ({hint})" if hint else ""))


def first_error(e: BaseException) -> str:
    """One line for a failed point: a model-file error's first diagnostic, or the message."""
    from bstc.errors import BstcError

    errs = [d for d in getattr(e, "diagnostics", None) or [] if d.severity == "error"]
    if isinstance(e, BstcError) and errs:
        d = errs[0]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        # a point's own values are `--set` lines: the message names them, the place would not help
        return f"{d.span}: {d.message}{more}" if d.span and d.span.file != "<--set>" else d.message + more
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ---- bstc explain --sweep -----------------------------------------------------------------------
@dataclass
class ExplainRow:
    point: dict[str, str]
    status: str = "ok"
    error: str | None = None
    params: int | None = None
    flops_per_token: float | None = None
    layers: int | None = None
    extra: dict = field(default_factory=dict)


def explain_grid(source, points: list[dict], sets: dict, batch: int = 8) -> list[ExplainRow]:
    """The parameter count and FLOPs per token of each point (a failed point: its first error)."""
    import bstc
    from bstc.errors import BstcError

    rows = []
    for point in points:
        row = ExplainRow(point)
        try:
            m = bstc.parse(source, overrides={**sets, **point})
            rep = bstc.explain(m, batch=batch)
            row.params, row.flops_per_token, row.layers = int(rep.params), float(rep.flops_per_token), len(m.layers)
        except BstcError as e:
            row.status, row.error = "failed", first_error(e)
        rows.append(row)
    return rows


def explain_table(rows: list[ExplainRow]) -> str:
    from bstc.passes.report import human

    names = list(rows[0].point) if rows else []
    head = names + ["blocks", "params", "GFLOP/tok", "status"]
    body = [[r.point[n] for n in names] + ([str(r.layers), human(r.params), f"{r.flops_per_token / 1e9:.4f}", "ok"]
                                          if r.status == "ok" else ["-", "-", "-", f"failed: {r.error}"])
            for r in rows]
    return format_table(head, body)


def format_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])
