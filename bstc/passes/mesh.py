"""Check the `mesh` and `rules` sections before any device is touched: known logical axes,
known mesh axes, positive sizes, one rule per logical axis, no mesh axis used twice in a rule."""
from __future__ import annotations

from bstc import ir
from bstc.errors import Collector, suggest, suggest_or_list
from bstc.passes.evaluate import Scope, evaluate
from bstc.syntax import ast

LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv", "ssm_state", "vocab", "layers", "filters")


def check_mesh(model: ast.ModelDef, scope: Scope, errors: Collector) -> ir.MeshSpec | None:
    if model.mesh is None and model.rules is None:
        return None
    axes: list[tuple[str, int]] = []
    seen: dict = {}
    for ax in model.mesh or ():
        if ax.name in seen:
            errors.error(ax.span, f"mesh axis '{ax.name}' is declared twice")
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
    rules: list[tuple[str, tuple[str, ...]]] = []
    claimed: dict = {}
    for r in model.rules or ():
        if r.logical not in LOGICAL_AXES:
            errors.error(r.span, f"unknown logical axis '{r.logical}'", suggest_or_list(r.logical, LOGICAL_AXES, "logical axes"))
            continue
        if r.logical in claimed:
            errors.error(r.span, f"logical axis '{r.logical}' is claimed by two rules",
                         f"the first is at line {claimed[r.logical].span.line if claimed[r.logical].span else '?'}; keep one")
            continue
        claimed[r.logical] = r
        bad = False
        for t in r.mesh_axes:
            if t not in seen:
                errors.error(r.target_span, f"rule '{r.logical}' names unknown mesh axis '{t}'",
                             suggest(t, seen) or (f"mesh axes: {', '.join(seen)}" if seen else "declare it in `mesh { ... }`"))
                bad = True
        if len(set(r.mesh_axes)) != len(r.mesh_axes):
            errors.error(r.target_span, f"rule '{r.logical}' names a mesh axis twice")
            bad = True
        if not bad:
            rules.append((r.logical, tuple(r.mesh_axes)))
    return ir.MeshSpec(tuple(axes), tuple(rules))
