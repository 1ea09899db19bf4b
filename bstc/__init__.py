"""bstc: a declarative model-definition language and compiler for hybrid sequence models.

Public API:
    bstc.parse(path_or_text, overrides=None)  -> checked IR (bstc.ir.Model)
    bstc.explain(path_or_text, overrides=None, batch=8) -> Report
    bstc.load(path_or_text, *, key, overrides=None, weights=None) -> eqx.Module mapping (B, L) int32 -> (B, L, vocab)
"""
from __future__ import annotations

from pathlib import Path as _Path

# In a source checkout the runtime, grammar and zoo live beside the package (runtime/,
# grammars/, models/); an installed wheel maps them to bstc.runtime, bstc.grammars and
# bstc.models. Extending __path__ makes both layouts import the same way.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "runtime").is_dir():
    __path__.append(str(_root))  # type: ignore[name-defined]

__version__ = "0.1.0"

from bstc.errors import BstcError, Diagnostic, Span  # noqa: E402


def parse(source, overrides=None):
    """Parse and check a model file (path or text); return the resolved IR."""
    from bstc.frontend import parse as _parse

    return _parse(source, overrides=overrides)


def explain(source, overrides=None, batch: int = 8):
    """Return the cost report of a model file (path, text or IR)."""
    from bstc.passes.report import explain as _explain

    return _explain(source, overrides=overrides, batch=batch)


def load(source, *, key=None, overrides=None, scan: bool = True, remat: str = "none", weights=None):
    """Parse, check and lower a model file to an Equinox module.

    `weights`: a safetensors file written by `bstc export` (or `bstc.weights.save`); its arrays
    replace the initial ones, matched by dotted parameter path. Then `key` may be omitted: the
    model is built from shapes alone, nothing is initialised only to be overwritten."""
    from bstc.lower import load as _load, lower as _lower

    if weights is None:
        if key is None:
            raise TypeError("bstc.load needs key= (a jax.random key) unless weights= is given")
        return _load(source, key=key, overrides=overrides, scan=scan, remat=remat)
    import equinox as _eqx
    import jax as _jax

    from bstc import weights as _weights

    m = parse(source, overrides)
    template = _eqx.filter_eval_shape(_lower, m, key=_jax.random.key(0) if key is None else key,
                                      scan=scan, remat=remat)
    return _weights.fill(template, weights, model_fingerprint=_weights.fingerprint(m))


__all__ = ["parse", "explain", "load", "BstcError", "Diagnostic", "Span", "__version__"]
