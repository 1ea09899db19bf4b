"""Placing a model on devices by its plan (bstc.shard_plan): the jax Mesh, NamedShardings for
parameters, optimizer state and batches, the jitted sharded train step (XLA inserts the
collectives), multi-host start-up (`jax.distributed`), sharded checkpoints, and `Sharded`, the
one object a training loop needs. docs/scaling.md is the user's guide.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bstc import ir
from bstc.errors import BstcError, Diagnostic
from bstc.passes.mesh import ResolvedMesh
from bstc.shard import activate, spec_for
from bstc.shard_plan import ShardPlan, plan


def _arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


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


def for_run(model_ir: ir.Model | None, mesh: str | None, batch: int) -> Sharded | None:
    """The Sharded of a training run, or None when it runs on one device as before: no --mesh,
    no mesh section in the model, one device, one process. `batch`: the per-step batch that is
    split over the batch axes (the micro-batch under gradient accumulation)."""
    if model_ir is None:
        if mesh is not None:
            raise ValueError("--mesh needs a bstc model file")
        return None
    if mesh is None and model_ir.mesh is None and jax.device_count() == 1 and jax.process_count() == 1:
        return None  # the one-device run, exactly as without a mesh
    sh = Sharded.create(model_ir, mesh, batch=batch)  # a mesh section larger than the devices: located error
    return None if sh.is_trivial else sh
