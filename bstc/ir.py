"""The resolved, checked model: a small frozen IR in which every node keeps its source span.

It is what every later stage consumes (report, lowering, sharding, runtime). Spans and the
source text do not take part in equality, so a `.bst` file and its YAML twin compare equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bstc.errors import Span
from bstc.ops.base import ContextSpec, Dims

_nocmp = dict(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Edge:
    """Context injection: the output of sublayer `source` (same block) feeds this one as `variant`."""

    source: str
    variant: str  # sh | mh | mf
    filters: int  # F of the source

    @property
    def spec(self) -> ContextSpec:
        return ContextSpec(self.variant, self.filters)


@dataclass(frozen=True)
class Sublayer:
    name: str
    kind: str
    args: tuple[tuple[str, Any], ...]  # every schema parameter, defaults filled, sorted by name
    norm: str  # rms | layer | none (applied to the sublayer's input when pre, output when post)
    placement: str  # pre | post
    residual: bool  # added to the residual stream (False for pure context sources)
    context: Edge | None
    out_shape: tuple
    span: Span | None = field(**_nocmp)
    arg_spans: tuple = field(default=(), compare=False, repr=False)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


@dataclass(frozen=True)
class BlockInstance:
    """One occurrence of a block in the expanded stack, named `block.index`."""

    block: str
    index: int
    sublayers: tuple[Sublayer, ...]
    share: str | None = None
    span: Span | None = field(**_nocmp)

    @property
    def name(self) -> str:
        return f"{self.block}.{self.index}"

    @property
    def signature(self) -> tuple:
        """Equal signatures mean the same computation with different weights (scan-stackable)."""
        return (self.block, self.sublayers)


@dataclass(frozen=True)
class MeshSpec:
    axes: tuple[tuple[str, int], ...]  # (mesh axis, size) in order
    rules: tuple[tuple[str, tuple[str, ...]], ...]  # logical axis -> mesh axes
    span: Span | None = field(**_nocmp)
    # Where each mesh axis / rule was written (for diagnostics found later, e.g. by bstc.shard).
    axis_spans: tuple = field(default=(), compare=False, repr=False)  # ((axis, Span), ...)
    rule_spans: tuple = field(default=(), compare=False, repr=False)  # ((logical, Span, target Span), ...)


@dataclass(frozen=True)
class Model:
    name: str
    params: dict[str, Any]  # resolved top-level parameters (after overrides)
    dims: Dims
    layers: tuple[BlockInstance, ...]
    final_norm: str | None  # rms | layer | None
    head_tied: bool
    mesh: MeshSpec | None = None
    file: str = field(default="<string>", compare=False, repr=False)
    source_text: str = field(default="", compare=False, repr=False)

    def __hash__(self):  # params is a dict; hash the printed form instead
        return hash(dump(self))


def fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def dump(m: Model) -> str:
    """A stable pretty-printed form of the IR (used for hashing, caching and `bstc compile -o`)."""
    out = [f"model {m.name} {{"]
    for k in sorted(m.params):
        out.append(f"  {k} = {_fmt(m.params[k])}")
    out.append("  layers {")
    out.append("    embed")
    for inst in m.layers:
        share = f" share {inst.share}" if inst.share else ""
        out.append(f"    {inst.name}{share} {{")
        for s in inst.sublayers:
            args = ", ".join(f"{k}: {_fmt(v)}" for k, v in s.args)
            ctx = f", context: {s.context.source} -> {s.context.variant}" if s.context else ""
            flags = f"  # norm={s.norm} {s.placement} residual={_fmt(s.residual)} -> {fmt_shape(s.out_shape)}"
            out.append(f"      {s.name} = {s.kind}({args}{ctx}){flags}")
        out.append("    }")
    if m.final_norm:
        out.append(f"    norm {m.final_norm}")
    out.append(f"    head {'tied' if m.head_tied else 'untied'}")
    out.append("  }")
    if m.mesh:
        out.append("  mesh { " + ", ".join(f"{a} = {n}" for a, n in m.mesh.axes) + " }")
        out.append("  rules { " + "; ".join(f"{k} -> ({', '.join(v)})" for k, v in m.mesh.rules) + " }")
    out.append("}")
    return "\n".join(out)


def _bst_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v >= 0 else f"({v!r})"
    s = str(v)
    return s if s.isidentifier() else f'"{s}"'


def to_bst(m: Model) -> str:
    """A valid `.bst` file for the resolved model: every parameter and argument spelled out.

    Each distinct block (block name + resolved sublayers) becomes one block definition; a block
    whose occurrences were overridden differently gets suffixed variants (`bst_2`, …)."""
    names: dict = {}
    defs: list[str] = []
    per_block: dict[str, int] = {}
    for inst in m.layers:
        if inst.signature in names:
            continue
        n = per_block.get(inst.block, 0) + 1
        per_block[inst.block] = n
        bname = inst.block if n == 1 else f"{inst.block}_{n}"
        names[inst.signature] = bname
        lines = [f"  block {bname} {{"]
        for s in inst.sublayers:
            args = [f"{k}: {_bst_value(v)}" for k, v in s.args]
            args += [f"norm: {s.norm}", f"placement: {s.placement}", f"residual: {_bst_value(s.residual)}"]
            if s.context:
                args.append(f"context: {s.context.source} -> {s.context.variant}")
            lines.append(f"    {s.name} = {s.kind}({', '.join(args)})")
        lines.append("  }")
        defs.append("\n".join(lines))
    out = [f"# resolved by bstc from {m.file}", f"model {m.name} {{"]
    out += [f"  {k} = {_bst_value(v)}" for k, v in m.params.items()]
    out += defs
    if m.mesh:
        out.append("  mesh { " + ", ".join(f"{a} = {n}" for a, n in m.mesh.axes) + " }")
        out.append("  rules { " + "; ".join(f"{k} -> ({', '.join(v)})" for k, v in m.mesh.rules) + " }")
    out.append("  layers {")
    out.append("    embed")
    for inst in m.layers:
        out.append(f"    {names[inst.signature]}" + (f" share {inst.share}" if inst.share else ""))
    if m.final_norm:
        out.append(f"    norm {m.final_norm}")
    out.append(f"    head {'tied' if m.head_tied else 'untied'}")
    out += ["  }", "}"]
    return "\n".join(out) + "\n"
