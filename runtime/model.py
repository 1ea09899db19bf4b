"""What the runtime needs from a model: a factory, a fingerprint, and a few sizes.

The trainer is model-agnostic: it takes a `ModelSpec`. `spec_from_file` builds one from a
bstc model file (+ overrides), parsing and checking it once: the spec carries the checked
model (`model_ir`), which the factory lowers and the mesh plan reads, so no later step reads
the file again. Tests may build a spec around any Equinox module.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax

from bstc import zoo
from bstc.runtime.config import RunConfig
from bstc.runtime.errors import UsageError


@dataclass
class ModelSpec:
    name: str
    build: Callable[[jax.Array], eqx.Module]   # key -> module: (B, L) int32 -> (B, L, vocab)
    fingerprint: str                            # differs when the model differs
    vocab: int
    seq_len: int | None = None
    window: int | None = None
    file: Path | None = None                    # the model file, copied into the run directory
    overrides: dict[str, Any] = field(default_factory=dict)
    flops_per_token: float | None = None        # from `bstc explain`, for MFU
    model_ir: Any = None                        # the checked model (bstc.ir.Model), when from a file


def zoo_dir() -> Path | None:
    d = zoo.models_dir()
    return d if d.is_dir() else None


def zoo_names() -> list[str]:
    return zoo.names()


def resolve_model(name: str) -> Path:
    """A path to a model file, or the name of a zoo model ('bst_sh_s4'): `bstc.zoo.resolve`,
    with the runtime's one-line errors."""
    p = zoo.resolve(name)
    if p is not None and p.is_file():
        return p
    if p is not None:
        raise UsageError(f"model '{name}' is not a file")
    names = ", ".join(zoo_names())
    raise UsageError(f"model '{name}' not found" + (f" (zoo models: {names})" if names else ""))


def is_zoo(path: Path) -> bool:
    z = zoo_dir()
    return z is not None and path.resolve().parent == z.resolve()


def _params(model_ir) -> dict[str, Any]:
    p = getattr(model_ir, "params", {}) or {}
    try:
        return {k: getattr(v, "value", v) for k, v in dict(p).items()}
    except (TypeError, ValueError):
        return {}


def _ir_text(model_ir) -> str:
    try:
        from bstc import ir

        return ir.dump(model_ir)
    except (ImportError, AttributeError):
        return repr(model_ir)


def effective_overrides(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """The zoo's tiny preset (for zoo models, unless --preset none), then the user's --set."""
    out: dict[str, Any] = {}
    if cfg.preset == "tiny" or (cfg.preset == "auto" and is_zoo(path)):
        out.update(zoo.preset_overrides(path))
    out.update(cfg.set)
    return out


def spec_from_file(path: Path, overrides: dict[str, Any]) -> ModelSpec:
    """Parse + check the model file now (errors surface before any training starts)."""
    import bstc

    from bstc.lower import lower

    model_ir = bstc.parse(str(path), overrides=overrides or None)
    params = _params(model_ir)
    fp = hashlib.sha256(_ir_text(model_ir).encode()).hexdigest()[:16]
    flops = None
    try:
        rep = bstc.explain(model_ir, batch=1)
        flops = float(getattr(rep, "flops_per_token", None) or getattr(rep, "total_flops_per_token"))
    except Exception:  # the cost report is optional: MFU is then not shown
        flops = None
    return ModelSpec(
        name=getattr(model_ir, "name", path.stem),
        build=lambda key: lower(model_ir, key=key),
        fingerprint=fp,
        vocab=int(params.get("vocab", 256)),
        seq_len=int(params["seq_len"]) if "seq_len" in params else None,
        window=int(params["window"]) if "window" in params else None,
        file=path,
        overrides=dict(overrides),
        flops_per_token=flops,
        model_ir=model_ir,
    )
