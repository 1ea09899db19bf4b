"""The `.bst` front end: lark (LALR, positions kept) → bstc.syntax.ast.ModelDef.

Syntax errors are collected with lark's error recovery, so a file with several broken lines
reports each of them (at most one per line, to avoid cascades). Longer than most modules
because it is one transformer over the whole grammar: a method per grammar rule."""
from __future__ import annotations

import dataclasses
import functools

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from bstc.errors import Collector, Span
from bstc.syntax import ast

KEYWORDS = ("import", "library", "model", "block", "layers", "repeat", "embed", "norm", "head", "share", "mesh", "rules", "pattern",
            "every", "from", "at")


def grammar_text() -> str:
    from bstc.zoo import package_data_dir

    return (package_data_dir("grammars") / "bstc.lark").read_text()


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
    "$END": "end of file", "<END-OF-FILE>": "end of file",
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


def _describe_token(tok: Token, p: Lark) -> str:
    """How an unexpected token is named in a message: `'{'`, `'foo'`, `number 3`, `string "x"`."""
    if tok.type == "NAME":
        return repr(str(tok))
    if tok.type in ("NUMBER", "INT"):
        return f"number {tok}"
    if tok.type == "STRING":
        return f"string {tok}"
    return _describe(tok.type, p)


def _expected_list(expected, p: Lark) -> str:
    # a name / a number first (what is usually missing), then keywords, then punctuation
    def key(d: str):
        return (0 if not d.startswith("'") else 1 if d[1:-1].isalpha() else 2, d)

    names = sorted({_describe(t, p) for t in expected if t != "$END"} or {"end of file"}, key=key)
    if len(names) > 8:
        names = names[:8] + ["…"]
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

    @v_args(meta=True)
    def edges(self, meta, children):
        return ast.Edges(tuple(children), self._s(meta))

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
        return ast.Setting(str(sub), str(param), value,
                           Span(self.file, sub.line, sub.column, param.end_line, param.end_column))

    @v_args(meta=True)
    def override(self, meta, children):
        name, index, *settings = children
        return ast.Override(str(name), int(index), tuple(settings), self._t(name))

    @v_args(meta=True)
    def binding(self, meta, children):
        letter, use = children
        return (str(letter), use, self._t(letter))

    @v_args(meta=True)
    def pattern(self, meta, children):
        letters, *bindings = children
        return ast.Pattern(str(letters)[1:-1], tuple(bindings), self._s(meta), self._t(letters))

    @v_args(meta=True)
    def every(self, meta, children):
        step, start, use = children
        return ast.Place(use, step=step, start=start, span=self._s(meta))

    def index_list(self, children):
        return ("index_list", tuple(children))

    @v_args(meta=True)
    def at(self, meta, children):
        where, use = children
        at = where[1] if isinstance(where, tuple) and where and where[0] == "index_list" else (where,)
        return ast.Place(use, at=at, span=self._s(meta))

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

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        (path,) = children
        return ast.Import(str(path)[1:-1], self._t(path))

    @v_args(meta=True)
    def library(self, meta, children):
        name, *items = children
        return ast.ModelDef(str(name), tuple(i for i in items if isinstance(i, ast.Assign)),
                            tuple(i for i in items if isinstance(i, ast.BlockDef)), (), span=self._t(name),
                            library=True)

    def start(self, children):
        *imports, top = children
        return dataclasses.replace(top, imports=tuple(imports)) if imports else top


class _DupSection(Exception):
    def __init__(self, what, span):
        self.what, self.span = what, span


# Keywords that open a section of the model; written where a statement of another section
# is expected, they usually mean that a '}' is missing above.
_SECTIONS = ("block", "layers", "mesh", "rules")
# A block may not take a keyword's name: `repeat`, `embed`, `norm`, `head` start layer statements
# and `share`, `tokens` continue them, so such a block could not be used.
RESERVED_BLOCK_NAMES = KEYWORDS + ("tokens",)


# Why an edge cannot name a sublayer of another block (`context: a.ssm -> sh`), and what to
# write instead. A block's sublayers are local to it: a block is a unit that is repeated,
# scanned (one traced body for all occurrences), shared and placed by patterns, so `a.ssm`
# would not say which occurrence of `a` is meant, and an earlier block's source output would
# have to outlive its block (carried through the scan and the decode caches).
EDGE_ACROSS_BLOCKS = "a context source must be a sublayer of this block, not 'block.sublayer'"
EDGE_ACROSS_BLOCKS_HINT = (
    "a block's sublayers are local to it (blocks are repeated, scanned and shared as units, so "
    "`block.sublayer` names no one layer); define the SSM in this block and name it alone (`ssm -> sh`), "
    "with `residual: true` if it should also join the residual stream")

_BUILTIN_HINTS = {
    "NORM": "write `norm rms`, `norm layer` or `norm none` ('norm' is a reserved word, not a block name)",
    "HEAD": "write `head tied` or `head untied` ('head' is a reserved word, not a block name)",
}


def parse_dsl(text: str, file: str, errors: Collector) -> ast.ModelDef | None:
    """Parse .bst text. Syntax errors go to `errors`; returns None if there were any.

    Recovery: lark resumes after dropping the unexpected token. Two common mistakes are
    repaired instead, so that the rest of the file parses cleanly: a keyword used as a name
    (`layers = 3`) and a missing '}' before a section (`layers {` inside a block). An error
    found before the parser made any progress since the previous one is a cascade and is not
    reported; nor is a second error on the same line."""
    p = parser()
    seen_lines: set[int] = set()
    last_state: list = [None]  # the parser's stacks at the last error
    inserted_braces = [0]  # '}' supplied by the missing-brace repair

    def record(e: UnexpectedInput) -> bool:
        line, col = getattr(e, "line", 0) or 0, getattr(e, "column", 0) or 0
        ip = getattr(e, "interactive_parser", None)
        ps = getattr(ip, "parser_state", None)
        state = (tuple(ps.state_stack), len(ps.value_stack)) if ps is not None else None
        cascade = state is not None and state == last_state[0]
        last_state[0] = state
        prev = ps.value_stack[-1] if ps is not None and ps.value_stack else None
        if not isinstance(prev, Token):
            prev = None
        if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
            # after a missing-brace repair, the end comes early only if more braces are missing
            if not cascade and (not inserted_braces[0] or len(_unclosed_braces(text)) > inserted_braces[0]):
                errors.error(_eof_span(text, file), "unexpected end of file", _eof_hint(text, e, p))
            return False
        report = line not in seen_lines and not cascade
        if report:
            seen_lines.add(line)
        if isinstance(e, UnexpectedToken):
            tok = e.token
            if prev is not None and prev.type != "NAME" and str(prev) in KEYWORDS and tok.type in ("EQUAL", "COLON"):
                # `layers = 3`: read as the keyword; report it and go on as if it were a name
                if report:
                    errors.error(_tok_span(file, prev), f"'{prev}' is a reserved word", "choose another name")
                if _repair(ip, 1, [Token.new_borrow_pos("NAME", str(prev), prev), tok]):
                    last_state[0] = None
                return True
            if prev is not None and prev.type == "NAME" and str(prev) in _SECTIONS and tok.type in ("LBRACE", "NAME"):
                # `layers {` where a sublayer or a layer statement was expected: a '}' is missing
                if report:
                    errors.error(_tok_span(file, prev), f"'{prev}' is not allowed here", "is a '}' missing above it?")
                if _repair(ip, 1, [Token.new_borrow_pos("RBRACE", "}", prev),
                                   Token.new_borrow_pos(str(prev).upper(), str(prev), prev), tok]):
                    inserted_braces[0] += 1
                    last_state[0] = None
                return True
            expected = _accepts(ip) or e.expected
            if report:
                hint = f"expected {_expected_list(expected, p)}"
                if expected and set(expected) <= {"$END", "<END-OF-FILE>"}:
                    hint = "nothing may follow the model's closing '}'"
                elif tok.type in ("LAYERS", "MESH", "RULES") and "BLOCK" in expected and tok.type not in expected:
                    # `layers { ... }` inside `library NAME { ... }`
                    hint = "a library holds parameters and blocks; the stack belongs to the models that import it"
                elif prev is not None and prev.type in ("NORM", "HEAD"):
                    hint = _BUILTIN_HINTS[prev.type]
                elif prev is not None and prev.type != "NAME" and str(prev) in KEYWORDS and "NAME" in expected:
                    hint += f" after '{prev}'"
                elif str(tok) == "." and prev is not None and prev.type == "NAME" and any(
                        p.get_terminal(t).pattern.value == "->" for t in expected if t != "$END"):
                    # `context: a.ssm -> sh`: an edge reaching into another block
                    hint = EDGE_ACROSS_BLOCKS_HINT
                message = EDGE_ACROSS_BLOCKS if hint is EDGE_ACROSS_BLOCKS_HINT else f"unexpected {_describe_token(tok, p)}"
                errors.error(Span(file, tok.line, tok.column, tok.end_line, tok.end_column), message, hint)
            # A missing name, number or ')' just before `tok`: supply it and keep `tok`.
            for missing, value in (("NAME", "_"), ("NUMBER", "1"), ("RPAR", ")")):
                if missing in expected and _repair(ip, 0, [Token.new_borrow_pos(missing, value, tok), tok]):
                    last_state[0] = None
                    break
        elif isinstance(e, UnexpectedCharacters) and report:
            ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
            hint = None
            if ch == "'":
                hint = 'strings are written in double quotes: "..."'
            elif ch == '"':
                hint = "a string must end on the line where it starts"
            errors.error(Span(file, line, col, line, col + 1), f"unexpected character {ch!r}", hint)
        return True

    n_before = len(errors.diagnostics)
    try:
        tree = p.parse(text, on_error=record)
    except UnexpectedInput as e:  # unrecoverable: record it if recovery did not already
        if len(errors.diagnostics) == n_before:
            record(e)
        return None
    except Exception:  # noqa: BLE001 - lark may fail to recover after an error it reported
        if len(errors.diagnostics) > n_before:
            return None
        raise
    if len(errors.diagnostics) > n_before or tree is None:
        return None
    if _too_deep(tree, file, errors):
        return None
    try:
        return _ToAst(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _DupSection):
            errors.error(e.orig_exc.span, f"duplicate '{e.orig_exc.what}' section", "merge them into one")
            return None
        raise


MAX_DEPTH = 200  # nesting of parentheses and operators; real models need a handful


def _too_deep(tree, file: str, errors: Collector, shift=None) -> bool:
    """Report a tree nested deeper than MAX_DEPTH (the passes recurse over it)."""
    stack = [(tree, 1, False)]
    while stack:
        node, depth, in_repeat = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta
            line, col = getattr(meta, "line", 1), getattr(meta, "column", 1)
            if shift is not None:
                line, col = shift[0] + line - 1, (shift[1] + col - 1) if line == 1 else col
            if in_repeat:
                msg, hint = "`repeat` is nested too deeply", f"at most {MAX_DEPTH} levels of nesting"
            else:
                msg, hint = "expression is nested too deeply", f"at most {MAX_DEPTH} levels of parentheses and operators"
            errors.error(Span(file, line, col, line, col + 1), msg, hint)
            return True
        stack.extend((c, depth + 1, in_repeat or node.data == "repeat") for c in node.children
                     if isinstance(c, Tree))
    return False


def _accepts(ip) -> set | None:
    """The terminals the parser really accepts here (LALR's table lists some it would reject)."""
    if ip is None:
        return None
    try:
        return ip.accepts()
    except Exception:  # noqa: BLE001 - only a better hint is lost
        return None


def _repair(ip, pop: int, tokens) -> bool:
    """Drop `pop` shifted tokens and feed `tokens` instead; all or nothing."""
    if ip is None:
        return False
    try:
        trial = ip.copy()
        st = trial.parser_state
        if len(st.value_stack) < pop or any(not isinstance(v, Token) for v in st.value_stack[len(st.value_stack) - pop:]):
            return False
        del st.state_stack[len(st.state_stack) - pop:]
        del st.value_stack[len(st.value_stack) - pop:]
        for t in tokens:
            trial.feed_token(t)
    except Exception:  # noqa: BLE001 - no repair; plain recovery goes on
        return False
    ip.parser_state.state_stack[:] = st.state_stack
    ip.parser_state.value_stack[:] = st.value_stack
    return True


def _eof_span(text: str, file: str) -> Span:
    """Just after the last character that is not white space."""
    stripped = text.rstrip()
    if not stripped:
        return Span(file, 1, 1, 1, 2)
    i = len(stripped)  # 0-based offset one past the last character
    line = stripped.count("\n") + 1
    col = i - (stripped.rfind("\n") + 1) + 1
    return Span(file, line, col, line, col + 1)


def _unclosed_braces(text: str) -> list[tuple[int, int]]:
    """(line, col) of every '{' that no '}' closes, outermost first (comments and strings skipped)."""
    stack: list[tuple[int, int]] = []
    line, col, i, n = 1, 0, 0, len(text)
    while i < n:
        c = text[i]
        col += 1
        if c == "\n":
            line, col = line + 1, 0
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j  # the newline resets the column
            continue
        elif c == '"':
            j = text.find('"', i + 1)
            k = text.find("\n", i + 1)
            end = j if j >= 0 and (k < 0 or j < k) else (k - 1 if k >= 0 else n - 1)
            col += end - i
            i = end + 1
            continue
        elif c == "{":
            stack.append((line, col))
        elif c == "}" and stack:
            stack.pop()
        i += 1
    return stack


def _eof_hint(text: str, e, p: Lark) -> str:
    open_ = _unclosed_braces(text)
    if open_:
        return f"is a '}}' missing? the '{{' on line {open_[-1][0]} is not closed"
    expected = getattr(e, "expected", None)
    return f"expected {_expected_list(expected, p)}" if expected else "the file ends too early"


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
        at = getattr(e, "pos_in_stream", None)
        if at is not None and text[at:at + 1] == "." and "->" in text[at:]:
            # `context: a.ssm -> sh`, as in a .bst file
            errors.error(Span(file, line, c, line, c + 1), EDGE_ACROSS_BLOCKS, EDGE_ACROSS_BLOCKS_HINT)
            return None
        errors.error(Span(file, line, c, line, c + 1), f"cannot parse expression {text!r}",
                     "expressions use numbers, parameter names, + - * / // % ** and parentheses")
        return None
    if isinstance(tree, Token):  # a bare terminal can't happen for `value`, kept for safety
        tree = Tree("name", [tree])
    if _too_deep(tree, file, errors, shift=(line, col)):
        return None
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
