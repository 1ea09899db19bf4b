"""Logical axis names → mesh axes, for activations and per-shard computations.

Every parameter carries logical axis names (one per dimension, given by its layer kind:
`Op.logical_axes`, see bstc.params), and the main activations carry ("batch", "seq", "embed").
The rules of the model's `mesh` section (or the defaults, bstc.passes.mesh.DEFAULT_RULES) map
each logical name to mesh axes. Within one array a mesh axis is used once: by the first
dimension (in array order) whose rule names it, so the default `batch -> (data, fsdp)` and
`embed -> fsdp` shard the residual stream over batch only while parameters are sharded over
fsdp on their width.

This module is the leaf of the sharding code, imported by the ops and the lowering: `constrain`
pins an activation to the mesh and `local` runs a computation shard by shard, both only while a
sharded step is being traced (`activate`) and the identity otherwise. The plan (which
parameter goes where, memory per device, the report) is bstc.shard_plan; placing arrays,
the sharded train step, multi-host start-up and sharded checkpoints are bstc.placement.
docs/scaling.md is the user's guide.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ACTIVATION = ("batch", "seq", "embed")  # the residual stream between blocks: (B, L, D)
# The output of a context source (an SSM run over the whole sequence): (B, L, D) or (B, L, F, D).
SOURCE = {3: ("batch", "seq", "channels"), 4: ("batch", "seq", "filters", "channels")}

__all__ = ["ACTIVATION", "SOURCE", "spec_for", "shards", "activate", "constrain", "local"]


# ---- logical names → PartitionSpec -----------------------------------------------------------


def spec_for(names: Iterable[str | None], rules: Mapping[str, tuple[str, ...]],
             sizes: Mapping[str, int] | None = None) -> P:
    """PartitionSpec of an array whose dimensions carry `names`. A mesh axis is used at most
    once (by the first dimension that claims it); axes of size 1 are left out."""
    used: set[str] = set()
    out: list = []
    for n in names:
        axes = []
        for a in rules.get(n, ()) if n is not None else ():
            if a in used or (sizes is not None and sizes.get(a, 1) == 1):
                continue
            used.add(a)
            axes.append(a)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def shards(spec: P, sizes: Mapping[str, int]) -> list[int]:
    """Number of shards along each dimension of `spec`."""
    out = []
    for e in spec:
        if e is None:
            out.append(1)
        elif isinstance(e, str):
            out.append(sizes.get(e, 1))
        else:
            out.append(math.prod(sizes.get(a, 1) for a in e))
    return out


# ---- activations -------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bstc_shard_active", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """While tracing inside this context, `constrain` pins activations to the mesh. rules: a
    mapping logical name → mesh axes, or anything with a `rule_map` (a ShardPlan, a
    ResolvedMesh)."""
    rules = getattr(rules, "rule_map", rules)
    tok = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(tok)


def constrain(x, names: tuple):
    """with_sharding_constraint(x, rules(names)) when a mesh is active (see `activate`), else x.
    Safe anywhere in a model: outside a sharded trace it is the identity."""
    active = _ACTIVE.get()
    if active is None or not hasattr(x, "ndim") or x.ndim != len(names):
        return x
    mesh, rules = active
    spec = spec_for(names, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def local(fn: Callable, in_names: tuple, out_names: tuple) -> Callable:
    """`fn` run shard by shard (jax.shard_map) when a mesh is active, else `fn` itself.

    For computations that are independent along some logical axes but that XLA will not
    partition: its SPMD partitioner replicates an FFT even when only batch or channel dims are
    sharded (openxla/xla#24, jax-ml/jax#15680), which would gather the whole batch onto every
    device. in_names: one tuple of logical names (None: whole) per argument; out_names: the
    result's. Each logical name gets one set of mesh axes for all arguments (claimed in order of
    first appearance), so the local blocks agree; a dimension its axes do not divide stays whole."""
    @functools.wraps(fn)
    def wrapped(*args):
        active = _ACTIVE.get()
        if active is None:
            return fn(*args)
        mesh, rules = active
        sizes = dict(mesh.shape)
        claim: dict[str, tuple] = {}
        used: set[str] = set()
        dims: dict[str, set] = {}
        for names, a in zip(in_names, args):
            for n, size in zip(names, np.shape(a)):
                if n is not None:
                    dims.setdefault(n, set()).add(size)
        for names in list(in_names) + [out_names]:
            for n in names:
                if n is None or n in claim:
                    continue
                axes = tuple(x for x in rules.get(n, ()) if x not in used and sizes.get(x, 1) > 1)
                k = math.prod(sizes[x] for x in axes)
                if any(size % k for size in dims.get(n, ())):
                    axes = ()
                used.update(axes)
                claim[n] = axes

        def spec(names):
            return P(*[None if n is None or not claim.get(n) else
                       claim[n][0] if len(claim[n]) == 1 else claim[n] for n in names])

        if not any(claim.values()):
            return fn(*args)
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(n) for n in in_names),
                             out_specs=spec(out_names), check_vma=False)(*args)

    return wrapped
