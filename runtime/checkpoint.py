"""Checkpoints with orbax: train-state arrays, the grain iterator state, and a JSON record.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a half-written checkpoint that looks finished. The JSON record holds the
step, the model fingerprint and every array's path/shape/dtype, so a checkpoint made by a
different model is refused with a message instead of a shape error deep inside orbax.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import equinox as eqx
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

import shutil

from bstc.runtime.errors import CheckpointError, CorruptCheckpoint, UsageError

# orbax logs every save at INFO through absl; the progress bar is the user's view of a run.
logging.getLogger("absl").setLevel(logging.WARNING)


def _array_like(x) -> bool:
    """An array, or its shape and dtype (a template from eqx.filter_eval_shape)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def describe(tree) -> list[list]:
    """[path, shape, dtype] for every array leaf: what a checkpoint must match."""
    arrays = eqx.filter(tree, _array_like)
    leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
    return [[jax.tree_util.keystr(p), list(np.shape(x)), str(x.dtype)] for p, x in leaves]


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict[str, Any]) -> None:
        arrays = jax.tree.leaves(eqx.filter(state, eqx.is_array))
        meta = dict(meta, step=int(step), leaves=describe(state))
        items = dict(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if step in self.manager.all_steps():  # re-saving the same step (e.g. SIGTERM right after a save)
            return
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many kinds; the user needs one line
            raise CorruptCheckpoint(f"checkpoint {self.directory / str(step)} is corrupt or "
                                    f"unreadable: {_first_line(e)}") from None

    def restore(self, step: int, template, data_iter, fingerprint: str | None):
        """Restore into `template`: a freshly initialised state of the same model, or its
        shapes (eqx.filter_eval_shape), which restores without building the model first."""
        where = self.directory / str(step)
        meta = self.read_meta(step)
        if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise CheckpointError(
                f"checkpoint {where} was made by a different model (fingerprint "
                f"{meta.get('fingerprint')}, this model {fingerprint}); use the run's own model "
                "file and --set values, or start a new run directory")
        want = describe(template)
        if meta.get("leaves") != want:
            saved = meta.get("leaves") or []
            diff = next((f"{a[0]} {a[1]} vs {b[0]} {b[1]}" for a, b in zip(saved, want) if a != b),
                        f"{len(saved)} arrays saved, {len(want)} expected")
            raise CheckpointError(f"checkpoint {where} does not match this model: {diff}")
        arrays, static = eqx.partition(template, _array_like)
        leaves, treedef = jax.tree.flatten(arrays)
        # Restore into the template's own placement: a template on a mesh (bstc.placement) shard by
        # shard onto that mesh, a one-device template onto its device — whatever mesh saved it. A
        # template of shapes alone (eval_shape) goes to the default device: without a sharding
        # orbax would restore onto the saving mesh's devices, which a one-device `bstc eval` of
        # an 8-device run does not have ("topology mismatch").
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if isinstance(x, jax.Array)
                                         else getattr(x, "sharding", None) or here) for x in leaves]
        items = dict(state=ocp.args.StandardRestore(abstract))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CorruptCheckpoint(f"checkpoint {where} is corrupt or unreadable: {_first_line(e)}") from None
        restored = [np.asarray(x) if not isinstance(x, jax.Array) else x for x in out.state]
        for x, a in zip(restored, abstract):
            if tuple(x.shape) != tuple(a.shape):
                raise CorruptCheckpoint(f"checkpoint {where} is corrupt: array shape {x.shape} != {a.shape}")
        state = eqx.combine(jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in restored]), static)
        return state, meta

    def restore_readable(self, template, data_iter, fingerprint: str | None, step: int | None = None,
                         say=print):
        """Restore `step`, or else the newest checkpoint that reads: a corrupt one is skipped,
        saying which and why (a checkpoint of another model is still an error). → (step, state)."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.directory} has no checkpoint yet")
        if step is not None and step not in steps:
            raise UsageError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        failed = []
        for s in ([step] if step is not None else steps[::-1]):
            try:
                state, _ = self.restore(s, template, data_iter, fingerprint)
            except CorruptCheckpoint as e:
                if step is not None:
                    raise
                failed.append(s)
                say(f"warning: {e}; trying the one before it")
                continue
            if failed:
                say(f"using checkpoint step {s}, the newest readable one")
            return s, state
        raise CorruptCheckpoint(f"no checkpoint in {self.directory} is readable (steps {steps})")

    def set_aside(self, after: int, dest: Path) -> list[int]:
        """Move the checkpoints newer than `after` to `dest` (kept, not deleted), so that a run
        resumed from `after` saves its own steps again. Returns the steps moved."""
        moved = [s for s in self.steps() if s > after]
        if moved:
            dest = Path(dest)
            dest.mkdir(parents=True, exist_ok=True)
            for s in moved:
                target = dest / str(s)
                if target.exists():
                    shutil.rmtree(target)
                shutil.move(str(self.directory / str(s)), str(target))
            self.manager.reload()
        return moved

    def close(self) -> None:
        self.manager.close()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]
