"""The syntax tree both front ends produce. Spans never take part in equality, so a `.bst`
file and its YAML twin give equal trees."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from bstc.errors import Span


def _span():
    return field(default=None, compare=False, repr=False)


# ---- expressions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: int | float
    span: Span | None = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    """A parameter reference, or a symbol such as `gelu`, `sh`, `true` when no parameter has that name."""

    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % **
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Edge:
    """Context-injection edge `source -> variant`."""

    source: str
    variant: str
    span: Span | None = _span()
    source_span: Span | None = _span()
    variant_span: Span | None = _span()


@dataclass(frozen=True)
class Edges:
    """Several context edges, `[ssm -> mf, conv -> sh]`: one context set per edge."""

    edges: tuple[Edge, ...]
    span: Span | None = _span()


Expr = Union[Num, Str, Name, BinOp, Neg]


def edges_of(v) -> tuple[Edge, ...] | None:
    """The edges of a value that is an edge or a list of them, else None."""
    return (v,) if isinstance(v, Edge) else v.edges if isinstance(v, Edges) else None


def names_in(e):
    """Every Name in an expression (an edge's variant counts as one), left to right."""
    if isinstance(e, Edges):
        for edge in e.edges:
            yield from names_in(edge)
    elif isinstance(e, Edge):
        yield Name(e.variant, e.variant_span)
    elif isinstance(e, Name):
        yield e
    elif isinstance(e, BinOp):
        yield from names_in(e.left)
        yield from names_in(e.right)
    elif isinstance(e, Neg):
        yield from names_in(e.operand)
Value = Union[Expr, Edge, Edges]


# ---- declarations -----------------------------------------------------------------------
@dataclass(frozen=True)
class Assign:
    name: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Arg:
    name: str
    value: Value
    span: Span | None = _span()


@dataclass(frozen=True)
class BlockParam:
    name: str
    default: Expr | None
    span: Span | None = _span()


@dataclass(frozen=True)
class SubDef:
    name: str
    kind: str
    args: tuple[Arg, ...]
    span: Span | None = _span()
    kind_span: Span | None = _span()


@dataclass(frozen=True)
class BlockDef:
    name: str
    params: tuple[BlockParam, ...]
    subs: tuple[SubDef, ...]
    span: Span | None = _span()


# ---- the stack --------------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    block: str
    args: tuple[Arg, ...] = ()
    share: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Repeat:
    count: Expr
    body: tuple["Stmt", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Setting:
    sub: str
    param: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Override:
    block: str
    index: int
    settings: tuple[Setting, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Builtin:
    """`embed`, `norm rms|layer`, `head tied|untied`."""

    what: str
    arg: str | None = None
    span: Span | None = _span()
    arg_span: Span | None = _span()


@dataclass(frozen=True)
class Pattern:
    """`pattern "LLBL" { L = local; B = bst }`: one block per letter, in order."""

    letters: str
    bindings: tuple[tuple[str, Use, Span | None], ...]  # (letter, block use, where the letter is bound)
    span: Span | None = _span()
    letters_span: Span | None = _span()  # the string literal, its opening quote included


@dataclass(frozen=True)
class Place:
    """`every STEP from START use` / `at [I, ...] use`: replace blocks of the stack at these
    0-based positions (negative: from the end), after the rest of `layers` is expanded."""

    use: Use
    step: Expr | None = None
    start: Expr | None = None
    at: tuple[Expr, ...] = ()
    span: Span | None = _span()


Stmt = Union[Use, Repeat, Override, Builtin, Pattern, Place]


@dataclass(frozen=True)
class MeshAxis:
    name: str
    size: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Rule:
    logical: str
    mesh_axes: tuple[str, ...]
    span: Span | None = _span()
    target_span: Span | None = _span()


@dataclass(frozen=True)
class Import:
    """`import "blocks.bst"`: a library's blocks and parameters join the importing file's."""

    path: str
    span: Span | None = _span()


@dataclass(frozen=True)
class ModelDef:
    """A model file, or a library (`library NAME { parameters and blocks }`: no stack)."""

    name: str
    assigns: tuple[Assign, ...]
    blocks: tuple[BlockDef, ...]
    layers: tuple[Stmt, ...]
    mesh: tuple[MeshAxis, ...] | None = None
    rules: tuple[Rule, ...] | None = None
    span: Span | None = _span()
    layers_span: Span | None = _span()
    imports: tuple[Import, ...] = ()
    library: bool = False
