"""Model weights as safetensors: every array of a lowered model, keyed by its dotted path.

Keys are the module's attribute path, as `jax.tree_util.keystr(path, simple=True, separator=".")`
writes it: `embed.weight`, `stages.0.unit.1.subs.0.op.wq.weight`, `shared.g.subs.1.op.w_in.weight`,
`head.weight`. A scanned stack (`repeat N { … }`, lowered to one `lax.scan`) is stored **stacked**:
each of its arrays carries a leading axis of size N, exactly as the module holds it, so a file
round-trips without copies and its keys are those of `bstc.load(..., scan=True)` (the default).

The file's metadata (string to string) records `format: bstc`, the model's name and the
fingerprint of its checked IR, so a file written for one model is refused by another with a
one-line message rather than a shape error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

FORMAT = "bstc"
LAYOUT = "stacked"  # scanned stacks keep their leading layer axis


class WeightsError(ValueError):
    """A weights file that cannot be read, or that does not fit the model it is loaded into."""


def fingerprint(model_ir) -> str:
    """A hash of the checked IR: equal for equal models, whatever file or overrides produced them
    (the same hash `bstc train` records in run.json)."""
    from bstc import ir

    return hashlib.sha256(ir.dump(model_ir).encode()).hexdigest()[:16]


def _is_array(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def named_arrays(model) -> dict[str, Any]:
    """{dotted path: array} for every array leaf of `model`, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, _is_array))[0]
    out: dict[str, Any] = {}
    for path, x in leaves:
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = x
    return out


def save(model, path, metadata: dict[str, Any] | None = None) -> Path:
    """Write every array of `model` to a safetensors file; `metadata` values are stored as text
    (JSON for anything but a string)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in named_arrays(model).items()}
    meta = {"format": FORMAT, "layout": LAYOUT}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a reader never sees half a file
    return path


def read(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of a safetensors file; any failure to read it is a WeightsError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' " + ("is not a file" if path.exists() else "does not exist"))
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds; one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read weights file '{path}': {msg}") from None
    return arrays, meta


def fill(template, path, *, model_fingerprint: str | None = None):
    """`template` (a lowered model, or its shapes from eqx.filter_eval_shape) with every array
    replaced by the file's array of the same dotted path. Shapes must match exactly; a floating
    array keeps the file's dtype (the trainer's float32 master weights stay float32)."""
    arrays, meta = read(path)
    want_fp = meta.get("fingerprint")
    if model_fingerprint and want_fp and want_fp != model_fingerprint:
        over = meta.get("overrides")
        hint = f" (it was exported with overrides {over})" if over and over != "{}" else ""
        raise WeightsError(f"weights file '{path}' was written for another model: its fingerprint is {want_fp}, "
                           f"this model's {model_fingerprint}{hint}; load it with the model file exported beside it")
    named = named_arrays(template)
    missing = [k for k in named if k not in arrays]
    extra = [k for k in arrays if k not in named]
    if missing or extra:
        what = (f"has no array '{missing[0]}'" if missing else f"has an array '{extra[0]}' the model does not")
        layout = meta.get("layout", "?")
        raise WeightsError(f"weights file '{path}' does not fit this model: it {what} "
                           f"({len(missing)} missing, {len(extra)} unexpected; the file's layout is {layout}"
                           + ("; scanned stacks are stored stacked: load with scan=True" if layout == LAYOUT else "")
                           + ")")
    leaves = []
    for k, t in named.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(t.shape):
            raise WeightsError(f"weights file '{path}' does not fit this model: '{k}' has shape "
                               f"{tuple(a.shape)}, the model {tuple(t.shape)}")
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            a = a.astype(t.dtype)
        leaves.append(jax.numpy.asarray(a))
    params, static = eqx.partition(template, _is_array)
    treedef = jax.tree.structure(params)
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)
