"""From a model file (path or text) to the checked IR: front end, then the passes.

Every problem in the file is collected and raised together as one BstcError."""
from __future__ import annotations

import re
from pathlib import Path

from bstc import ir
from bstc.errors import BstcError, Collector, Diagnostic, Span, read_text_file
from bstc.ops import Dims
from bstc.passes.check import check
from bstc.passes.expand import expand
from bstc.passes.mesh import check_mesh
from bstc.passes.resolve import resolve
from bstc.syntax.dsl import parse_dsl
from bstc.syntax.yaml_front import parse_yaml

_DSL_START = re.compile(r"\A(\s*(#[^\n]*)?\n)*\s*model\s+[A-Za-z_]\w*\s*\{")


def read_source(source) -> tuple[str, str, str]:
    """(text, file name, 'bst' | 'yaml') for a path, a zoo name or the text itself."""
    from bstc import zoo

    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and "{" not in source
                                    and ":" not in source.replace("\\", "/").split("/")[-1]):
        path = zoo.resolve(str(source))
        if path is None:
            raise FileNotFoundError(f"no such model file: {source}")
        text = read_text_file(path)
        fmt = "yaml" if path.suffix in (".yaml", ".yml") else "bst" if path.suffix == ".bst" else _sniff(text)
        return text, str(source), fmt
    text = str(source)
    return text, "<string>", _sniff(text)


def _sniff(text: str) -> str:
    return "bst" if _DSL_START.match(text) else "yaml"


def parse_ast(source):
    text, file, fmt = read_source(source)
    errors = Collector({file: text})
    tree = (parse_dsl if fmt == "bst" else parse_yaml)(text, file, errors)
    return tree, text, file, errors


def parse(source, overrides=None) -> ir.Model:
    if isinstance(source, ir.Model):
        if overrides:
            raise ValueError("overrides apply to model files, not to an already checked IR")
        return source
    tree, text, file, errors = parse_ast(source)
    # A file that did not parse (or a YAML file with a structural error, e.g. a misspelt section
    # key) stops here: the passes would only report the consequences again.
    if tree is None or errors:
        errors.raise_if_any()
        raise BstcError([Diagnostic(Span(file, 1, 1), "the model file could not be read")], {file: text})
    errors.sources.setdefault("<--set>", "")
    res = resolve(tree, overrides, errors)
    mesh = check_mesh(tree, res.scope, errors)
    ex = expand(tree, res.scope, errors)
    # With broken model-level sizes the per-layer rules would only repeat the same complaint:
    # still check names and schemas, but skip the shape rules.
    shallow = res.dims is None
    dims = res.dims or Dims(vocab=1, d_model=1, heads=1, window=1, seq_len=1)
    model = check(tree.name, res.params, dims, ex, errors, file, text, mesh=mesh, shallow=shallow)
    errors.raise_if_any()
    if model is None:  # defensive: a failed pass must have said why
        raise BstcError([], {})
    return model


def parse_set_items(items) -> dict[str, str]:
    """`--set NAME=VALUE` items → {NAME: "VALUE"}, for every command alike. Values stay text:
    the checker parses them as expressions of the model language (`4 * 64`, `bfloat16`, `sh`),
    where they are located and reported like any model-file error; no other parser (YAML's
    `on` → True, `0x10` → 16) gets a say. Raises ValueError for an item that is not NAME=VALUE."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier() or not value:
            raise ValueError(f"--set expects NAME=VALUE, got '{item}'")
        if name in out:
            raise ValueError(f"--set {name} is given twice ({name}={out[name]} and {name}={value}): keep one")
        out[name] = value
    return out

