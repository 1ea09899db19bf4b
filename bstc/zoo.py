"""The model zoo shipped with bstc (models/*.bst, models/*.yaml)."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def package_data_dir(name: str) -> Path:
    """`bstc/<name>` in an installed wheel, `<repo>/<name>` in a source checkout."""
    installed = _HERE / name
    return installed if installed.is_dir() else _HERE.parent / name


def models_dir() -> Path:
    return package_data_dir("models")


def list_models() -> list[Path]:
    d = models_dir()
    return sorted(list(d.glob("*.bst")) + list(d.glob("*.yaml")))


def names() -> list[str]:
    """Zoo model names, each once (`bst_sh_s4` has a .bst and a .yaml file)."""
    return sorted({p.stem for p in list_models()})


def resolve(name_or_path: str) -> Path | None:
    """A path that exists, or the name of a zoo model (`bst_sh_s4`, `bst_sh_s4.yaml`). The one
    resolver of model names: the compiler commands and the runtime both use it."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    d = models_dir()
    for cand in (d / name_or_path, d / f"{name_or_path}.bst", d / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    # A directory or FIFO of that name: the reader says what it is instead of "no such file".
    return p if p.exists() else None
