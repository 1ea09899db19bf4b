"""The ops registry: one module per layer kind. Importing this package registers them all."""
from __future__ import annotations

import importlib
import pkgutil

from bstc.ops.base import REGISTRY, ContextSpec, Dims, Op, Param, Problem, register

# Every module in this package that does not start with '_' and is not `base` defines a kind.
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def get(kind: str) -> Op:
    return REGISTRY[kind]


def kinds() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["REGISTRY", "ContextSpec", "Dims", "Op", "Param", "Problem", "register", "get", "kinds"]
