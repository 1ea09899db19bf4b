"""Logical axis names → mesh axes: partition specs, the lint, NamedShardings, sharded steps.

Every parameter carries logical axis names (one per dimension) given by its op
(`Op.logical_axes`; a scanned stack of layers gets a leading "layers" axis), and the main
activations carry ("batch", "seq", "embed"). The rules of the model's `mesh` section (or the
defaults, see bstc.passes.mesh.DEFAULT_RULES) map each logical name to mesh axes. Within one
array a mesh axis is used once: by the first dimension (in array order) whose rule names it,
so the default `batch -> (data, fsdp)` and `embed -> fsdp` shard the residual stream over
batch only while parameters are sharded over fsdp on their width.

Everything up to `ShardPlan` is computed from shapes alone (`jax.eval_shape`), so
`bstc explain --mesh tensor=64` works on a laptop; problems are BstcErrors located at the rule
(or the `--mesh` option) that causes them. The rest places arrays with `NamedSharding` and jits
the train step with in/out shardings so that XLA inserts the collectives (`local` runs what
XLA will not partition, the FFT convolution, under shard_map); multi-host runs use
`jax.distributed` (see `initialize_distributed`). docs/scaling.md is the user's guide.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bstc.errors import BstcError, Collector, Diagnostic

# Light imports only: the ops import this module (for `local`), and the IR and the mesh pass
# import the ops. The mesh pass's names are re-exported lazily (see __getattr__ below).
_FROM_MESH_PASS = ("DEFAULT_MESH_AXES", "DEFAULT_RULES", "LOGICAL_AXES", "ResolvedMesh", "resolve_mesh")


def __getattr__(name):
    if name in _FROM_MESH_PASS:
        from bstc.passes import mesh as _mesh

        return getattr(_mesh, name)
    raise AttributeError(f"module 'bstc.shard' has no attribute {name!r}")


ACTIVATION = ("batch", "seq", "embed")  # the residual stream between blocks: (B, L, D)
# The output of a context source (an SSM run over the whole sequence): (B, L, D) or (B, L, F, D).
SOURCE = {3: ("batch", "seq", "channels"), 4: ("batch", "seq", "filters", "channels")}

__all__ = [
    "ACTIVATION", "SOURCE", "DEFAULT_MESH_AXES", "DEFAULT_RULES", "LOGICAL_AXES", "ResolvedMesh",
    "ShardPlan", "ParamRow", "Sharded", "resolve_mesh", "plan", "plan_dict", "print_plan", "spec_for",
    "logical_axes", "make_mesh", "param_shardings", "tree_shardings", "shard_tree", "batch_sharding",
    "global_batch", "local_rows", "constrain", "activate", "local", "sharded_step", "for_run",
    "initialize_distributed", "save_checkpoint", "restore_checkpoint", "abstract_like",
]


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


def _shards(spec: P, sizes: Mapping[str, int]) -> list[int]:
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


# ---- the model's logical axes ----------------------------------------------------------------


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _unstacked(module):
    """The per-layer view of a scanned (stacked) module: shapes without the leading axis."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if _arraylike(a) else a, module)


def _component_axes(op, args, dims, ctx, module, stacked: bool) -> dict[str, tuple]:
    """keystr (inside `module`) → logical names, from the op's `axes` table (with 'layers'
    prepended if stacked). Every layer kind declares its axes; a parameter missing from the
    table is an error (bstc.ops.base.named_axes), never a silent replication."""
    view = _unstacked(module) if stacked else module
    axes = op.logical_axes(args, dims, ctx, view)
    given = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_names)[0]}
    out: dict[str, tuple] = {}
    for p, a in jax.tree_util.tree_flatten_with_path(view, is_leaf=_arraylike)[0]:
        if _arraylike(a):
            k = jax.tree_util.keystr(p)
            out[k] = (("layers",) if stacked else ()) + tuple(given[k])
    return out


@dataclass
class _Named:
    """What the walk records for one array: its display name and logical axes."""

    name: str
    logical: tuple


def _walk(m: ir.Model, model) -> dict[str, _Named]:
    """keystr in the LoweredModel → (display name, logical names) for every array leaf."""
    from bstc.lower import Scanned, SharedRef, Single
    from bstc.ops import REGISTRY
    from bstc.passes.report import norm_kind, op_args

    d = m.dims
    table: dict[str, _Named] = {}

    def add(prefix: str, display: str, kind: str, args, ctx, module, stacked=False):
        if module is None:
            return
        for k, names in _component_axes(REGISTRY[kind], args, d, ctx, module, stacked).items():
            table[prefix + k] = _Named(display + k, names)

    def add_block(prefix: str, display: str, inst: ir.BlockInstance, block, stacked: bool):
        for k, (s, sub) in enumerate(zip(inst.sublayers, block.subs)):
            ctx = s.context.spec if s.context else None
            add(f"{prefix}.subs[{k}].op", f"{display}.{s.name}", s.kind, s.kwargs, ctx, sub.op, stacked)
            nk = norm_kind(s.norm)
            if nk and sub.norm is not None:
                add(f"{prefix}.subs[{k}].norm", f"{display}.{s.name}.norm", nk, op_args(nk), None, sub.norm, stacked)

    add(".embed", "embed", "embedding", op_args("embedding"), None, model.embed)
    for i, (stage, pos) in enumerate(zip(model.stages, model.positions)):
        if isinstance(stage, Scanned):
            step = len(stage.unit)
            for j, blk in enumerate(stage.unit):
                inst = m.layers[pos + j]
                idx = [m.layers[pos + j + u * step].index for u in range(stage.count)]
                contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
                display = f"{inst.block}." + (f"{idx[0]}-{idx[-1]}" if contiguous else "{" + ",".join(map(str, idx)) + "}")
                add_block(f".stages[{i}].unit[{j}]", display, inst, blk, True)
        elif isinstance(stage, Single):
            add_block(f".stages[{i}].block", m.layers[pos].name, m.layers[pos], stage.block, False)
        elif isinstance(stage, SharedRef):
            pass  # its weights live in `shared`
    for group, blk in model.shared.items():
        inst = next(x for x in m.layers if x.share == group)
        add_block(f".shared[{group!r}]", f"shared[{group}]", inst, blk, False)
    if model.final_norm is not None and m.final_norm:
        nk = norm_kind(m.final_norm)
        add(".final_norm", "norm", nk, op_args(nk), None, model.final_norm)
    add(".head", "head", "head", op_args("head", {"tied": m.head_tied}), None, model.head)
    return table


def logical_axes(m: ir.Model, model) -> Any:
    """A pytree like eqx.filter(model, eqx.is_array) (arrays or ShapeDtypeStructs) whose leaves
    are tuples of logical axis names."""
    table = _walk(m, model)
    arrays = eqx.filter(model, _arraylike)

    def names(path, a):
        k = jax.tree_util.keystr(path)
        return table[k].logical if k in table else (None,) * len(a.shape)

    return jax.tree_util.tree_map_with_path(names, arrays, is_leaf=_arraylike)


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class ParamRow:
    name: str
    shape: tuple
    dtype: str
    logical: tuple
    spec: P
    bytes: int
    bytes_per_device: float


@dataclass
class ShardPlan:
    """Everything about how a model is laid out on a mesh, computed from shapes only."""

    model: ir.Model
    mesh: ResolvedMesh
    abstract: Any            # the LoweredModel with ShapeDtypeStruct leaves
    logical: Any             # pytree of logical-name tuples (prefix: arrays of `abstract`)
    specs: Any               # pytree of PartitionSpecs (same structure)
    rows: list[ParamRow]
    batch: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return self.mesh.rule_map

    @property
    def sizes(self) -> dict[str, int]:
        return self.mesh.shape

    def spec(self, names: Iterable[str | None]) -> P:
        return spec_for(names, self.rules, self.sizes)

    @property
    def param_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def param_bytes_per_device(self) -> float:
        return sum(r.bytes_per_device for r in self.rows)

    def memory(self, batch: int | None = None, optimizer_moments: int = 2) -> dict[str, float]:
        """Per-device bytes: parameters, gradients, optimizer moments (f32, sharded like the
        parameters), and activations kept for backward at `batch` (sharded over the batch and
        seq axes), from bstc explain's estimate."""
        batch = batch or self.batch or 8
        f32_pd = sum(r.bytes_per_device * 4 / max(np.dtype(r.dtype).itemsize, 1) for r in self.rows)
        out = dict(params=self.param_bytes_per_device, grads=self.param_bytes_per_device,
                   optimizer=optimizer_moments * f32_pd, activations=self.activation_bytes(batch))
        out["total"] = sum(out.values())
        return out


    def activation_bytes(self, batch: int) -> float:
        """Per-device activations kept for backward (bstc explain's per-op estimate): tokens split
        over the batch and seq axes; inside a sublayer, what goes beyond its residual-stream input
        split over its tensor-parallel axis (heads, mlp, channels), the logits over vocab."""
        from bstc.ops import REGISTRY
        from bstc.passes.report import op_args

        d = self.model.dims
        item = 2 if d.dtype == "bfloat16" else 4
        split = lambda name: math.prod(_shards(self.spec((name,)), self.sizes)) or 1  # noqa: E731
        by_role = {"attn": "heads", "mlp": "mlp", "ssm": "channels"}
        emb = REGISTRY["embedding"]
        per_token = emb.activation_bytes_per_token(op_args("embedding"), d, None)
        for inst in self.model.layers:
            for s in inst.sublayers:
                op = REGISTRY[s.kind]
                a = op.activation_bytes_per_token(s.kwargs, d, s.context.spec if s.context else None)
                resid = d.d_model * item
                k = split(by_role[op.role]) if op.role in by_role else 1
                per_token += min(a, resid) + max(a - resid, 0.0) / k
        per_token += d.vocab * 4 / split("vocab")  # f32 logits
        tokens = batch * d.seq_len / (math.prod(_shards(self.spec(("batch", "seq")), self.sizes)) or 1)
        return per_token * tokens


def _display_dtype(a) -> str:
    return str(np.dtype(a.dtype))


def plan(m: ir.Model, mesh: str | Mapping[str, int] | None = None, *, n_devices: int | None = None,
         batch: int | None = None, abstract=None, scan: bool = True) -> ShardPlan:
    """Resolve the mesh and rules for `m`, give every parameter its PartitionSpec, and check
    that each mesh axis divides every dimension it shards (and the batch, and the heads).
    Raises BstcError with the rule's (or --mesh's) location. Touches no device."""
    from bstc import ir
    from bstc.lower import lower
    from bstc.passes.mesh import LOGICAL_AXES, resolve_mesh

    rm = resolve_mesh(m, mesh, n_devices)
    if abstract is None:
        abstract = jax.eval_shape(lambda: lower(m, key=jax.random.key(0), scan=scan))
    table = _walk(m, abstract)
    logical = logical_axes(m, abstract)
    rules, sizes = rm.rule_map, rm.shape
    specs = jax.tree.map(lambda names: spec_for(names, rules, sizes), logical, is_leaf=_is_names)

    errors = Collector(dict(rm.sources))
    bad: dict[str, list] = {}  # logical -> [(display, shape, dim size, shards)]

    def note(logical_name, what, shape, n, k):
        bad.setdefault(logical_name, []).append((what, shape, n, k))

    rows: list[ParamRow] = []
    flat_a = jax.tree_util.tree_flatten_with_path(eqx.filter(abstract, _arraylike), is_leaf=_arraylike)[0]
    flat_l = jax.tree.leaves(logical, is_leaf=_is_names)
    flat_s = jax.tree.leaves(specs)
    for (path, a), names, spec in zip(flat_a, flat_l, flat_s):
        k = jax.tree_util.keystr(path)
        display = table[k].name if k in table else k.lstrip(".")
        shards = _shards(spec, sizes) + [1] * (len(a.shape) - len(spec))
        for dim, (n, s, nm) in enumerate(zip(a.shape, shards, names)):
            if s > 1 and n % s:
                note(nm, display, tuple(a.shape), n, s)
        nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        rows.append(ParamRow(display, tuple(a.shape), _display_dtype(a), tuple(names), spec, nbytes,
                             nbytes / math.prod(shards)))
    # Semantic sizes: a head must not be split, and the batch must split evenly.
    d = m.dims
    for lname, n in (("heads", d.heads), ("batch", batch)):
        if n is None:
            continue
        k = math.prod(_shards(spec_for((lname,), rules, sizes), sizes))
        if k > 1 and n % k:
            what = "the model's heads" if lname == "heads" else "the batch"
            bad.setdefault(lname, []).insert(0, (what, None, n, k))
    order = list(rules) + [k for k in LOGICAL_AXES if k not in rules]
    for lname, items in sorted(bad.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        what, shape, n, k = items[0]
        axes = [a for a in rules.get(lname, ()) if sizes.get(a, 1) > 1]
        over = " × ".join(f"{a}={sizes[a]}" for a in axes)
        where = f"{what} {ir.fmt_shape(shape)}" if shape is not None else what
        default = "" if lname in rm.rule_spans else "the default "
        msg = (f"{default}rule '{lname} -> {_target(rules.get(lname, ()))}' splits '{lname}' of size {n} ({where}) "
               f"into {k} shards ({over}), which does not divide it")
        others = len({it[0] for it in items[1:]} - {what})
        g = math.gcd(*[it[2] for it in items])
        if lname == "batch":
            hint = f"use a batch divisible by {k}, or mesh sizes whose product divides {g}"
        else:
            hint = f"choose mesh sizes that divide {g}, or replicate it with `{lname} -> ()`"
        if others:
            hint += f"; {others} more parameter{'s' if others != 1 else ''} affected"
        errors.error(rm.rule_span(lname), msg, hint)
    errors.raise_if_any()
    return ShardPlan(m, rm, abstract, logical, specs, rows, batch)


def _target(t: tuple[str, ...]) -> str:
    return t[0] if len(t) == 1 else "(" + ", ".join(t) + ")"


# ---- devices ------------------------------------------------------------------------------------


def make_mesh(rm: ResolvedMesh | ShardPlan, devices=None) -> Mesh:
    """A jax Mesh for the resolved axes over the first `size` devices (all processes' devices)."""
    if isinstance(rm, ShardPlan):
        rm = rm.mesh
    devs = list(devices if devices is not None else jax.devices())
    n = rm.size
    if n > len(devs):
        raise BstcError([Diagnostic(rm.span, f"the mesh needs {n} devices but only {len(devs)} are present")],
                        rm.sources)
    shape = tuple(s for _, s in rm.axes)
    names = tuple(a for a, _ in rm.axes)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devs[:n], allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - odd topologies: fall back to process-major order
        arr = np.array(devs[:n], dtype=object).reshape(shape)
    return Mesh(arr, names)


def param_shardings(p: ShardPlan, mesh: Mesh) -> Any:
    """NamedShardings for the model's arrays (a pytree with the structure of eqx.filter(model, is_array))."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), p.specs)


def tree_shardings(tree, p: ShardPlan, mesh: Mesh) -> Any:
    """NamedShardings for any pytree that holds the model's arrays somewhere inside (a train
    state, optimizer moments, gradients): a leaf whose key path ends with a parameter's path and
    has its shape is sharded like it; everything else (step counters, keys, factored moments)
    is replicated."""
    by_path: dict[str, tuple] = {}
    flat_a = jax.tree_util.tree_flatten_with_path(eqx.filter(p.abstract, _arraylike), is_leaf=_arraylike)[0]
    for (path, a), spec in zip(flat_a, jax.tree.leaves(p.specs)):
        by_path[jax.tree_util.keystr(path)] = (tuple(a.shape), spec)
    repl = NamedSharding(mesh, P())

    def one(path, x):
        if not _arraylike(x):
            return None
        keys = [jax.tree_util.keystr((k,)) for k in path]
        for i in range(len(keys)):
            hit = by_path.get("".join(keys[i:]))
            if hit is not None and hit[0] == tuple(x.shape):
                return NamedSharding(mesh, hit[1])
        return repl

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_arraylike)


def _put(x, s):
    """Place one array with sharding `s`. In a multi-process run every process holds the same
    host value (same seed) and contributes the shards its own devices hold."""
    if s is None:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, s)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda y: y, out_shardings=s)(x)  # already global: reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])


def shard_tree(tree, shardings):
    """Place every array leaf of `tree` with its sharding (None leaves of `shardings` skip)."""
    is_sh = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
    arrays, static = eqx.partition(tree, eqx.is_array)
    sh = eqx.filter(shardings, is_sh, is_leaf=is_sh)
    placed = jax.tree.map(lambda x, s: _put(x, s) if x is not None else x, arrays, sh,
                          is_leaf=lambda x: x is None)
    return eqx.combine(placed, static)


def batch_sharding(p: ShardPlan | ResolvedMesh, mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Batches (…, B, L, …): the batch dimension over the batch rule's mesh axes, the sequence
    dimension (the one after it) over the seq rule's."""
    rm = p.mesh if isinstance(p, ShardPlan) else p
    names = [None] * ndim
    names[batch_dim] = "batch"
    if batch_dim + 1 < ndim:
        names[batch_dim + 1] = "seq"
    return NamedSharding(mesh, spec_for(names, rm.rule_map, rm.shape))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_rows: int | None = None,
                 batch_dim: int = 0) -> dict:
    """Assemble the global batch from each process's own rows (its `local_rows`) with
    jax.make_array_from_process_local_data. global_rows: the global batch size (default: the
    local rows × the number of processes). With one process this is a device_put."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = list(v.shape)
        shape[batch_dim] = global_rows if global_rows is not None else shape[batch_dim] * jax.process_count()
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
    return out


def local_rows(sharding: NamedSharding, global_shape: tuple, batch_dim: int = 0) -> tuple[int, int]:
    """[start, stop) of the rows (along batch_dim) of a global batch that this process's devices
    hold: the rows this process reads (its own shard of the data)."""
    idx = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
    starts = [i[batch_dim].start or 0 for i in idx]
    stops = [global_shape[batch_dim] if i[batch_dim].stop is None else i[batch_dim].stop for i in idx]
    return min(starts), max(stops)


# ---- activations -------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bstc_shard_active", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] | ShardPlan | ResolvedMesh):
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    if isinstance(rules, ShardPlan):
        rules = rules.rules
    elif hasattr(rules, "rule_map"):  # a ResolvedMesh
        rules = rules.rule_map
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
    import functools

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


# ---- the sharded step ----------------------------------------------------------------------------


def sharded_step(step: Callable, mesh: Mesh, rules, state_shardings, batch_shardings,
                 out_extra=None, donate: bool = True) -> Callable:
    """jit `step(state, batch) -> (state, stats)` with in/out shardings: the state stays where it
    is (params and optimizer moments sharded by the rules), the batch arrives sharded over the
    batch axes, stats come back replicated. XLA inserts the all-reduces / all-gathers.
    `step` may itself be jitted (eqx.filter_jit): it is inlined. Non-array state leaves are static."""
    repl = NamedSharding(mesh, P())
    static_box: dict = {}

    def inner(state_arrays, batch):
        state = eqx.combine(state_arrays, static_box["static"])
        with activate(mesh, rules):
            new_state, stats = step(state, batch)
        new_arrays, new_static = eqx.partition(new_state, eqx.is_array)
        static_box["out_static"] = new_static
        return new_arrays, stats

    state_sh_arrays = eqx.filter(state_shardings, lambda s: isinstance(s, jax.sharding.Sharding),
                                 is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    jitted = jax.jit(inner, in_shardings=(state_sh_arrays, batch_shardings),
                     out_shardings=(state_sh_arrays, out_extra if out_extra is not None else repl),
                     donate_argnums=(0,) if donate else ())

    def run(state, batch):
        arrays, static = eqx.partition(state, eqx.is_array)
        static_box["static"] = static
        new_arrays, stats = jitted(arrays, batch)
        return eqx.combine(new_arrays, static_box.get("out_static", static)), stats

    run.jitted = jitted  # type: ignore[attr-defined]
    return run


# ---- multi-host --------------------------------------------------------------------------------


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str | None = None,
                           timeout_s: int | None = None) -> bool:
    """jax.distributed.initialize from flags, or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID; coordinator="auto" lets JAX detect the cluster (Cloud TPU, SLURM, Open MPI,
    Kubernetes). Without any of these: nothing (a one-process run). Returns True when this is a
    multi-process run.

    On CPU, cross-process collectives need gloo (set before initialize)."""
    env = os.environ
    if coordinator == "auto":  # Cloud TPU, SLURM, Open MPI, Kubernetes: JAX finds everything
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
        jax.distributed.initialize()
        return jax.process_count() > 1
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return False
    # Cross-process collectives between CPU devices need gloo; it changes nothing for GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
    kw: dict[str, Any] = {}
    if timeout_s is not None:
        kw["initialization_timeout"] = timeout_s
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kw)
    return jax.process_count() > 1


# ---- reporting (bstc explain --mesh) -------------------------------------------------------------


def _fmt_spec(spec: P) -> str:
    parts = []
    for e in spec:
        parts.append("·" if e is None else e if isinstance(e, str) else "(" + ",".join(e) + ")")
    return "(" + ", ".join(parts) + ")" if parts else "replicated"


def plan_dict(p: ShardPlan, batch: int | None = None) -> dict:
    """The plan as JSON-able data (for `bstc explain --mesh … --json`)."""
    return dict(
        mesh=dict(p.mesh.axes), origin=p.mesh.origin, devices=p.mesh.size,
        rules={k: list(v) for k, v in p.mesh.rules},
        params=[dict(name=r.name, shape=list(r.shape), dtype=r.dtype, logical=list(r.logical),
                     spec=[None if e is None else e if isinstance(e, str) else list(e) for e in r.spec],
                     bytes=r.bytes, bytes_per_device=r.bytes_per_device) for r in p.rows],
        memory_per_device=p.memory(batch),
    )


def print_plan(p: ShardPlan, batch: int | None = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from bstc import ir
    from bstc.passes.report import bytes_h

    c = console or Console(width=160)
    rules = "; ".join(f"{k} -> {_target(v) if v else '()'}" for k, v in p.mesh.rules)
    c.print(f"[bold]mesh[/] {p.mesh.describe()} = {p.mesh.size} device{'s' if p.mesh.size != 1 else ''} "
            f"(from {p.mesh.origin}) · rules: {rules}")
    t = Table(box=None, header_style="bold")
    for col, just in (("parameter", "left"), ("shape", "left"), ("logical axes", "left"),
                      ("partition spec", "left"), ("per device", "right")):
        t.add_column(col, justify=just)
    for r in p.rows:
        t.add_row(r.name, ir.fmt_shape(r.shape), "(" + ", ".join(n or "·" for n in r.logical) + ")",
                  _fmt_spec(r.spec), bytes_h(r.bytes_per_device))
    c.print(t)
    mem = p.memory(batch)
    c.print(f"per device: params {bytes_h(mem['params'])} · grads {bytes_h(mem['grads'])} · "
            f"AdamW moments {bytes_h(mem['optimizer'])} · activations {bytes_h(mem['activations'])} "
            f"at batch {batch or p.batch or 8} · [bold]total {bytes_h(mem['total'])}[/] "
            f"(params {bytes_h(p.param_bytes)} unsharded)")


# ---- sharded checkpoints -------------------------------------------------------------------------


def abstract_like(tree, shardings=None) -> list:
    """[ShapeDtypeStruct(shape, dtype, sharding)] for the array leaves of `tree`: what orbax
    restores into, straight onto the target mesh (each process reads only its own shards)."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    shs = [None] * len(leaves)
    if shardings is not None:
        is_sh = lambda s: isinstance(s, jax.sharding.Sharding)  # noqa: E731
        shs = jax.tree.leaves(eqx.filter(shardings, is_sh, is_leaf=is_sh), is_leaf=is_sh)
        if len(shs) != len(leaves):
            raise ValueError(f"{len(shs)} shardings for {len(leaves)} arrays")
    return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shs)]


def save_checkpoint(directory, tree) -> None:
    """Write the array leaves of `tree` with orbax; sharded arrays are written shard by shard
    (in a multi-process run every process writes the shards it holds)."""
    import orbax.checkpoint as ocp

    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(directory), jax.tree.leaves(eqx.filter(tree, eqx.is_array)), force=True)
    ck.wait_until_finished()


def restore_checkpoint(directory, like, shardings=None):
    """Restore a checkpoint written by `save_checkpoint` (from any mesh) into the structure of
    `like`, each array placed with its sharding in `shardings` (a pytree like `like`)."""
    import orbax.checkpoint as ocp

    arrays, static = eqx.partition(like, eqx.is_array)
    leaves = ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract_like(like, shardings))
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(arrays), list(leaves)), static)


# ---- what a runtime needs, in one object -----------------------------------------------------------


class Sharded:
    """A run's mesh and plan, with the few operations a training loop needs:

        sh = shard.Sharded.create(model_ir, "data=2,tensor=4", batch=cfg.batch)
        state = sh.place(state)                       # params + optimizer state → NamedShardings
        step = sh.jit_step(train_step, state, batch_ndim=3, batch_dim=1)  # in/out shardings
        lo, hi = sh.rows(global_batch_size)           # this process's rows of every batch
        batch = sh.batch(local_rows_dict, global_batch_size, batch_dim=1)
        state = checkpointer.restore(..., shardings=sh.shardings(state))
    """

    def __init__(self, p: ShardPlan, mesh: Mesh):
        self.plan, self.mesh = p, mesh

    @classmethod
    def create(cls, m: ir.Model, mesh: str | Mapping[str, int] | None = None, *, batch: int | None = None,
               devices=None) -> "Sharded":
        devs = list(devices if devices is not None else jax.devices())
        p = plan(m, mesh, n_devices=len(devs), batch=batch)
        return cls(p, make_mesh(p, devs))

    @property
    def is_trivial(self) -> bool:
        return self.plan.mesh.size == 1 and jax.process_count() == 1

    def describe(self) -> str:
        return f"mesh {self.plan.mesh.describe()} ({self.plan.mesh.size} of {jax.device_count()} devices" + (
            f", {jax.process_count()} processes)" if jax.process_count() > 1 else ")")

    def shardings(self, tree):
        return tree_shardings(tree, self.plan, self.mesh)

    def place(self, tree):
        return shard_tree(tree, self.shardings(tree))

    def batch_sharding(self, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
        return batch_sharding(self.plan, self.mesh, ndim, batch_dim)

    def rows(self, global_batch_size: int, seq_len: int | None = None, ndim: int = 2,
             batch_dim: int = 0) -> tuple[int, int]:
        seq_len = seq_len or self.plan.model.dims.seq_len
        shape = [1] * ndim
        shape[batch_dim] = global_batch_size
        if batch_dim + 1 < ndim:
            shape[batch_dim + 1] = seq_len
        return local_rows(self.batch_sharding(ndim, batch_dim), tuple(shape), batch_dim)

    def batch(self, local: Mapping[str, Any], global_rows: int, batch_dim: int = 0) -> dict:
        ndim = np.ndim(next(iter(local.values())))
        return global_batch(local, self.batch_sharding(ndim, batch_dim), global_rows, batch_dim)

    def jit_step(self, step: Callable, state, batch_ndim: int = 2, batch_dim: int = 0, donate: bool = True):
        bsh = self.batch_sharding(batch_ndim, batch_dim)
        return sharded_step(step, self.mesh, self.plan, self.shardings(state), bsh, donate=donate)

    def data_shard(self, global_rows: int, ndim: int = 3, batch_dim: int = 1) -> tuple[int, int]:
        """(index, count): this process reads every count-th example starting at index, so the
        processes together read each global batch once (count == 1: every process reads it all,
        when the batch axes do not span processes)."""
        lo, hi = self.rows(global_rows, None, ndim, batch_dim)
        per = hi - lo
        return lo // per, global_rows // per

    def replicate(self, tree):
        """Host arrays (the same on every process) → arrays replicated over the mesh."""
        repl = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: _put(np.asarray(x), repl), tree)


def for_run(model_file, overrides: Mapping[str, Any] | None, mesh: str | None, batch: int) -> Sharded | None:
    """The Sharded of a training run, or None when it runs on one device as before: no --mesh,
    no mesh section in the model, one device, one process. `batch`: the per-step batch that is
    split over the batch axes (the micro-batch under gradient accumulation)."""
    if model_file is None:
        if mesh is not None:
            raise ValueError("--mesh needs a bstc model file")
        return None
    import bstc

    m = bstc.parse(str(model_file), overrides=dict(overrides) if overrides else None)
    if mesh is None and m.mesh is None and jax.device_count() == 1 and jax.process_count() == 1:
        return None  # the one-device run, exactly as without bstc.shard
    sh = Sharded.create(m, mesh, batch=batch)  # a mesh section larger than the devices: located error
    return None if sh.is_trivial else sh
