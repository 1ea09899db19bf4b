"""Check every sublayer against its layer kind: arguments against the schema, context edges
against the block's order and the variant's shape rules, and shapes through the stack.
Produces the frozen IR (bstc.ir.Model). All problems are collected, none raised here."""
from __future__ import annotations

from bstc import ir
from bstc.errors import Collector, suggest, suggest_or_list
from bstc.ops import REGISTRY, Dims
from bstc.ops.base import Param
from bstc.passes.evaluate import Symbol, describe
from bstc.passes.expand import UNIVERSAL_ARGS, Expanded, RawInstance, RawSub

VARIANTS = ("sh", "mh", "mf", "none")


def check(name: str, params: dict, dims: Dims, ex: Expanded, errors: Collector, file: str, text: str,
          mesh=None, shallow: bool = False) -> ir.Model | None:
    instances = []
    for raw in ex.instances:
        inst = _check_instance(raw, params, dims, errors, shallow)
        if inst is not None:
            instances.append(inst)
    _check_shares(instances, errors)
    if errors:
        return None
    return ir.Model(name=name, params=params, dims=dims, layers=tuple(instances),
                    final_norm=ex.final_norm, head_tied=ex.head_tied, mesh=mesh, file=file, source_text=text)


def _check_instance(raw: RawInstance, params: dict, dims: Dims, errors: Collector, shallow: bool = False):
    n_before = errors.reported
    defined: dict[str, RawSub] = {}
    consumed: set[str] = set()
    out = []
    outputs: dict[str, tuple] = {}  # sublayer -> (op, args, filters)
    for sub in raw.subs:
        op = REGISTRY.get(sub.kind)
        if op is None:
            errors.error(sub.kind_span, f"unknown layer kind '{sub.kind}'",
                         suggest_or_list(sub.kind, REGISTRY, "layer kinds"))
            defined[sub.name] = sub
            continue
        universal = {k: sub.args.pop(k) for k in UNIVERSAL_ARGS if k in sub.args}
        args = _check_args(op, sub, errors, params)
        ctx, kept = _check_edges(sub, op, raw, defined, outputs, consumed, errors)
        if args is not None:
            if shallow:
                _run_size_free_checks(op, sub, args, ctx, kept, errors)
            if shallow or _run_op_check(op, sub, args, dims, ctx, kept, errors):
                outputs[sub.name] = (op, args, op.filters(args, dims))
        defined[sub.name] = sub
        out.append((sub, op, args, ctx, universal))

    # A source whose edge is `none` carries nothing: drop it (unless something else uses it).
    used = {e.source for (_, _, _, c, _) in out if c is not None for e in (c if isinstance(c, tuple) else (c,))}
    subs = []
    for sub, op, args, ctx, universal in out:
        if sub.name in consumed and sub.name not in used and "residual" not in universal:
            continue
        if op is None or args is None:
            continue
        norm = _universal(universal, "norm", params["norm"], ("rms", "layer", "none"), errors)
        placement = _universal(universal, "placement", params["placement"], ("pre", "post"), errors)
        residual = _universal(universal, "residual", sub.name not in consumed, (True, False), errors)
        if not residual and placement == "post":
            norm = "none"  # a post-norm normalises the residual stream after the add: with no add it never runs
        shape = op.out_shape(args, dims)
        if residual and not shallow and tuple(shape) != ("B", dims.seq_len, dims.d_model):
            span, hint = sub.span, "feed it to block_attention with a context edge, or give it `filters: 1`"
            width = getattr(op, "width_arg", None)  # the argument that sets the output width, if any
            if width and len(shape) == 3:
                if width in sub.args and sub.args[width].span is not None:
                    span = sub.args[width].span
                hint = f"only a d_model-wide output joins the residual stream: use `{width}: 0` (= d_model)"
            errors.error(span, f"sublayer '{sub.name}' outputs {ir.fmt_shape(shape)}, which cannot join the "
                         f"residual stream ({ir.fmt_shape(('B', dims.seq_len, dims.d_model))})", hint)
        subs.append(ir.Sublayer(sub.name, sub.kind, tuple(sorted(args.items())), norm, placement, bool(residual),
                                ctx, tuple(shape), span=sub.span,
                                arg_spans=tuple((k, a.span) for k, a in sub.args.items())))
    if not any(s.residual for s in subs) and subs and errors.reported == n_before:
        errors.error(raw.span, f"block '{raw.block}' adds nothing to the residual stream",
                     "at least one sublayer must have residual: true")
    if errors.reported > n_before:
        return None
    return ir.BlockInstance(raw.block, raw.index, tuple(subs), raw.share, span=raw.span)


DUPLICATE_SOURCE_HINT = ("each source gives one context set; name it once (for more context vectors give it "
                         "more filters with `-> mf`)")


def _check_edges(sub: RawSub, op, raw: RawInstance, defined: dict, outputs: dict, consumed: set, errors: Collector):
    """A sublayer's context edges, each checked as the only one would be: (the IR's context —
    None, one Edge, or a tuple of them in the order written —, the AST edges it keeps). An edge
    whose variant is `none` is dropped with its source (the paper's ablation)."""
    if not sub.edges:
        return None, []
    if not op.accepts_context:
        errors.error(sub.context_span, f"layer kind '{sub.kind}' does not take a context edge",
                     "context edges feed block_attention")
        return None, []
    kept, named = [], set()
    for edge_ast, variant, vspan in sub.edges:
        src = edge_ast.source
        if src in named:
            errors.error(edge_ast.source_span, f"context source '{src}' is named twice in the context of "
                         f"'{sub.name}'", DUPLICATE_SOURCE_HINT)
            continue
        named.add(src)
        if src == sub.name:
            errors.error(edge_ast.source_span, f"sublayer '{sub.name}' cannot be its own context source")
        elif src not in defined:
            later = [s for s in raw.subs if s.name == src]
            if later:
                errors.error(edge_ast.source_span,
                             f"context source '{src}' is defined after '{sub.name}' in block '{raw.block}'",
                             f"move `{src} = ...` above `{sub.name} = ...`: a context source must precede its use")
            else:
                names = ", ".join(f"{s} (line {defined[s].span.line})" if defined[s].span else s for s in defined)
                hint = "; ".join(h for h in (suggest(src, defined), f"defined here: {names}" if names else None) if h)
                errors.error(edge_ast.source_span, f"context source '{src}' is not defined in block '{raw.block}'",
                             hint or None)
        elif variant not in VARIANTS:
            errors.error(vspan, f"unknown context variant '{variant}'", suggest_or_list(variant, VARIANTS, "variants"))
        elif src not in outputs:
            pass  # the source itself had errors
        elif not outputs[src][0].context_source:
            errors.error(edge_ast.source_span, f"'{src}' ({defined[src].kind}) cannot be a context source",
                         "context sources are SSM sublayers such as s4d or long_conv")
        else:
            consumed.add(src)  # with `none` as well: the source is dropped below
            if variant != "none":
                kept.append((ir.Edge(src, variant, outputs[src][2]), edge_ast))
    edges = tuple(e for e, _ in kept)
    ctx = None if not edges else edges[0] if len(edges) == 1 else edges
    return ctx, [a for _, a in kept]


def _universal(universal: dict, key: str, default, allowed, errors: Collector):
    if key not in universal:
        return default
    a = universal[key]
    v = a.value
    if isinstance(v, Symbol):
        v = str(v)
    if v not in allowed:
        shown = ", ".join("true" if x is True else "false" if x is False else str(x) for x in allowed)
        errors.error(a.span, f"'{key}' must be one of {shown}, got {describe(a.value)}")
        return default
    return v


def _check_args(op, sub: RawSub, errors: Collector, names=()) -> dict | None:
    schema: dict[str, Param] = {p.name: p for p in op.params}
    ok = True
    out = {}
    misspelled = set()  # required parameters an unknown key was suggested for: not "missing" too
    for k, a in sub.args.items():
        p = schema.get(k)
        if p is None and k == "context" and op.accepts_context:
            errors.error(a.span, "'context' takes an edge `source -> variant`, or a list of them",
                         "e.g. `context: ssm -> sh` or `context: [ssm -> mf, conv -> sh]`")
            ok = False
            continue
        if p is None:
            allowed = list(schema) + list(UNIVERSAL_ARGS) + (["context"] if op.accepts_context else [])
            hint = suggest_or_list(k, allowed, "parameters")
            errors.error(a.span, f"layer kind '{op.kind}' has no parameter '{k}'", hint)
            close = suggest(k, schema)
            if close:
                misspelled.add(close.split("'")[1])
            ok = False
            continue
        if a.value is None:  # evaluation already reported
            ok = False
            continue
        v = _coerce(p, a.value)
        if v is _BAD:
            errors.error(a.span, f"'{k}' of {op.kind} must be {_type_name(p)}, got {describe(a.value)}",
                         _value_hint(p, a.value, sub, names))
            ok = False
            continue
        msg = _range_problem(p, v)
        if msg:
            errors.error(a.span, f"'{k}' of {op.kind} {msg}", suggest(str(v), p.choices) if p.choices else None)
            ok = False
            continue
        out[k] = v
    for p in op.params:
        if p.name not in out and p.name not in sub.args:
            if p.required and p.name not in misspelled:
                errors.error(sub.span, f"{op.kind} '{sub.name}' needs parameter '{p.name}'",
                             f"e.g. `{sub.name} = {op.kind}({p.name}: ...)`" + (f" — {p.doc}" if p.doc else ""))
                ok = False
            elif p.required:
                ok = False
            else:
                out[p.name] = p.default
    return out if ok else None


_BAD = object()


def _coerce(p: Param, v):
    if p.type is bool:
        return v if isinstance(v, bool) else _BAD
    if p.type is int:
        if isinstance(v, bool):
            return _BAD
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return _BAD
    if p.type is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return _BAD
        return float(v)
    if p.type is str:
        return str(v) if isinstance(v, str) else _BAD
    return v


def _type_name(p: Param) -> str:
    if p.choices:
        return "one of " + ", ".join(p.choices)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a name"}.get(p.type, str(p.type))


def _value_hint(p: Param, v, sub: RawSub, names=()):
    if isinstance(v, Symbol) and p.type in (int, float):
        close = suggest(v, names)
        return f"'{v}' is not a parameter" + (f"; {close}" if close else "")
    if isinstance(v, Symbol) and p.choices:
        return suggest(str(v), p.choices)
    return None


def _range_problem(p: Param, v) -> str | None:
    if p.choices and v not in p.choices:
        return f"must be one of {', '.join(p.choices)}, got '{v}'"
    if p.min is not None and v < p.min:
        return f"must be ≥ {p.min:g}, got {v}"
    if p.max is not None and v > p.max:
        return f"must be ≤ {p.max:g}, got {v}"
    return None


# Two consistent sets of model sizes with nothing in common. While the model's own sizes are
# broken (d_model not divisible by heads, ...), an op's problem that it reports under both, in
# the same words, does not come from the sizes (an odd s4d state, a context variant that does
# not fit its source): it is reported with the size errors instead of after they are fixed.
_SIZE_PROBES = (Dims(vocab=256, d_model=64, heads=2, window=8, seq_len=64),
                Dims(vocab=1000, d_model=1536, heads=12, window=24, seq_len=4800))


def _run_size_free_checks(op, sub: RawSub, args: dict, ctx, kept: list, errors: Collector) -> None:
    spec = _context_spec(ctx)
    first, second = (op.check(args, d, spec) for d in _SIZE_PROBES)
    again = {(p.message, p.arg, p.edge) for p in second}
    _report(sub, [p for p in first if (p.message, p.arg, p.edge) in again], kept, errors)


def _context_spec(ctx):
    return None if ctx is None else ctx.spec if isinstance(ctx, ir.Edge) else tuple(e.spec for e in ctx)


def _run_op_check(op, sub: RawSub, args: dict, dims: Dims, ctx, kept: list, errors: Collector) -> bool:
    problems = op.check(args, dims, _context_spec(ctx))
    _report(sub, problems, kept, errors)
    return not problems


def _report(sub: RawSub, problems, kept: list, errors: Collector) -> None:
    for pr in problems:
        span = sub.span
        if pr.arg is not None and pr.arg in sub.args and sub.args[pr.arg].span is not None:
            span = sub.args[pr.arg].span
        elif pr.arg == "context" and kept:
            span = kept[pr.edge or 0].span  # the edge the problem is about
        errors.error(span, pr.message, pr.hint)


def _check_shares(instances, errors: Collector) -> None:
    groups: dict[str, ir.BlockInstance] = {}
    for inst in instances:
        if inst.share is None:
            continue
        first = groups.setdefault(inst.share, inst)
        if first is not inst and first.signature != inst.signature:
            errors.error(inst.span, f"share group '{inst.share}' mixes different layers",
                         f"{inst.name} differs from {first.name}; shared weights need identical blocks and arguments")
