"""Check the `mesh` and `rules` sections before any device is touched.

Two stages:

* `check_mesh` (part of `bstc.parse`): known logical axes, known mesh axes, positive sizes,
  one rule per logical axis, no mesh axis used twice in a rule. Without a `mesh` section the
  known mesh axes are the default ones (data, fsdp, tensor), whose sizes come at run time
  (`--mesh`, or every device on `data`).
* `resolve_mesh` (used by `bstc.shard_plan`, `bstc explain --mesh`, `bstc train --mesh`): the final
  mesh axes and sizes (file, then `--mesh`), the effective rules (defaults, then the file's),
  and the device-count check. Divisibility of every parameter dimension is checked by
  `bstc.shard_plan.plan`, which knows the parameters; its diagnostics point at the same rules.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from bstc import ir
from bstc.errors import Collector, Span, suggest, suggest_or_list
from bstc.passes.evaluate import Scope, evaluate
from bstc.syntax import ast

# channels: the per-channel (depthwise) axis of SSM / long-convolution layers and their outputs.
LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv", "ssm_state", "channels", "vocab", "layers", "filters",
                "experts")

# The default mesh axes, outermost first: `tensor` innermost so tensor-parallel collectives
# stay on the fastest links (neighbouring devices), `data` outermost (one all-reduce per step).
DEFAULT_MESH_AXES = ("data", "fsdp", "tensor")

# Data parallel over data and fsdp; parameters (and optimizer state) sharded over fsdp on their
# model-width dimension; tensor parallel over attention heads, MLP hidden units, SSM channels
# (the FFT convolution is per channel) and the vocabulary.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("channels", ("tensor",)),
    ("vocab", ("tensor",)),
)

MESH_OPTION = "<--mesh>"


def check_mesh(model: ast.ModelDef, scope: Scope, errors: Collector) -> ir.MeshSpec | None:
    if model.mesh is None and model.rules is None:
        return None
    axes: list[tuple[str, int]] = []
    axis_spans: list[tuple[str, Span | None]] = []
    seen: dict = {}
    for ax in model.mesh or ():
        if ax.name in seen:
            errors.error(ax.span, f"mesh axis '{ax.name}' is declared twice",
                         f"first declared at line {seen[ax.name].span.line}" if seen[ax.name].span else None)
            continue
        v = evaluate(ax.size, scope, errors)
        if v is None:
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            errors.error(ax.span, f"mesh axis '{ax.name}' must have a positive integer size, got {v!r}")
            continue
        seen[ax.name] = ax
        axes.append((ax.name, v))
        axis_spans.append((ax.name, ax.span))
    # Without a mesh section, rules may name the default axes; their sizes come at run time.
    known = list(seen) if model.mesh is not None else list(DEFAULT_MESH_AXES)
    rules: list[tuple[str, tuple[str, ...]]] = []
    rule_spans: list = []
    claimed: dict = {}
    for r in model.rules or ():
        if r.logical not in LOGICAL_AXES:
            errors.error(r.span, f"unknown logical axis '{r.logical}'", suggest_or_list(r.logical, LOGICAL_AXES, "logical axes"))
            continue
        if r.logical in claimed:
            first = claimed[r.logical].span
            errors.error(r.span, f"logical axis '{r.logical}' is claimed by two rules",
                         f"the first is at line {first.line if first else '?'}; keep one")
            continue
        claimed[r.logical] = r
        bad = False
        for t in r.mesh_axes:
            if t not in known:
                errors.error(r.target_span, f"rule '{r.logical}' names unknown mesh axis '{t}'",
                             suggest(t, known) or (f"mesh axes: {', '.join(known)}" if known else "declare it in `mesh { ... }`"))
                bad = True
        if len(set(r.mesh_axes)) != len(r.mesh_axes):
            errors.error(r.target_span, f"rule '{r.logical}' names a mesh axis twice")
            bad = True
        if not bad:
            rules.append((r.logical, tuple(r.mesh_axes)))
            rule_spans.append((r.logical, r.span, r.target_span))
    span = axis_spans[0][1] if axis_spans else (rule_spans[0][1] if rule_spans else None)
    return ir.MeshSpec(tuple(axes), tuple(rules), span=span, axis_spans=tuple(axis_spans),
                       rule_spans=tuple(rule_spans))


# ---- the final mesh: file + --mesh + defaults --------------------------------------------------


@dataclass(frozen=True)
class ResolvedMesh:
    """The mesh a run uses: every known axis with its size (1 where unused), and the rules."""

    axes: tuple[tuple[str, int], ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...]  # effective: defaults, then the file's
    origin: str  # 'file' | '--mesh' | 'default'
    span: Span | None = field(default=None, compare=False)  # where the sizes were written
    rule_spans: dict = field(default_factory=dict, compare=False)  # logical -> (span, target span) for file rules
    sources: dict = field(default_factory=dict, compare=False)  # file name -> text, for carets

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def size(self) -> int:
        return math.prod(n for _, n in self.axes)

    @property
    def rule_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.rules)

    def describe(self) -> str:
        used = [f"{a}={n}" for a, n in self.axes if n > 1] or ["1 device"]
        return " × ".join(used)

    def rule_span(self, logical: str) -> Span | None:
        """Where to point for a problem with `logical`'s rule: the file's rule, else the sizes."""
        s = self.rule_spans.get(logical)
        return s[0] if s else self.span


_OPT_ITEM = re.compile(r"\s*([^=,\s]*)\s*(=\s*([^,]*))?\s*")


def parse_mesh_option(text: str, errors: Collector) -> list[tuple[str, int, Span]]:
    """`data=2,tensor=4` → [(axis, size, span in '<--mesh>')]; problems go to `errors`."""
    out: list[tuple[str, int, Span]] = []
    pos = 0
    for part in text.split(","):
        m = _OPT_ITEM.fullmatch(part)
        name, val = (m.group(1), m.group(3)) if m else ("", None)
        col = pos + 1 + (len(part) - len(part.lstrip()))
        span = Span(MESH_OPTION, 1, col, 1, pos + 1 + len(part.rstrip()))
        pos += len(part) + 1
        if not name or not name.isidentifier() or val is None:
            errors.error(span, f"--mesh expects axis=size pairs separated by commas, got '{part.strip()}'",
                         "e.g. --mesh data=2,tensor=4")
            continue
        val = val.strip()
        if not val.isdigit() or int(val) < 1:
            errors.error(span, f"mesh axis '{name}' must have a positive integer size, got '{val}'")
            continue
        if any(n == name for n, _, _ in out):
            errors.error(span, f"mesh axis '{name}' is given twice")
            continue
        out.append((name, int(val), span))
    return out


def resolve_mesh(model: ir.Model, mesh: str | dict | None = None, n_devices: int | None = None) -> ResolvedMesh:
    """The final mesh for `model`: the file's `mesh`, replaced by `mesh` (the `--mesh` text or a
    {axis: size} dict) when given, else every device on `data`. Raises BstcError.

    n_devices: the devices present; a mesh that needs more is an error (None: don't check,
    e.g. `bstc explain` planning for a pod from a laptop)."""
    spec = model.mesh
    errors = Collector({model.file: model.source_text})
    declared = [a for a, _ in spec.axes] if spec is not None and spec.axes else []
    known = declared + [a for a in DEFAULT_MESH_AXES if a not in declared]
    sizes: dict[str, int] = {}
    span: Span | None = None
    if mesh is not None:
        if isinstance(mesh, str):
            errors.sources[MESH_OPTION] = mesh
            items = parse_mesh_option(mesh, errors)
        else:
            items = [(str(k), int(v), Span(MESH_OPTION, 1, 1)) for k, v in dict(mesh).items()]
            errors.sources[MESH_OPTION] = ",".join(f"{k}={v}" for k, v, _ in items)
        for name, size, sp in items:
            if name not in known:
                errors.error(sp, f"unknown mesh axis '{name}'", suggest_or_list(name, known, "mesh axes"))
                continue
            if size < 1:
                errors.error(sp, f"mesh axis '{name}' must have a positive integer size, got {size}")
                continue
            sizes[name] = size
        span = Span(MESH_OPTION, 1, 1, 1, len(errors.sources[MESH_OPTION]) + 1)
        origin = "--mesh"
        order = [n for n, _, _ in items if n in sizes] + [a for a in known if a not in sizes]
    elif spec is not None and spec.axes:
        sizes = dict(spec.axes)
        span = _section_span(spec)
        origin = "file"
        order = known
    else:
        sizes = {"data": n_devices or 1}
        origin = "default"
        order = known
    axes = tuple((a, sizes.get(a, 1)) for a in order)
    total = math.prod(n for _, n in axes)
    if n_devices is not None and total > n_devices and not errors:
        shown = " × ".join(f"{a}={n}" for a, n in axes if n > 1)
        errors.error(span, f"the mesh needs {total} devices ({shown}) but only {n_devices} "
                     f"{'is' if n_devices == 1 else 'are'} present",
                     "shrink the mesh with --mesh, e.g. --mesh data=" + str(n_devices) +
                     ("" if n_devices > 1 else "; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                      "fakes N devices"))
    errors.raise_if_any()
    present = {a for a, _ in axes}
    rules = {k: tuple(t for t in v if t in present) for k, v in DEFAULT_RULES}
    rule_spans = {}
    if spec is not None:
        for k, v in spec.rules:
            rules[k] = tuple(v)
        rule_spans = {k: (s, t) for k, s, t in spec.rule_spans}
    return ResolvedMesh(axes, tuple(rules.items()), origin, span, rule_spans, dict(errors.sources))


def _section_span(spec: ir.MeshSpec) -> Span | None:
    """From the first to the last axis of the mesh section when they are on one line."""
    spans = [s for _, s in spec.axis_spans if s is not None]
    if not spans:
        return spec.span
    first, last = spans[0], spans[-1]
    if first.line == last.line and first.file == last.file and last.end_col:
        return Span(first.file, first.line, first.col, first.line, last.end_col)
    return first
