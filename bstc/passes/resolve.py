"""Resolve the top-level parameters: apply outside overrides, evaluate in order, check the
model-family rules (positive sizes, seq_len % window, d_model % heads), and build Dims."""
from __future__ import annotations

from dataclasses import dataclass

from bstc.errors import Collector, Span, suggest
from bstc.ops.base import Dims
from bstc.passes.evaluate import CONTEXT_VARIANT_NAMES, Scope, Symbol, describe, evaluate
from bstc.passes.expand import first_defined
from bstc.syntax import ast

REQUIRED_PARAMS = ("vocab", "d_model", "heads", "window", "seq_len")

# Model-wide settings every model has, with their defaults and allowed values.
SETTINGS = {
    "dtype": ("float32", ("float32", "bfloat16")),
    "param_dtype": ("float32", ("float32", "bfloat16")),
    "norm": ("rms", ("rms", "layer", "none")),
    "placement": ("pre", ("pre", "post")),
}
DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16"}


@dataclass
class Resolved:
    params: dict
    scope: Scope
    dims: Dims | None
    spans: dict  # param name -> Span of its definition


SET_FILE = "<--set>"


def override_exprs(overrides, errors: Collector) -> dict[str, ast.Assign]:
    """`--set k=v` strings or a dict of Python values → Assign nodes.

    The overrides are located in a pseudo-file '<--set>' with one line `k=v` per override, so a
    diagnostic about an override shows it with a caret like any model-file line."""
    from bstc.syntax.dsl import parse_expr

    out = {}
    lines = []
    for i, (k, v) in enumerate((overrides or {}).items(), start=1):
        k = str(k)
        if isinstance(v, bool):
            shown = "true" if v else "false"
        elif isinstance(v, (int, float, str)):
            shown = str(v).replace("\n", " ")
        else:
            shown = repr(v)
        lines.append(f"{k}={shown}")
        col = len(k) + 2
        name_span = Span(SET_FILE, i, 1, i, col - 1)
        span = Span(SET_FILE, i, col, i, col + max(len(shown), 1))
        if isinstance(v, bool):
            expr = ast.Name(shown, span)
        elif isinstance(v, (int, float)):
            expr = ast.Num(v, span)
        elif isinstance(v, str):
            expr = parse_expr(shown, SET_FILE, i, col, errors)
            if expr is None:
                continue
        else:
            errors.error(span, f"--set {k}: unsupported value {v!r}", "give a number, a name or an expression")
            continue
        out[k] = ast.Assign(k, expr, name_span)
    errors.sources[SET_FILE] = "\n".join(lines)
    return out


def fresh_parameter(a: ast.Assign, seen: dict, errors: Collector) -> bool:
    """True for a parameter that may be defined here; False, with the error, for one defined
    twice (`seen`: name → the first definition's span, updated) or named like a context variant."""
    if a.name in seen:
        errors.error(a.span, f"parameter '{a.name}' is defined twice", first_defined(seen[a.name], a.span))
        return False
    seen[a.name] = a.span
    if a.name in CONTEXT_VARIANT_NAMES:
        errors.error(a.span, f"'{a.name}' names a context variant and cannot name a parameter",
                     "choose another name")
        return False
    return True


def resolve(model: ast.ModelDef, overrides, errors: Collector) -> Resolved:
    over = override_exprs(overrides, errors)
    defined = {a.name for a in model.assigns}
    for k in over:
        if k not in defined and k not in SETTINGS:
            hint = suggest(k, defined | set(SETTINGS)) or ("parameters: " + ", ".join(sorted(defined)))
            errors.error(over[k].span, f"--set {k}: the model has no parameter '{k}'", hint)

    scope = Scope({})
    spans: dict = {}
    seen: dict = {}
    pending_later = {a.name: a for a in model.assigns}
    for a in model.assigns:
        if not fresh_parameter(a, seen, errors):
            continue
        expr = over[a.name].value if a.name in over else a.value
        if _check_forward_refs(expr, scope, pending_later, a.name, errors, a.span):
            v = evaluate(expr, scope, errors)
        else:
            v = None
        if isinstance(v, str) and not isinstance(v, Symbol) and a.name not in SETTINGS:
            pass  # string parameters are allowed (used as enum values)
        scope.values[a.name] = v
        spans[a.name] = over[a.name].span if a.name in over else a.span  # where its value was written
    for k, (default, _) in SETTINGS.items():
        if k not in scope.values:
            scope.values[k] = evaluate(over[k].value, scope, errors) if k in over else default
            if k in over:
                spans[k] = over[k].span
    params = dict(scope.values)

    ok = True
    for k in REQUIRED_PARAMS:
        if k not in params:
            errors.error(model.span, f"model '{model.name}' does not define '{k}'",
                         f"add `{k} = ...` at the top of the model")
            ok = False
            continue
        v = params[k]
        if v is None:
            ok = False
            continue
        if isinstance(v, float) and v.is_integer():
            v = params[k] = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            errors.error(spans.get(k), f"'{k}' must be a positive integer, got {describe(v)}")
            scope.values[k] = None  # reported: its uses stay quiet
            ok = False
    for k, (_, allowed) in SETTINGS.items():
        given = params.get(k)
        v = given
        if isinstance(v, str):
            v = params[k] = DTYPE_ALIASES.get(str(v), str(v))
        if v not in allowed:
            errors.error(spans.get(k), f"'{k}' must be one of {', '.join(allowed)}, got {describe(given)}",
                         suggest(str(v), allowed))
            ok = False
    dims = None
    if ok:
        if params["seq_len"] % params["window"]:
            errors.error(spans.get("seq_len"),
                         f"seq_len ({params['seq_len']}) is not divisible by window ({params['window']})",
                         _divisible_hint(params["seq_len"], params["window"], "seq_len"))
            ok = False
        if params["d_model"] % params["heads"]:
            errors.error(spans.get("d_model"),
                         f"d_model ({params['d_model']}) is not divisible by heads ({params['heads']})",
                         _divisible_hint(params["d_model"], params["heads"], "d_model"))
            ok = False
    if ok:
        dims = Dims(vocab=params["vocab"], d_model=params["d_model"], heads=params["heads"],
                    window=params["window"], seq_len=params["seq_len"], dtype=params["dtype"],
                    param_dtype=params["param_dtype"], extra=params)
    for k, v in params.items():
        if isinstance(v, Symbol):  # plain enum-like values are kept as str in the IR
            params[k] = str(v)
    return Resolved(params, scope, dims, spans)


def _divisible_hint(n: int, d: int, what: str) -> str:
    lo, hi = (n // d) * d, (n // d + 1) * d
    return f"try {what} = {lo} or {hi}" if lo > 0 else f"try {what} = {hi}"


def _check_forward_refs(expr, scope: Scope, later: dict, current: str, errors: Collector, where=None) -> bool:
    """A parameter may only use parameters defined above it (order is meaning). `where`: the
    parameter's definition, when `expr` comes from a --set override."""
    ok = True
    for node in ast.names_in(expr):
        if node.id in later and not scope.lookup(node.id)[0]:
            ok = False
            from_set = node.span is not None and node.span.file == SET_FILE
            if node.id == current:
                errors.error(node.span, f"parameter '{current}' refers to itself",
                             f"an override replaces '{current}'; it cannot use the value it replaces"
                             if from_set else None)
            elif from_set:
                errors.error(node.span, f"parameter '{node.id}' is used before it is defined",
                             f"an override is evaluated where '{current}' is defined"
                             + (f" (line {where.line})" if where is not None else "")
                             + f", above `{node.id} = ...`")
            else:
                errors.error(node.span, f"parameter '{node.id}' is used before it is defined",
                             f"move `{node.id} = ...` above line {node.span.line if node.span else '?'}")
    return ok

