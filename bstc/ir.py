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
    # One edge, or a tuple of several (`context: [ssm -> mf, conv -> sh]`, in the order
    # written); a one-element list is one Edge, so it is the same IR as the edge alone.
    context: Edge | tuple[Edge, ...] | None
    out_shape: tuple
    span: Span | None = field(**_nocmp)
    arg_spans: tuple = field(default=(), compare=False, repr=False)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def edges(self) -> tuple[Edge, ...]:
        """The context edges, none, one or several alike."""
        c = self.context
        return () if c is None else (c,) if isinstance(c, Edge) else c

    @property
    def context_spec(self):
        """What the op's rules and builder receive: None, a ContextSpec, or a tuple of them."""
        c = self.context
        return None if c is None else c.spec if isinstance(c, Edge) else tuple(e.spec for e in c)


def edges_text(edges: tuple[Edge, ...], variant=lambda e: e.variant) -> str:
    """`ssm -> sh`, or `[ssm -> mf, conv -> sh]` for several edges."""
    text = ", ".join(f"{e.source} -> {variant(e)}" for e in edges)
    return text if len(edges) == 1 else f"[{text}]"


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
    # Where each mesh axis / rule was written (for diagnostics found later, e.g. by bstc.shard_plan).
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
            ctx = f", context: {edges_text(s.edges)}" if s.context else ""
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


def _sub_args(s: Sublayer, consumed: bool) -> dict[str, Any]:
    """Every argument of a sublayer as written in a .bst file (residual only where it is not the default)."""
    args = dict(s.args)
    args.update(norm=s.norm, placement=s.placement)
    if s.residual != (not consumed):
        args["residual"] = s.residual
    return args


def _template_fits(t: BlockInstance, o: BlockInstance) -> bool:
    """Can occurrence `o` be written as template `t` plus per-occurrence overrides and edge variants?
    (`o` may lack context sources that `t` has, when its edges say `none`.)"""
    tsubs = {s.name: s for s in t.sublayers}
    onames = [s.name for s in o.sublayers]
    if [n for n in tsubs if n in onames] != onames:
        return False
    removed = set(tsubs) - set(onames)
    for s in o.sublayers:
        ts = tsubs[s.name]
        if s.kind != ts.kind:
            return False
        # o's edges are t's, in t's order, less those whose source o dropped (variant `none`)
        tsrc, osrc = [e.source for e in ts.edges], [e.source for e in s.edges]
        if [x for x in tsrc if x in osrc] != osrc or not set(tsrc) - set(osrc) <= removed:
            return False
    consumers = {e.source for ts in t.sublayers for e in ts.edges}
    return removed <= consumers


def _edge_param(s: Sublayer, e: Edge) -> str:
    """The block parameter of `to_bst` that carries an edge's variant: `ctx_attn` for a
    sublayer's one edge, `ctx_attn_ssm` for each of several."""
    return f"ctx_{s.name}" if len(s.edges) == 1 else f"ctx_{s.name}_{e.source}"


def to_bst(m: Model) -> str:
    """A valid `.bst` file for the resolved model, every parameter and argument spelled out, that
    parses back to an equal IR.

    Each block is written once, from its occurrence with the most sublayers; the context variant
    of each of its edges becomes a block parameter (`ctx_attn`), so an occurrence whose edge is
    `none` (its SSM dropped) is `bst(ctx_attn = none)`, and arguments that differ per occurrence
    become overrides (`bst.1 { ssm.state = 128 }`). Only an occurrence that cannot be written so
    gets a block of its own (`bst_2`)."""
    by_block: dict[str, list[BlockInstance]] = {}
    for inst in m.layers:
        by_block.setdefault(inst.block, []).append(inst)
    templates: dict[str, BlockInstance] = {}
    variants: dict = {}  # signature -> block name, for occurrences that need their own block
    for b, insts in by_block.items():
        t = max(insts, key=lambda i: len(i.sublayers))
        templates[b] = t
        n = 1
        for o in insts:
            if not _template_fits(t, o) and o.signature not in variants:
                n += 1
                variants[o.signature] = (f"{b}_{n}", o)

    def block_def(name: str, t: BlockInstance, param_edges: bool) -> str:
        consumed = {e.source for s in t.sublayers for e in s.edges}
        params = [f"{_edge_param(s, e)} = {e.variant}" for s in t.sublayers for e in s.edges if param_edges]
        lines = [f"  block {name}" + (f"({', '.join(params)})" if params else "") + " {"]
        for s in t.sublayers:
            args = [f"{k}: {_bst_value(v)}" for k, v in _sub_args(s, s.name in consumed).items()]
            if s.context:
                variant = (lambda e, s=s: _edge_param(s, e)) if param_edges else (lambda e: e.variant)
                args.append(f"context: {edges_text(s.edges, variant)}")
            lines.append(f"    {s.name} = {s.kind}({', '.join(args)})")
        lines.append("  }")
        return "\n".join(lines)

    defs = [block_def(b, t, True) for b, t in templates.items()]
    defs += [block_def(name, o, False) for name, o in variants.values()]

    uses, overrides = [], []
    counters: dict[str, int] = {}
    for inst in m.layers:
        share = f" share {inst.share}" if inst.share else ""
        if inst.signature in variants:
            uses.append(f"    {variants[inst.signature][0]}{share}")
            continue
        t = templates[inst.block]
        idx = counters.get(inst.block, 0)
        counters[inst.block] = idx + 1
        osubs = {s.name: s for s in inst.sublayers}
        call = []
        for ts in t.sublayers:
            os_ = osubs.get(ts.name)
            have = {e.source: e.variant for e in os_.edges} if os_ is not None else {}
            for e in ts.edges:
                v = have.get(e.source, "none")
                if v != e.variant:
                    call.append(f"{_edge_param(ts, e)} = {v}")
        uses.append(f"    {inst.block}" + (f"({', '.join(call)})" if call else "") + share)
        t_consumed = {e.source for s in t.sublayers for e in s.edges}
        o_consumed = {e.source for s in inst.sublayers for e in s.edges} | (
            {s.name for s in t.sublayers} - set(osubs))
        sets = []
        for ts in t.sublayers:
            os_ = osubs.get(ts.name)
            if os_ is None:
                continue
            want, have = _sub_args(os_, ts.name in o_consumed), _sub_args(ts, ts.name in t_consumed)
            sets += [f"{ts.name}.{k} = {_bst_value(v)}" for k, v in want.items() if have.get(k, object()) != v]
        if sets:
            overrides.append(f"    {inst.block}.{idx} {{ {'; '.join(sets)} }}")

    out = [f"# resolved by bstc from {m.file}", f"model {m.name} {{"]
    out += [f"  {k} = {_bst_value(v)}" for k, v in m.params.items()]
    out += defs
    if m.mesh:
        out.append("  mesh { " + ", ".join(f"{a} = {n}" for a, n in m.mesh.axes) + " }")
        out.append("  rules { " + "; ".join(f"{k} -> ({', '.join(v)})" for k, v in m.mesh.rules) + " }")
    out.append("  layers {")
    out.append("    embed")
    out += uses + overrides
    if m.final_norm:
        out.append(f"    norm {m.final_norm}")
    out.append(f"    head {'tied' if m.head_tied else 'untied'}")
    out += ["  }", "}"]
    return "\n".join(out) + "\n"
