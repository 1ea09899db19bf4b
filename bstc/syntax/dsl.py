"""The `.bst` front end: lark (LALR, positions kept) → bstc.syntax.ast.ModelDef.

Syntax errors are collected with lark's error recovery, so a file with several broken lines
reports each of them (at most one per line, to avoid cascades)."""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from bstc.errors import Collector, Span
from bstc.syntax import ast

KEYWORDS = ("model", "block", "layers", "repeat", "embed", "norm", "head", "share", "mesh", "rules")


def grammar_text() -> str:
    try:
        return resources.files("bstc.grammars").joinpath("bstc.lark").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "grammars" / "bstc.lark").read_text()


@functools.lru_cache(maxsize=None)
def parser(start: str = "start") -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, start=start, maybe_placeholders=False)


def _tok_span(file: str, t: Token) -> Span:
    return Span(file, t.line, t.column, t.end_line, t.end_column)


def _meta_span(file: str, meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


_PRETTY = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "$END": "end of file",
}


def _describe(term: str, p: Lark) -> str:
    if term in _PRETTY:
        return _PRETTY[term]
    try:
        pat = p.get_terminal(term).pattern
        if pat.type == "str":
            return f"'{pat.value}'"
    except KeyError:
        pass
    return term


def _expected_list(expected, p: Lark) -> str:
    names = sorted({_describe(t, p) for t in expected})
    if len(names) > 6:
        names = names[:6] + ["…"]
    return ", ".join(names)


def _binop(op: str):
    """A transformer method for one binary operator."""

    @v_args(meta=True)
    def method(self, meta, children):
        return ast.BinOp(op, children[0], children[1], self._s(meta))

    return method


class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta):
        return _meta_span(self.file, meta)

    def _t(self, tok):
        return _tok_span(self.file, tok)

    # ---- expressions
    def number(self, children):
        (t,) = children
        text = str(t)
        value = float(text) if any(c in text for c in ".eE") else int(text)
        return ast.Num(value, self._t(t))

    def string(self, children):
        (t,) = children
        return ast.Str(str(t)[1:-1], self._t(t))

    def name(self, children):
        (t,) = children
        return ast.Name(str(t), self._t(t))

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(children[0], self._s(meta))

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")
    floordiv = _binop("//")
    mod = _binop("%")
    pow = _binop("**")

    @v_args(meta=True)
    def edge(self, meta, children):
        src, var = children
        return ast.Edge(str(src), str(var), self._s(meta), self._t(src), self._t(var))

    # ---- declarations
    @v_args(meta=True)
    def assign(self, meta, children):
        name, value = children
        return ast.Assign(str(name), value, self._t(name))

    @v_args(meta=True)
    def arg(self, meta, children):
        name, value = children
        return ast.Arg(str(name), value, self._t(name))

    barg = arg

    @v_args(meta=True)
    def param(self, meta, children):
        name = children[0]
        return ast.BlockParam(str(name), children[1] if len(children) > 1 else None, self._t(name))

    def params(self, children):
        return tuple(children)

    @v_args(meta=True)
    def sublayer(self, meta, children):
        name, kind, *args = children
        return ast.SubDef(str(name), str(kind), tuple(args), self._t(name), self._t(kind))

    @v_args(meta=True)
    def block_def(self, meta, children):
        name, *rest = children
        params = ()
        if rest and isinstance(rest[0], tuple):
            params, rest = rest[0], rest[1:]
        return ast.BlockDef(str(name), params, tuple(rest), self._t(name))

    # ---- layers
    def call(self, children):
        return tuple(children)

    def share(self, children):
        return ("share", str(children[0]))

    @v_args(meta=True)
    def use(self, meta, children):
        name, *rest = children
        args, share = (), None
        for r in rest:
            if isinstance(r, tuple) and r and r[0] == "share":
                share = r[1]
            else:
                args = r
        return ast.Use(str(name), tuple(args), share, self._t(name))

    @v_args(meta=True)
    def repeat(self, meta, children):
        count, *body = children
        return ast.Repeat(count, tuple(body), self._s(meta))

    @v_args(meta=True)
    def setting(self, meta, children):
        sub, param, value = children
        return ast.Setting(str(sub), str(param), value, self._t(sub))

    @v_args(meta=True)
    def override(self, meta, children):
        name, index, *settings = children
        return ast.Override(str(name), int(index), tuple(settings), self._t(name))

    @v_args(meta=True)
    def embed(self, meta, children):
        arg = children[0] if children else None
        return ast.Builtin("embed", str(arg) if arg else None, self._s(meta), self._t(arg) if arg else None)

    @v_args(meta=True)
    def final_norm(self, meta, children):
        (arg,) = children
        return ast.Builtin("norm", str(arg), self._s(meta), self._t(arg))

    @v_args(meta=True)
    def head(self, meta, children):
        (arg,) = children
        return ast.Builtin("head", str(arg), self._s(meta), self._t(arg))

    @v_args(meta=True)
    def layers(self, meta, children):
        return ("layers", tuple(children), self._s(meta))

    # ---- mesh
    @v_args(meta=True)
    def mesh_axis(self, meta, children):
        name, size = children
        return ast.MeshAxis(str(name), size, self._t(name))

    def mesh(self, children):
        return ("mesh", tuple(children))

    @v_args(meta=True)
    def rule_target(self, meta, children):
        return (tuple(str(c) for c in children), self._s(meta))

    @v_args(meta=True)
    def rule(self, meta, children):
        name, (targets, tspan) = children
        return ast.Rule(str(name), targets, self._t(name), tspan)

    def rules(self, children):
        return ("rules", tuple(children))

    # ---- model
    @v_args(meta=True)
    def model(self, meta, children):
        name, *items = children
        assigns, blocks, layers, mesh, rules, layers_span = [], [], None, None, None, None
        for it in items:
            if isinstance(it, ast.Assign):
                assigns.append(it)
            elif isinstance(it, ast.BlockDef):
                blocks.append(it)
            elif isinstance(it, tuple) and it[0] == "layers":
                if layers is not None:
                    raise _DupSection("layers", it[2])
                layers, layers_span = it[1], it[2]
            elif isinstance(it, tuple) and it[0] == "mesh":
                mesh = it[1]
            elif isinstance(it, tuple) and it[0] == "rules":
                rules = it[1]
        return ast.ModelDef(str(name), tuple(assigns), tuple(blocks), layers or (), mesh, rules,
                            self._t(name), layers_span)

    def start(self, children):
        return children[0]


class _DupSection(Exception):
    def __init__(self, what, span):
        self.what, self.span = what, span


def parse_dsl(text: str, file: str, errors: Collector) -> ast.ModelDef | None:
    """Parse .bst text. Syntax errors go to `errors`; returns None if there were any."""
    p = parser()
    seen_lines: set[int] = set()

    def record(e: UnexpectedInput) -> bool:
        line, col = getattr(e, "line", 0) or 0, getattr(e, "column", 0) or 0
        if line in seen_lines:
            return True
        seen_lines.add(line)
        if isinstance(e, UnexpectedToken):
            tok = e.token
            if tok.type == "$END":
                errors.error(Span(file, _last_line(text), 1), "unexpected end of file",
                             f"expected {_expected_list(e.expected, p)}; is a '}}' missing?")
                return False
            shown = str(tok)
            hint = f"expected {_expected_list(e.expected, p)}"
            if shown in KEYWORDS and "NAME" in e.expected:
                hint = f"'{shown}' is a reserved word; choose another name"
            errors.error(Span(file, tok.line, tok.column, tok.end_line, tok.end_column),
                         f"unexpected {_describe(tok.type, p) if tok.type != 'NAME' else repr(shown)}", hint)
        elif isinstance(e, UnexpectedCharacters):
            ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
            errors.error(Span(file, line, col, line, col + 1), f"unexpected character {ch!r}",
                         f"expected {_expected_list(e.allowed, p)}" if e.allowed else None)
        elif isinstance(e, UnexpectedEOF):
            errors.error(Span(file, _last_line(text), 1), "unexpected end of file", "is a '}' missing?")
            return False
        return True

    n_before = len(errors.diagnostics)
    try:
        tree = p.parse(text, on_error=record)
    except UnexpectedInput as e:  # unrecoverable: record it if recovery did not already
        record(e)
        return None
    except Exception:  # noqa: BLE001 - lark may fail to recover after an error it reported
        if len(errors.diagnostics) > n_before:
            return None
        raise
    if len(errors.diagnostics) > n_before or tree is None:
        return None
    try:
        return _ToAst(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _DupSection):
            errors.error(e.orig_exc.span, f"duplicate '{e.orig_exc.what}' section", "merge them into one")
            return None
        raise


def _last_line(text: str) -> int:
    return max(1, len(text.splitlines()))


def parse_expr(text: str, file: str, line: int, col: int, errors: Collector):
    """Parse one expression or edge (used by the YAML front end for string values)."""
    return _parse_value(text, file, line, col, errors)


@functools.lru_cache(maxsize=None)
def _value_parser() -> Lark:
    # The same grammar with `value` as the start rule, so YAML strings obey exactly the DSL's rules.
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, start="value", maybe_placeholders=False)


def _parse_value(text: str, file: str, line: int, col: int, errors: Collector):
    try:
        tree = _value_parser().parse(text)
    except UnexpectedInput as e:
        c = col + (getattr(e, "column", 1) or 1) - 1
        errors.error(Span(file, line, c, line, c + 1), f"cannot parse expression {text!r}",
                     "expressions use numbers, parameter names, + - * / // % ** and parentheses")
        return None
    if isinstance(tree, Token):  # a bare terminal can't happen for `value`, kept for safety
        tree = Tree("name", [tree])
    node = _ToAst(file).transform(tree)
    return _shift(node, line, col)


def _shift(node, line: int, col: int):
    """Move spans of a parsed YAML string value to its place in the YAML file."""
    import dataclasses

    def fix(s: Span | None):
        if s is None:
            return None
        return Span(s.file, line + s.line - 1, (col + s.col - 1) if s.line == 1 else s.col,
                    line + (s.end_line or s.line) - 1,
                    (col + (s.end_col or s.col) - 1) if (s.end_line or s.line) == 1 else s.end_col)

    if not dataclasses.is_dataclass(node):
        return node
    changes = {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if isinstance(v, Span):
            changes[f.name] = fix(v)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _shift(v, line, col)
    return dataclasses.replace(node, **changes)
