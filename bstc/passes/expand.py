"""Expand the stack: bind block parameters, unroll repeat groups, number each block's
occurrences (`bst.0`, `bst.1`, …), evaluate every sublayer argument in its scope and apply
per-occurrence overrides. The result still needs the schema and shape checks (check.py).

One module (about 400 lines) because the stack's forms — repeats, patterns, placements,
overrides — expand in one recursive walk over one scope chain, and every form reports its
mistakes through the same located diagnostics; split, each part would re-implement the walk."""
from __future__ import annotations

from dataclasses import dataclass, field

from bstc.errors import Collector, Span, suggest, suggest_or_list
from bstc.passes.evaluate import CONTEXT_VARIANT_NAMES, Scope, Symbol, evaluate
from bstc.syntax import ast
from bstc.syntax.dsl import RESERVED_BLOCK_NAMES

UNIVERSAL_ARGS = ("norm", "placement", "residual")  # accepted by every sublayer
MAX_LAYERS = 10_000


@dataclass
class RawArg:
    value: object
    span: Span | None


@dataclass
class RawSub:
    name: str
    kind: str
    span: Span | None
    kind_span: Span | None
    args: dict  # name -> RawArg (evaluated)
    # the context edges in the order written: (ast.Edge, resolved variant str, variant span) each
    edges: tuple = ()
    context_span: Span | None = None  # the whole `context` value (one edge or the list)


@dataclass
class RawInstance:
    block: str
    index: int
    share: str | None
    span: Span | None
    subs: list
    overridden: dict = field(default_factory=dict)  # (sublayer, argument) -> span of its override


@dataclass
class Expanded:
    instances: list
    final_norm: str | None = None
    head_tied: bool = False
    builtin_spans: dict = field(default_factory=dict)


def first_defined(first: Span | None, again: Span | None) -> str:
    """The hint for a name defined twice: the first definition's line, or its file:line:col
    when the two are in different files (an imported library and the file, or two libraries)."""
    if first is None:
        return "first defined at line ?"
    if again is not None and first.file != again.file:
        return f"first defined at {first}; a name may be defined in one file only: rename or remove one"
    return f"first defined at line {first.line}"


def block_table(model: ast.ModelDef, scope: Scope, errors: Collector) -> dict[str, ast.BlockDef]:
    """The blocks by name (imported ones first), each definition checked; clashes reported."""
    blocks: dict[str, ast.BlockDef] = {}
    for b in model.blocks:
        if b.name in blocks:
            errors.error(b.span, f"block '{b.name}' is defined twice", first_defined(blocks[b.name].span, b.span))
            continue
        _check_block_def(b, errors, scope)
        blocks[b.name] = b
        if b.name in RESERVED_BLOCK_NAMES:
            errors.error(b.span, f"'{b.name}' is a reserved word and cannot name a block",
                         "choose another name: `" + b.name + "` starts or continues a statement in layers")
    return blocks


def expand(model: ast.ModelDef, scope: Scope, errors: Collector) -> Expanded:
    blocks = block_table(model, scope, errors)

    out = Expanded([])
    counters: dict[str, int] = {}
    overrides: list[ast.Override] = []
    builtins_seen: dict[str, ast.Builtin] = {}
    order: list[str] = []  # sequence of 'embed'/'block'/'norm'/'head' as written (top level)

    def walk(stmts, depth: int):
        for st in stmts:
            if len(base) > MAX_LAYERS and not isinstance(st, ast.Builtin):
                continue  # reported once below; `head` etc. are still checked
            if isinstance(st, ast.Builtin):
                if depth > 0:
                    errors.error(st.span, f"'{st.what}' cannot be inside 'repeat'")
                    continue
                if st.what in builtins_seen:
                    errors.error(st.span, f"'{st.what}' appears twice in layers")
                    continue
                builtins_seen[st.what] = st
                order.append(st.what)
                _builtin(st, out, errors)
            elif isinstance(st, ast.Repeat):
                if depth == 0:
                    order.append("block")  # even with a bad count: "no blocks" would only repeat it
                n = _positive_int(st.count, st.span, scope, errors, "repeat count must be a positive integer")
                if n is None:
                    continue
                if n > MAX_LAYERS:
                    errors.error(st.count.span or st.span, f"repeat count {n} is too large (at most {MAX_LAYERS})")
                    continue
                for _ in range(n):
                    if len(base) > MAX_LAYERS:
                        break
                    walk(st.body, depth + 1)
            elif isinstance(st, ast.Override):
                overrides.append(st)
            elif isinstance(st, ast.Place):
                if depth > 0:
                    errors.error(st.span, "a placement (`every`, `at`) cannot be inside 'repeat'",
                                 "write it at the top level of layers: it places into the whole stack")
                    continue
                placements.append(st)
            elif isinstance(st, ast.Pattern):
                if depth == 0:
                    order.append("block")
                for use in _pattern_uses(st, errors):
                    if len(base) > MAX_LAYERS:
                        break
                    base.append(use)
            elif isinstance(st, ast.Use):
                if depth == 0:
                    order.append("block")
                base.append(st)

    # The stack as written (repeats and patterns expanded), then the placements, then the
    # blocks instantiated in their final order, so occurrence numbers follow the final stack.
    base: list[ast.Use] = []
    placements: list[ast.Place] = []
    walk(model.layers, 0)
    if len(base) > MAX_LAYERS:
        errors.error(model.layers_span, f"the stack has more than {MAX_LAYERS} blocks")
        base = base[:MAX_LAYERS + 1]
    _place(base, placements, scope, errors)
    for st in base:
        b = blocks.get(st.block)
        if b is None:
            errors.error(st.span, f"unknown block '{st.block}'", suggest_or_list(st.block, blocks, "defined blocks"))
            continue
        idx = counters.get(st.block, 0)
        counters[st.block] = idx + 1
        inst = _instantiate(b, st, idx, scope, errors)
        if inst is not None:
            out.instances.append(inst)
    _check_order(order, builtins_seen, model, errors)
    out.builtin_spans = {k: v.span for k, v in builtins_seen.items()}

    by_name = {(i.block, i.index): i for i in out.instances}
    for ov in overrides:
        inst = by_name.get((ov.block, ov.index))
        if inst is None:
            n = counters.get(ov.block, 0)
            if ov.block not in blocks:
                errors.error(ov.span, f"unknown block '{ov.block}'", suggest_or_list(ov.block, blocks, "defined blocks"))
            else:
                errors.error(ov.span, f"block '{ov.block}' has no occurrence {ov.index}",
                             f"occurrences are {ov.block}.0 … {ov.block}.{n - 1}" if n else f"'{ov.block}' is never used")
            continue
        _apply_override(inst, ov, blocks[ov.block], scope, errors)
    return out


def _pattern_uses(p: ast.Pattern, errors: Collector) -> list[ast.Use]:
    """One block use per letter (spaces are ignored); an unbound letter is located in the string."""
    bound: dict[str, tuple[ast.Use, Span | None]] = {}
    for letter, use, span in p.bindings:
        if len(letter) != 1:
            errors.error(span, f"a pattern binds single letters, got '{letter}'", "e.g. `L = local`")
        elif letter in bound:
            errors.error(span, f"letter '{letter}' is bound twice in this pattern",
                         f"first at line {bound[letter][1].line if bound[letter][1] else '?'}")
        else:
            bound[letter] = (use, span)
    out, used, bad = [], set(), False
    for i, c in enumerate(p.letters):
        if c.isspace():
            continue
        if c not in bound:
            sp = p.letters_span
            where = Span(sp.file, sp.line, sp.col + 1 + i, sp.line, sp.col + 2 + i) if sp else p.span
            errors.error(where, f"letter '{c}' of the pattern is not bound to a block",
                         suggest(c, bound) or f"bind '{c}' to a block next to the pattern")
            bad = True
            continue
        used.add(c)
        out.append(bound[c][0])
    if not out and not bad:
        errors.error(p.letters_span or p.span, "the pattern is empty", 'write one letter per block, e.g. "LLBL"')
    for letter, (_, span) in bound.items():
        if letter not in used and not bad:
            errors.error(span, f"letter '{letter}' is bound but not used in the pattern", "remove it")
    return out


def _positive_int(expr, fallback_span, scope: Scope, errors: Collector, message: str) -> int | None:
    """The value of a count or step: a positive integer (a whole float is accepted), else None
    after reporting `message, got …` at the expression."""
    v = evaluate(expr, scope, errors)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        errors.error(expr.span or fallback_span, f"{message}, got {v!r}")
        return None
    return v


def _index(v, n: int, span, what: str, errors: Collector) -> int | None:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        errors.error(span, f"{what} must be an integer, got {v!r}")
        return None
    if not -n <= v < n:
        errors.error(span, f"{what} {v} is outside the stack of {n} blocks",
                     f"positions are 0 … {n - 1}, or -{n} … -1 from the end")
        return None
    return v % n


def _place(base: list, placements: list, scope: Scope, errors: Collector) -> None:
    """Replace blocks of `base` in place; a position claimed twice is an error."""
    n = len(base)
    claimed: dict[int, ast.Place] = {}
    for pl in placements:
        if pl.step is not None:
            step = _positive_int(pl.step, pl.span, scope, errors, "`every` needs a positive integer step")
            start = evaluate(pl.start, scope, errors)
            if step is None or start is None:
                continue
            first = _index(start, n, pl.start.span or pl.span, "`from`", errors)
            if first is None:
                continue
            positions = list(range(first, n, step))
        else:
            positions = []
            for e in pl.at:
                v = evaluate(e, scope, errors)
                i = None if v is None else _index(v, n, e.span or pl.span, "position", errors)
                if i is not None:
                    positions.append(i)
        for i in positions:
            if i in claimed:
                first = claimed[i].span
                errors.error(pl.span, f"position {i} of the stack is placed twice",
                             f"the first placement is at line {first.line if first else '?'}; keep one")
                break
            claimed[i] = pl
            base[i] = pl.use


def _check_block_def(b: ast.BlockDef, errors: Collector, scope: Scope) -> None:
    names: dict[str, ast.SubDef] = {}
    for s in b.subs:
        if s.name in names:
            errors.error(s.span, f"sublayer '{s.name}' is defined twice in block '{b.name}'",
                         f"first defined at line {names[s.name].span.line if names[s.name].span else '?'}")
        names[s.name] = s
        seen_args = set()
        for a in s.args:
            if a.name in seen_args:
                errors.error(a.span, f"argument '{a.name}' is given twice",
                             "give several context sources as one list: `context: [ssm -> mf, conv -> sh]`"
                             if a.name == "context" else None)
            seen_args.add(a.name)
    seen = set()
    used = {n.id for s in b.subs for a in s.args for n in ast.names_in(a.value)}
    for p in b.params:
        if p.name in seen:
            errors.error(p.span, f"block parameter '{p.name}' is declared twice")
        seen.add(p.name)
        if p.name in CONTEXT_VARIANT_NAMES:
            errors.error(p.span, f"'{p.name}' names a context variant and cannot name a parameter",
                         "choose another name, e.g. `context`")
        elif p.name not in used:
            found, _ = scope.lookup(p.name)
            hint = (f"'{p.name}' is a model parameter, which a block cannot change: pass the value to a "
                    "sublayer argument that takes it, or remove it" if found
                    else "use it in a sublayer's arguments, or remove it")
            errors.error(p.span, f"block parameter '{p.name}' is never used in block '{b.name}'", hint)
    if not b.subs:
        errors.error(b.span, f"block '{b.name}' has no sublayers")


def _builtin(st: ast.Builtin, out: Expanded, errors: Collector) -> None:
    if st.what == "embed":
        if st.arg not in (None, "tokens"):
            errors.error(st.arg_span, f"unknown embedding '{st.arg}'", "write `embed` or `embed tokens`")
    elif st.what == "norm":
        if st.arg not in ("rms", "layer", "none"):
            errors.error(st.arg_span or st.span, f"unknown norm '{st.arg}'",
                         suggest_or_list(str(st.arg), ("rms", "layer", "none"), "norms"))
        else:
            out.final_norm = None if st.arg == "none" else st.arg
    elif st.what == "head":
        if st.arg not in ("tied", "untied"):
            errors.error(st.arg_span or st.span, f"unknown head '{st.arg}'",
                         suggest_or_list(str(st.arg), ("tied", "untied"), "heads"))
        else:
            out.head_tied = st.arg == "tied"


def _check_order(order, seen, model, errors: Collector) -> None:
    if not model.layers:
        if model.layers_span is None:
            errors.error(model.span, f"model '{model.name}' has no layers section",
                         "add `layers { embed; ...; head tied }`")
        else:
            errors.error(model.layers_span, "the layers section is empty", "write `layers { embed; ...; head tied }`")
        return
    if "embed" not in seen:
        errors.error(model.layers_span or model.span, "layers must start with `embed`")
    elif order[0] != "embed":
        errors.error(seen["embed"].span, "`embed` must be the first entry of layers")
    if "head" not in seen:
        errors.error(model.layers_span or model.span, "layers must end with `head tied` or `head untied`")
    elif order[-1] != "head":
        errors.error(seen["head"].span, "`head` must be the last entry of layers")
    if "norm" in seen and "head" in seen and order.index("norm") > order.index("head"):
        errors.error(seen["norm"].span, "the final `norm` must come before `head`")
    if "block" not in order:
        errors.error(model.layers_span or model.span, "the stack has no blocks")


def _instantiate(b: ast.BlockDef, use: ast.Use, idx: int, scope: Scope, errors: Collector):
    declared = {p.name: p for p in b.params}
    bound: dict = {}
    for a in use.args:
        if a.name not in declared:
            hint = suggest(a.name, declared) or (
                f"block '{b.name}' takes: {', '.join(declared)}" if declared else f"block '{b.name}' takes no parameters")
            errors.error(a.span, f"block '{b.name}' has no parameter '{a.name}'", hint)
            continue
        if a.name in bound:
            errors.error(a.span, f"parameter '{a.name}' is given twice")
            continue
        bound[a.name] = evaluate(a.value, scope, errors)
    ok = True
    for p in b.params:
        if p.name not in bound:
            if p.default is None:
                errors.error(use.span, f"block '{b.name}' needs parameter '{p.name}'",
                             f"write `{b.name}({p.name} = ...)`")
                ok = False
                continue
            bound[p.name] = evaluate(p.default, scope, errors)
    if not ok:
        return None
    inner = Scope({k: v for k, v in bound.items() if k not in CONTEXT_VARIANT_NAMES}, scope)  # reported
    given_spans = {a.name: a.span for a in use.args if a.name in declared}
    subs = []
    for s in b.subs:
        args = {}
        edges, context_span = (), None
        for a in s.args:
            if ast.edges_of(a.value) is not None:
                if a.name != "context":
                    errors.error(a.value.span, f"a context edge can only be given as 'context', not '{a.name}'")
                    args[a.name] = RawArg(None, a.span)  # reported; not "missing" as well
                    continue
                edges, context_span = tuple(_edge(e, inner) for e in ast.edges_of(a.value)), a.value.span
                continue
            # A value that comes from an argument given at this use (`b(w = 7)`) is reported
            # there: that is where the user wrote the number the error is about.
            given = [given_spans[n.id] for n in ast.names_in(a.value) if n.id in given_spans]
            args[a.name] = RawArg(evaluate(a.value, inner, errors), given[0] if given else a.span)
        subs.append(RawSub(s.name, s.kind, s.span, s.kind_span, args, edges, context_span))
    return RawInstance(b.name, idx, use.share, use.span, subs)


def _edge(e: ast.Edge, inner: Scope) -> tuple:
    """(edge, its variant resolved in the block's scope, where to report the variant)."""
    found, var = inner.lookup(e.variant)
    variant = str(var) if found and var is not None else e.variant
    # a variant that came through a block parameter is reported where it was given
    vspan = getattr(var, "span", None) if found and isinstance(var, Symbol) else None
    return (e, variant, vspan or e.variant_span)


def _apply_override(inst: RawInstance, ov: ast.Override, b: ast.BlockDef, scope: Scope, errors: Collector) -> None:
    subs = {s.name: s for s in inst.subs}
    for st in ov.settings:
        s = subs.get(st.sub)
        if s is None:
            errors.error(st.span, f"block '{b.name}' has no sublayer '{st.sub}'", suggest_or_list(st.sub, subs, "sublayers"))
            continue
        if st.param == "context":
            errors.error(st.span, "a per-occurrence override cannot change a context edge",
                         f"give block '{b.name}' a variant parameter (`block {b.name}(context = sh)` with "
                         f"`src -> context`) and write `{b.name}(context = none)` for this occurrence")
            continue
        key = (st.sub, st.param)
        if key in inst.overridden:
            errors.error(st.span, f"{b.name}.{inst.index} {st.sub}.{st.param} is overridden twice",
                         f"first at line {inst.overridden[key].line}; keep one")
            continue
        inst.overridden[key] = st.span
        v = evaluate(st.value, scope, errors)
        s.args[st.param] = RawArg(v, st.span)

