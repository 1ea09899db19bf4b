"""What the runtime needs to know about each parameter of a lowered model: its optimizer role,
its logical axes (for sharding) and a display name, all from the layer kind that built it.

The lowering records in every sublayer (`bstc.lower.Sub`) the kinds that built its op and
norm, the op's arguments and its context; the walks here replace each module by what its
kind's tables say about its fields (`Op.optim`, `Op.logical_axes`). Nothing is recovered from
key-path strings, so renaming a field of a lowered module cannot silently drop a parameter's
role or axes: a parameter no kind names is an error.
"""
from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax

from bstc import ir
from bstc.lower import Block, LoweredModel, Sub
from bstc.ops import REGISTRY
from bstc.ops.base import named_roles
from bstc.passes.report import norm_kind, op_args

# fn(kind, args, context, module, stacked, name) -> what replaces the module
ModuleFn = Callable[[str, dict, Any, Any, bool, str], Any]


def _arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def is_names(x) -> bool:
    """A leaf of `param_axes`: a tuple of logical axis names (None: not sharded)."""
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _unstacked(module):
    """The per-layer view of a scanned (stacked) module: shapes without the leading axis."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if _arraylike(a) else a, module)


def block_names(m: ir.Model, model: LoweredModel) -> list[list[str]]:
    """Per stage, the display name of each of its blocks: `layer.3`, or `layer.0-11` for a
    scanned block standing for occurrences 0…11 (`{0,2,4}` when they are not contiguous)."""
    out = []
    for stage, pos in zip(model.stages, model.positions):
        blocks = stage.blocks(model.shared)
        count = getattr(stage, "count", 1)
        names = []
        for j, _ in enumerate(blocks):
            inst = m.layers[pos + j]
            idx = [m.layers[pos + j + u * len(blocks)].index for u in range(count)]
            if count == 1:
                names.append(inst.name)
            elif idx == list(range(idx[0], idx[0] + len(idx))):
                names.append(f"{inst.block}.{idx[0]}-{idx[-1]}")
            else:
                names.append(f"{inst.block}." + "{" + ",".join(map(str, idx)) + "}")
        out.append(names)
    return out


def map_modules(model: LoweredModel, fn: ModuleFn, names: list[list[str]] | None = None) -> Any:
    """`model` with its embedding, head, final norm and every sublayer's op and norm replaced by
    `fn(kind, args, context, module, stacked, display name)` (None modules stay None)."""

    def one(kind, args, ctx, module, stacked, name):
        return None if module is None or kind is None else fn(kind, args, ctx, module, stacked, name)

    def sub(x: Sub, stacked: bool, prefix: str) -> Any:
        nk = x.norm_kind
        return eqx.tree_at(lambda s: (s.norm, s.op), x,
                           (one(nk, op_args(nk) if nk else {}, None, x.norm, stacked, f"{prefix}.{x.name}.norm"),
                            one(x.kind, dict(x.args), x.context, x.op, stacked, f"{prefix}.{x.name}")),
                           is_leaf=lambda v: v is None)

    def blocks(tree, stacked: bool, prefixes: list[str]) -> Any:
        # a stage's (or a share group's) blocks, in the order of `stage.blocks`, each Sub replaced
        found = iter(prefixes)

        def block(b):
            if not isinstance(b, Block):
                return b
            prefix = next(found)
            return jax.tree.map(lambda s: sub(s, stacked, prefix) if isinstance(s, Sub) else s, b, is_leaf=lambda s: isinstance(s, Sub))

        return jax.tree.map(block, tree, is_leaf=lambda b: isinstance(b, Block))

    names = names or [["?"] * len(s.blocks(model.shared)) for s in model.stages]
    stages = tuple(blocks(stage, stage.stacked, n) for stage, n in zip(model.stages, names))
    shared = {g: blocks(b, False, [f"shared[{g}]"]) for g, b in model.shared.items()}
    nk = model.final_norm_kind
    return eqx.tree_at(
        lambda t: (t.embed, t.head, t.final_norm, t.stages, t.shared), model,
        (one("embedding", op_args("embedding"), None, model.embed, False, "embed"),
         one("head", op_args("head"), None, model.head, False, "head"),
         one(nk, op_args(nk) if nk else {}, None, model.final_norm, False, "norm"), stages, shared),
        is_leaf=lambda v: v is None)


def param_roles(model: LoweredModel) -> Any:
    """A pytree like `model` whose trainable leaves are their `OptimRole`s, from each layer
    kind's `optim` table (bstc.ops.base.ROLES); other leaves are None. Works on a model of
    arrays or of jax.ShapeDtypeStructs (eqx.filter_eval_shape), scanned or unrolled alike."""
    return map_modules(model, lambda kind, args, ctx, module, stacked, name:
                       named_roles(module, REGISTRY[kind].optim, kind))


def param_axes(m: ir.Model, model: LoweredModel) -> Any:
    """A pytree like eqx.filter(model, arraylike) whose leaves are tuples of logical axis names,
    from each kind's `logical_axes` (a scanned stack's leaves get a leading "layers").
    Raises TypeError for an array no layer kind names."""

    def axes(kind, args, ctx, module, stacked, name):
        view = _unstacked(module) if stacked else module
        names = REGISTRY[kind].logical_axes(args, m.dims, ctx, view)
        return jax.tree.map(lambda n: ("layers",) + n if stacked else n, names, is_leaf=is_names)

    out = map_modules(eqx.filter(model, _arraylike), axes)
    missed = [jax.tree_util.keystr(p) for p, a in
              jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda x: is_names(x) or _arraylike(x))[0]
              if _arraylike(a)]
    if missed:
        raise TypeError(f"parameters outside every layer kind have no logical axes: {', '.join(missed)}")
    return out


def param_names(m: ir.Model, model: LoweredModel) -> Any:
    """A pytree like eqx.filter(model, arraylike) whose leaves are display names, e.g.
    `layer.0-11.attn.w_q` (the block occurrence, the sublayer, the field)."""

    def names(kind, args, ctx, module, stacked, name):
        return jax.tree_util.tree_map_with_path(lambda p, a: name + jax.tree_util.keystr(p), module,
                                                is_leaf=_arraylike)

    return map_modules(eqx.filter(model, _arraylike), names, block_names(m, model))
