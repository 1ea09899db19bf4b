"""The model zoo shipped with bstc (models/*.bst, models/*.yaml)."""
from __future__ import annotations

import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def package_data_dir(name: str) -> Path:
    """`bstc/<name>` in an installed wheel, `<repo>/<name>` in a source checkout."""
    installed = _HERE / name
    return installed if installed.is_dir() else _HERE.parent / name


def models_dir() -> Path:
    return package_data_dir("models")


_LIBRARY = re.compile(r"^(library\s+[A-Za-z_]\w*\s*\{|library\s*:)", re.M)


def is_library(path) -> bool:
    """A block library (`library NAME { ... }`, YAML `library: NAME`), which models import; not a model."""
    return _LIBRARY.search(Path(path).read_text(encoding="utf-8", errors="replace")) is not None


def _files() -> list[Path]:
    d = models_dir()
    return sorted(list(d.glob("*.bst")) + list(d.glob("*.yaml")))


def list_models() -> list[Path]:
    """The zoo's model files (its libraries are not models)."""
    return [p for p in _files() if not is_library(p)]


def list_libraries() -> list[Path]:
    """The zoo's block libraries (`import "blocks"` finds them from any model file)."""
    return [p for p in _files() if is_library(p)]


def names() -> list[str]:
    """Zoo model names, each once (`bst_sh_s4` has a .bst and a .yaml file)."""
    return sorted({p.stem for p in list_models()})


def library_names() -> list[str]:
    return sorted({p.stem for p in list_libraries()})


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


# The zoo's tiny preset: what `bstc train NAME` (and the bench) apply to a zoo model, written
# at paper scale, unless --preset none: small enough to train for a few minutes on a laptop
# CPU. Each zoo file names its depth `groups` (BSTs: 4-layer groups; GSS-Hybrid: 5-layer
# groups) or `depth` (layers), so every zoo model shrinks alike (4–5 layers, 0.8–1.0M
# parameters) and `bstc train NAME` comparisons are fair.
TINY = {"d_model": 128, "heads": 4, "seq_len": 512, "window": 128, "ssm_state": 32, "groups": 1, "depth": 4,
        "memory": 128, "state_vectors": 128, "experts": 4}


def declared_params(path) -> set[str]:
    """The top-level parameter names a model file defines, its imported libraries' included
    (their syntax only, no checking)."""
    from bstc.frontend import load_ast

    tree = load_ast(str(path))[0]
    return {a.name for a in tree.assigns} if tree is not None else set()


def preset_overrides(path, preset: dict | None = None) -> dict:
    """A preset's values (default: `TINY`) for the parameters the model file defines: a preset
    names parameters of many files, and `--set` of a name a file lacks is an error."""
    names = declared_params(path)
    return {k: v for k, v in (TINY if preset is None else preset).items() if k in names}
