"""Evaluate expression ASTs in a scope of named values.

A name that is not a parameter evaluates to a Symbol (an enum value such as `gelu` or `sh`);
whether a symbol is acceptable is decided later by the schema, which then can say "unknown
parameter 'd_modl' — did you mean 'd_model'?"."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bstc.errors import Collector, Span, suggest
from bstc.syntax import ast


# Names an edge's variant may take (`ssm -> sh`): a parameter of one of these names would
# silently capture the variant, so none may be declared.
CONTEXT_VARIANT_NAMES = ("sh", "mh", "mf", "none")


class Symbol(str):
    """An identifier that named no parameter: an enum value, or a typo."""

    span: Span | None = None

    def __new__(cls, value: str, span: Span | None = None):
        s = super().__new__(cls, value)
        s.span = span
        return s


@dataclass
class Scope:
    values: dict
    parent: "Scope | None" = None

    def lookup(self, name: str):
        s = self
        while s is not None:
            if name in s.values:
                return True, s.values[name]
            s = s.parent
        return False, None

    def names(self) -> set[str]:
        out, s = set(), self
        while s is not None:
            out |= set(s.values)
            s = s.parent
        return out


class _Fail(Exception):
    pass


# One limit for every number from every source (a literal, an expression, a `--set`, a Python
# override): no size in a model gets near it, and checking it before `**` is computed means no
# expression can take long to evaluate.
NUMBER_LIMIT = 10**18


_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "**": lambda a, b: a ** b,
}


def evaluate(expr, scope: Scope, errors: Collector):
    """Value of `expr` (int, float, bool, str, Symbol); None after reporting an error."""
    try:
        return _eval(expr, scope, errors)
    except _Fail:
        return None


def _eval(e, scope: Scope, errors: Collector):
    if isinstance(e, ast.Num):
        return _checked(e.value, e, errors)
    if isinstance(e, ast.Str):
        return e.value
    if isinstance(e, ast.Name):
        if e.id == "true":
            return True
        if e.id == "false":
            return False
        found, v = scope.lookup(e.id)
        if found:
            if v is None:  # the parameter itself failed to evaluate; it was reported already
                raise _Fail
            return v
        return Symbol(e.id, e.span)
    if isinstance(e, ast.Neg):
        v = _eval(e.operand, scope, errors)
        _need_number(v, e.operand, scope, errors)
        return -v
    if isinstance(e, ast.BinOp):
        a = _eval(e.left, scope, errors)
        b = _eval(e.right, scope, errors)
        _need_number(a, e.left, scope, errors)
        _need_number(b, e.right, scope, errors)
        if e.op in ("/", "//", "%") and b == 0:
            errors.error(e.span, "division by zero")
            raise _Fail
        if e.op == "**":
            _check_power(a, b, e, errors)
        try:
            r = _OPS[e.op](a, b)
        except OverflowError:
            errors.error(e.span, "number too large", "numbers are limited to 10^18")
            raise _Fail from None
        return _checked(r, e, errors)
    if isinstance(e, (ast.Edge, ast.Edges)):
        errors.error(e.span, "a context edge is only allowed as the 'context' argument of a sublayer")
        raise _Fail
    raise TypeError(f"not an expression: {e!r}")


def _check_power(a, b, node, errors: Collector) -> None:
    """Refuse a power before computing it: `10 ** 10 ** 10` would otherwise run for ever."""
    if a == 0 and b < 0:
        errors.error(node.span, "division by zero", "zero has no negative powers")
        raise _Fail
    if a < 0 and b != int(b):
        errors.error(node.span, "a negative number to a fractional power is not a real number")
        raise _Fail
    if a != 0 and b * math.log2(abs(a)) > 60:  # 2^60 ≈ 1.15e18: the result is over the limit
        errors.error(node.span, "number too large", "numbers are limited to 10^18")
        raise _Fail


def _checked(v, node, errors: Collector):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, complex):
            errors.error(node.span, "expression is not a real number")
            raise _Fail
        return v
    if isinstance(v, float) and not math.isfinite(v):
        errors.error(node.span, "expression is not a finite number")
        raise _Fail
    if abs(v) > NUMBER_LIMIT:
        errors.error(node.span, "number too large", "numbers are limited to 10^18")
        raise _Fail
    return v


def _need_number(v, node, scope: Scope, errors: Collector) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, Symbol):
            errors.error(node.span, f"unknown parameter '{v}'", suggest(v, scope.names()))
        else:
            errors.error(node.span, f"expected a number in arithmetic, got {describe(v)}")
        raise _Fail


def describe(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Symbol):
        return f"'{v}'"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)
