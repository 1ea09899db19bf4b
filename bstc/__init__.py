"""bstc: a declarative model-definition language and compiler for hybrid sequence models.

Public API:
    bstc.parse(path_or_text, overrides=None)  -> checked IR (bstc.ir.Model)
    bstc.explain(path_or_text, overrides=None, batch=8) -> Report
    bstc.load(path_or_text, *, key, overrides=None) -> eqx.Module mapping (B, L) int32 -> (B, L, vocab)
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


def load(source, *, key, overrides=None, scan: bool = True, remat: str = "none"):
    """Parse, check and lower a model file to an Equinox module."""
    from bstc.lower import load as _load

    return _load(source, key=key, overrides=overrides, scan=scan, remat=remat)


__all__ = ["parse", "explain", "load", "BstcError", "Diagnostic", "Span", "__version__"]
