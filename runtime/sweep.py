"""`bstc train --sweep`: one run per point of a grid of model-parameter values (the grid,
its names and values: bstc.sweep), one run directory each, and a summary table."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bstc.sweep import check_names, dir_name, first_error, format_table, grid, label
from bstc.sweep import parse_sweep_items, sweep_from_config  # noqa: F401 - the run config's `sweep:` reader


# ---- bstc train --sweep -------------------------------------------------------------------------
@dataclass
class TrainRow:
    point: dict[str, str]
    run_dir: str
    status: str = "ok"                 # ok | failed
    error: str | None = None
    params: int | None = None
    steps: int | None = None
    train_loss: float | None = None     # the last step's
    val_loss: float | None = None
    val_bpb: float | None = None
    seconds: float | None = None


def train_grid(points: list[dict], out_root: Path, run_point: Callable[[dict, Path], Any],
               echo: Callable[[str], None] = print) -> list[TrainRow]:
    """Run `run_point(point, run_dir)` for each point (it returns (RunResult, ModelSpec)), one
    run directory each under `out_root`; a point that raises a model-file or run error is a
    failed row and the grid goes on (an interrupt stops it, after writing what ran). Writes
    `out_root/sweep.json` after every point."""
    from bstc.errors import BstcError
    from bstc.runtime.errors import Interrupted, RunError, UsageError

    rows: list[TrainRow] = []
    for i, point in enumerate(points, 1):
        run_dir = Path(out_root) / dir_name(point)
        echo(f"sweep {i}/{len(points)}: {label(point)} → {run_dir}")
        row = TrainRow(point, str(run_dir))
        t0 = time.perf_counter()
        try:
            res, spec = run_point(point, run_dir)
        except Interrupted:
            rows.append(TrainRow(point, str(run_dir), "failed", "interrupted"))
            _write(out_root, rows)
            raise
        except (BstcError, RunError, UsageError, FloatingPointError, ValueError) as e:
            row.status, row.error = "failed", first_error(e)
            echo(f"sweep {i}/{len(points)}: {label(point)} failed: {row.error}")
        else:
            row.steps = res.step
            if res.losses:
                row.train_loss = float(res.losses[max(res.losses)])
            if res.val:
                row.val_loss, row.val_bpb = float(res.val["loss"]), float(res.val.get("bpb", float("nan")))
            row.params = model_params(spec.model_ir)
        row.seconds = round(time.perf_counter() - t0, 2)
        rows.append(row)
        _write(out_root, rows)
    return rows


def model_params(model_ir) -> int | None:
    if model_ir is None:
        return None
    import bstc

    return int(bstc.explain(model_ir, batch=1).params)


def _write(out_root: Path, rows: list) -> None:
    Path(out_root).mkdir(parents=True, exist_ok=True)
    (Path(out_root) / "sweep.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def train_table(rows: list[TrainRow]) -> str:
    names = list(rows[0].point) if rows else []
    head = names + ["status", "params", "steps", "train loss", "val loss", "bits/byte", "time", "run directory"]
    body = []
    for r in rows:
        body.append([r.point[n] for n in names] + [
            r.status, _h(r.params), _f(r.steps, "d"), _f(r.train_loss, ".4f"),
            _f(r.val_loss, ".4f"), _f(r.val_bpb, ".3f"), _f(r.seconds, ".1f") + ("s" if r.seconds is not None else ""),
            r.run_dir])
    out = format_table(head, body)
    failed = [r for r in rows if r.status != "ok"]
    for r in failed:
        out += f"\n{label(r.point)}: {r.error}"
    return out


def _h(n) -> str:
    if n is None:
        return "-"
    from bstc.passes.report import human

    return human(n)


def train_sweep(cfg, sweep: dict, output: Path | None, *, progress: bool = True,
                echo: Callable[[str], None] = print) -> list[TrainRow]:
    """`bstc train --sweep`: one run per grid point under `output` (default runs/MODEL-sweep-TIME),
    each a plain run directory (its config.yaml holds the point's --set values, so `bstc eval`
    and `--resume` work on it); the summary table is printed at the end and kept in sweep.json."""
    import datetime as _dt

    import jax

    from bstc.frontend import load_ast
    from bstc.passes.resolve import SETTINGS
    from bstc.runtime.errors import UsageError
    from bstc.runtime.model import effective_overrides, resolve_model, spec_from_file
    from bstc.runtime.trainer import train as run

    model_path = resolve_model(cfg.model)
    tree, _, _, errors = load_ast(str(model_path))
    errors.raise_if_any()  # a file that does not parse fails every point: say so once
    try:
        check_names(sweep, cfg.set, {a.name for a in tree.assigns}, SETTINGS)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out_root = Path(output) if output is not None else (
        Path("runs") / f"{model_path.stem}-sweep-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    tok = None
    if cfg.tokenizer and not cfg.task:
        from bstc.runtime.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    lead = jax.process_index() == 0

    def run_point(point: dict, run_dir: Path):
        pcfg = cfg.replace(set={**cfg.set, **point}, sweep={})
        overrides = effective_overrides(model_path, pcfg)
        if tok is not None:
            from bstc.runtime.tokenizer import tokenizer_vocab

            overrides = tokenizer_vocab(overrides, pcfg.set, tok)
        spec = spec_from_file(model_path, overrides)
        return run(pcfg, run_dir, spec, resume=False, progress=progress and lead, plot=lead), spec

    points = grid(sweep)
    rows = train_grid(points, out_root, run_point, echo)
    echo(f"\nsweep of {len(points)} runs over {', '.join(sweep)} ({out_root}/sweep.json):")
    echo(train_table(rows))
    return rows


