"""From a model file (path or text) to the checked IR: front end, then the passes.

Every problem in the file is collected and raised together as one BstcError."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from bstc import ir
from bstc.errors import BstcError, Collector, Diagnostic, Span, read_text_file
from bstc.ops import Dims
from bstc.passes.check import check
from bstc.passes.expand import expand
from bstc.passes.mesh import check_mesh
from bstc.passes.resolve import resolve
from bstc.syntax import ast
from bstc.syntax.dsl import parse_dsl
from bstc.syntax.yaml_front import parse_yaml

_DSL_START = re.compile(r"\A(\s*(#[^\n]*)?\n)*\s*(import\s*\"|(model|library)\s+[A-Za-z_]\w*\s*\{)")


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
    """The file's own syntax tree (its imports named, not read), its text, name and collector."""
    text, file, fmt = read_source(source)
    errors = Collector({file: text})
    tree = (parse_dsl if fmt == "bst" else parse_yaml)(text, file, errors)
    return tree, text, file, errors


def _source_path(source) -> Path | None:
    """The file a source names (resolved), None for model text."""
    from bstc import zoo

    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and "{" not in source):
        p = zoo.resolve(str(source))
        return p.resolve() if p is not None else None
    return None


def find_import(name: str, base: Path | None) -> Path | None:
    """An import's file: `name` relative to the importing file's directory (the working
    directory for model text), `.bst`/`.yaml` added when it has no such suffix; else a zoo
    library of that name."""
    from bstc import zoo

    def cands(d: Path):
        yield d / name
        if Path(name).suffix not in (".bst", ".yaml", ".yml"):
            yield d / f"{name}.bst"
            yield d / f"{name}.yaml"

    dirs = [base if base is not None else Path.cwd()]
    if "/" not in name and "\\" not in name:
        dirs.append(zoo.models_dir())
    for d in dirs:
        for c in cands(d):
            if c.is_file():
                return c
    return None


def _display(importer: str, base: Path | None, found: Path) -> str:
    """How diagnostics name an imported file: beside the importer's name when it was found
    relative to it, else its full path (a zoo library)."""
    if base is not None and found.parent.resolve() == base and importer not in ("<string>",):
        return os.path.normpath(os.path.join(os.path.dirname(importer), found.name))
    return str(found)


def load_ast(source):
    """`parse_ast` with the imports read: the libraries' parameters and blocks come first (in
    import order, a library's own imports before it; a file imported twice counts once), then
    the file's own. A missing file, an import cycle or a model imported as a library is a
    located error; a name defined in two files is reported by the passes, with both places."""
    return _load(source)[:4]


def _load(source):
    """`load_ast`'s result and the libraries read, [(path, tree, text)] in the order merged."""
    tree, text, file, errors = parse_ast(source)
    libraries: list = []
    if tree is None or not tree.imports:
        return tree, text, file, errors, libraries
    path = _source_path(source)
    base = path.parent if path is not None else None
    assigns: list = []
    blocks: list = []
    done: set = set()

    def visit(t: ast.ModelDef, disp: str, base_dir: Path | None, stack: list) -> None:
        for imp in t.imports:
            found = find_import(imp.path, base_dir)
            if found is None:
                where = "the working directory" if base_dir is None else "this file's directory"
                errors.error(imp.span, f"cannot find '{imp.path}' to import",
                             f"a path relative to {where}, or a zoo library: {', '.join(zoo_libraries()) or 'none'}")
                continue
            key = found.resolve()
            keys = [k for k, _, _ in stack]
            if key in keys:
                i = keys.index(key)
                name = [os.path.basename(d) for _, d, _ in stack]  # the places say which directory
                chain = name[i:] + [name[i]]
                if i + 1 < len(stack):
                    first = stack[i + 1][2]
                    hint = (f"{name[i]} imports {name[i + 1]} at {first}: a library cannot import a file "
                            "that imports it; move what both need into a third library")
                else:
                    hint = "remove this import"
                errors.error(imp.span, "import cycle: " + " -> ".join(chain), hint)
                continue
            if key in done:
                continue
            done.add(key)
            sub_disp = _display(disp, base_dir, found)
            try:
                sub_text = read_text_file(found, "library")
            except FileNotFoundError as e:
                errors.error(imp.span, f"cannot import '{imp.path}': {e.args[0]}")
                continue
            except BstcError as e:
                errors.diagnostics.extend(e.diagnostics)
                errors.sources.update(e.sources)
                continue
            errors.sources[sub_disp] = sub_text
            fmt = ("yaml" if found.suffix in (".yaml", ".yml") else "bst" if found.suffix == ".bst"
                   else _sniff(sub_text))
            sub = (parse_dsl if fmt == "bst" else parse_yaml)(sub_text, sub_disp, errors)
            if sub is None:
                continue
            if not sub.library:
                errors.error(imp.span, f"'{imp.path}' is a model, not a library",
                             f"only a library (`library NAME {{ parameters and blocks }}`) can be imported; "
                             f"move the blocks to share from {sub_disp} into one")
                continue
            visit(sub, sub_disp, key.parent, stack + [(key, sub_disp, imp.span)])
            assigns.extend(sub.assigns)
            blocks.extend(sub.blocks)
            libraries.append((key, sub, sub_text))

    visit(tree, file, base, [(path if path is not None else file, file, None)])
    merged = dataclasses.replace(tree, assigns=tuple(assigns) + tree.assigns, blocks=tuple(blocks) + tree.blocks)
    return merged, text, file, errors, libraries


def _without_imports(text: str, imports) -> str:
    """`text` with each `import "..."` statement (and its ';') taken out; a line left empty goes too."""
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    for imp in sorted(imports, key=lambda i: (i.span.line, i.span.col), reverse=True):
        sp = imp.span
        begin = text.rfind("import", 0, starts[sp.line - 1] + sp.col - 1)
        end = starts[sp.end_line - 1] + sp.end_col - 1
        semi = re.match(r"[ \t]*;", text[end:])
        end += semi.end() if semi else 0
        line_start, line_end = text.rfind("\n", 0, begin) + 1, text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end
        if not text[line_start:begin].strip() and not re.sub(r"#.*", "", text[end:line_end]).strip():
            begin, end = line_start, min(line_end + 1, len(text))  # the whole line, its comment too
        text = text[:begin] + text[end:].lstrip(" \t") if begin != line_start else text[:begin] + text[end:]
    return text


def bundle(source) -> str | None:
    """A `.bst` model file that imports `.bst` libraries as one self-contained text: each
    library's body as written (its parameters and blocks, comments kept) inside the model, in
    the order the imports merge them, and the import lines gone. It compiles to the same IR
    (checked here), so a run directory that keeps it rebuilds the same model however the
    libraries later move or change. None when there is nothing to bundle or it cannot be done
    in text (a YAML file on either side), or for a file with errors."""
    tree, text, file, errors, libraries = _load(source)
    path = _source_path(source)
    if tree is None or errors or tree.library or not tree.imports or path is None or path.suffix != ".bst":
        return None
    parts = []
    for lpath, lib, ltext in libraries:
        m = re.search(rf"^[ \t]*library\s+{re.escape(lib.name)}\s*\{{", ltext, re.M)
        close = _matching_brace(ltext, m.end() - 1) if m and lpath.suffix == ".bst" else None
        if close is None:
            return None
        parts.append(f"  # library {lib.name}, from {lpath.name}\n" + ltext[m.end():close].strip("\n") + "\n")
    own = _without_imports(text, tree.imports)
    m = re.search(rf"^[ \t]*model\s+{re.escape(tree.name)}\s*\{{", own, re.M)
    if m is None:
        return None
    rest = own[m.end():]
    out = own[:m.end()] + "\n" + "".join(parts) + "  # the model's own\n" + (rest[1:] if rest.startswith("\n") else rest)
    try:
        same = parse(out) == parse(source)
    except BstcError:
        same = False
    return out if same else None


def _matching_brace(text: str, i: int) -> int | None:
    """The index of the '}' that closes the '{' at text[i] (comments and strings skipped)."""
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            k = text.find("\n", i)
            i = n if k < 0 else k
            continue
        if c == '"':
            k = text.find('"', i + 1)
            i = n if k < 0 else k + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def zoo_libraries() -> list[str]:
    from bstc import zoo

    return zoo.library_names()


def parse(source, overrides=None) -> ir.Model:
    if isinstance(source, ir.Model):
        if overrides:
            raise ValueError("overrides apply to model files, not to an already checked IR")
        return source
    tree, text, file, errors = load_ast(source)
    # A file that did not parse (or a YAML file with a structural error, e.g. a misspelt section
    # key) stops here: the passes would only report the consequences again.
    if tree is None or errors:
        if tree is not None and tree.imports:
            _note_uses(tree, file, errors)
        errors.raise_if_any()
        raise BstcError([Diagnostic(Span(file, 1, 1), "the model file could not be read")], {file: text})
    if tree.library:
        errors.error(tree.span, f"'{tree.name}' is a library, not a model",
                     "import it from a model (`import \"FILE\"`); `bstc validate` checks a library's blocks")
        errors.raise_if_any()
    errors.sources.setdefault("<--set>", "")
    res = resolve(tree, overrides, errors)
    mesh = check_mesh(tree, res.scope, errors)
    ex = expand(tree, res.scope, errors)
    # With broken model-level sizes the per-layer rules would only repeat the same complaint:
    # still check names and schemas, but skip the shape rules.
    shallow = res.dims is None
    dims = res.dims or Dims(vocab=1, d_model=1, heads=1, window=1, seq_len=1)
    model = check(tree.name, res.params, dims, ex, errors, file, text, mesh=mesh, shallow=shallow)
    if errors and tree.imports:
        _note_uses(tree, file, errors)
    errors.raise_if_any()
    if model is None:  # defensive: a failed pass must have said why
        raise BstcError([], {})
    return model


def _note_uses(tree: ast.ModelDef, file: str, errors: Collector) -> None:
    """When every error is in imported files (an imported block that does not check with this
    model's parameters, say `mlp_hidden` missing), a note in the model file says where: at the
    first use of each imported block with an error in its definition (the definition whose
    name comes last before the error), else at the first import."""
    from bstc.passes.resolve import SET_FILE

    if any(d.span is not None and d.span.file == file for d in errors.diagnostics):
        return
    imported = [d for d in errors.diagnostics if d.span is not None and d.span.file != SET_FILE]
    if not imported:  # an override's problem is shown in <--set>
        return
    uses: dict[str, Span] = {}

    def walk(stmts):
        for st in stmts:
            if isinstance(st, ast.Use):
                uses.setdefault(st.block, st.span)
            elif isinstance(st, ast.Repeat):
                walk(st.body)
            elif isinstance(st, ast.Pattern):
                walk([u for _, u, _ in st.bindings])
            elif isinstance(st, ast.Place):
                walk([st.use])

    walk(tree.layers)
    defs = sorted(((b.span.file, b.span.line, b.span.col), b.name) for b in tree.blocks
                  if b.span is not None and b.span.file != file)
    notes: dict[str, tuple] = {}
    for d in imported:
        where = (d.span.file, d.span.line, d.span.col)
        owner = [name for pos, name in defs if pos[0] == where[0] and pos <= where]
        if owner and owner[-1] in uses and uses[owner[-1]] is not None:
            notes.setdefault(owner[-1], (uses[owner[-1]], d.span))
    if not notes and tree.imports[0].span is not None:
        first = imported[0].span
        errors.diagnostics.append(Diagnostic(tree.imports[0].span, "the errors are in the imported files",
                                             f"the first is at {first}", "note"))
    for name, (use, err) in notes.items():
        errors.diagnostics.append(Diagnostic(use, f"block '{name}' is used here", f"its error is at {err}", "note"))


def check_library(source) -> ast.ModelDef:
    """A library file checked on its own (bstc.passes.library); raises BstcError like `parse`.
    Returns its syntax tree with its imports' parameters and blocks."""
    from bstc.passes.library import check_library as check_blocks

    tree, text, file, errors = load_ast(source)
    if tree is None or errors:
        errors.raise_if_any()
        raise BstcError([Diagnostic(Span(file, 1, 1), "the library file could not be read")], {file: text})
    if not tree.library:
        errors.error(tree.span, f"'{tree.name}' is a model, not a library", "check it with `bstc.parse`")
    else:
        check_blocks(tree, errors)
    errors.raise_if_any()
    return tree


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

