"""`bstc explain`: the expanded layer table, parameters, FLOPs per token and memory — all
computed from the IR and the ops' cost rules, before any device is touched."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from bstc import ir
from bstc.ops import REGISTRY

ROLES = ("attn", "ssm", "mlp", "norm", "embed", "other")


def op_args(kind: str, given: dict | None = None) -> dict:
    """The full argument dict of a builtin layer (schema defaults + `given`)."""
    op = REGISTRY[kind]
    out = {p.name: p.default for p in op.params if not p.required}
    out.update(given or {})
    return out


def norm_kind(norm: str) -> str | None:
    return {"rms": "rms_norm", "layer": "layer_norm"}.get(norm)


def block_end_window(inst: ir.BlockInstance, s: ir.Sublayer, dims) -> int:
    """W if sublayer `s` of block `inst` need only compute its outputs at the ends of blocks of
    W tokens: it is a context source read by nothing else (not the residual stream), every
    reader reads with stride W (`Op.context_stride`: the 'mf' context) and its kind can compute
    just those outputs (`Op.block_ends_flops_per_token`). 0 otherwise: every position."""
    # every edge that reads `s` (a reader with several edges is asked about that edge alone)
    reads = [(r, e) for r in inst.sublayers for e in r.edges if e.source == s.name]
    if s.residual or not reads:
        return 0
    strides = {REGISTRY[r.kind].context_stride(r.kwargs, dims, e.spec) for r, e in reads}
    if len(strides) != 1 or (W := strides.pop()) <= 1:
        return 0
    return W if REGISTRY[s.kind].block_ends_flops_per_token(s.kwargs, dims, W) is not None else 0


@dataclass
class Row:
    index: int
    name: str
    kind: str
    shape: str
    params: int
    flops_per_token: float
    role: str
    note: str = ""


@dataclass
class Report:
    model: str
    rows: list[Row]
    params: int
    flops_per_token: float  # forward
    flops_by_role: dict
    batch: int
    seq_len: int
    activation_bytes: float  # kept for backward at `batch`
    param_bytes: float
    train_state_bytes: float  # params + AdamW moments (f32)
    dtype: str
    param_dtype: str
    extra: dict = field(default_factory=dict)

    @property
    def train_flops_per_token(self) -> float:
        return 3.0 * self.flops_per_token  # backward ≈ 2× forward

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_flops_per_token"] = self.train_flops_per_token
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        tot = self.flops_per_token or 1.0
        parts = ", ".join(f"{r} {100 * self.flops_by_role.get(r, 0) / tot:.0f}%" for r in ("attn", "ssm", "mlp")
                          if self.flops_by_role.get(r))
        return (f"total {human(self.params)} params · {self.flops_per_token / 1e9:.3g} GFLOP/token ({parts}) · "
                f"activations {bytes_h(self.activation_bytes)} at batch {self.batch} · "
                f"params {bytes_h(self.param_bytes)}, train state {bytes_h(self.train_state_bytes)}")


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def bytes_h(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{int(n)} B"


def _itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def build_report(m: ir.Model, batch: int = 8) -> Report:
    d = m.dims
    rows: list[Row] = []
    by_role = {r: 0.0 for r in ROLES}
    act = 0.0
    seen_shared: set[str] = set()

    def add(name, kind, shape, params, flops, role, note="", norm_flops=0.0):
        # A sublayer's row includes its own norm; the norm's FLOPs are counted under 'norm'.
        rows.append(Row(len(rows), name, kind, ir.fmt_shape(shape), int(params), float(flops + norm_flops), role, note))
        by_role[role] = by_role.get(role, 0.0) + flops
        by_role["norm"] += norm_flops

    emb = REGISTRY["embedding"]
    ea = op_args("embedding")
    add("embed", "embedding", ("B", d.seq_len, d.d_model), emb.param_count(ea, d, None),
        emb.flops_per_token(ea, d, None), "embed")
    act += emb.activation_bytes_per_token(ea, d, None)
    for inst in m.layers:
        shared_again = inst.share is not None and inst.share in seen_shared
        if inst.share is not None:
            seen_shared.add(inst.share)
        for s in inst.sublayers:
            op = REGISTRY[s.kind]
            args = s.kwargs
            ctx = s.context_spec
            params = op.param_count(args, d, ctx)
            ends = block_end_window(inst, s, d)
            flops = op.block_ends_flops_per_token(args, d, ends) if ends else op.flops_per_token(args, d, ctx)
            nk = norm_kind(s.norm)
            flops_norm = 0.0
            if nk:
                nop, na = REGISTRY[nk], op_args(nk)
                params += nop.param_count(na, d, None)
                flops_norm = nop.flops_per_token(na, d, None)
            note = ""
            if shared_again:
                params, note = 0, f"shared ({inst.share})"
            if s.context:
                note = (note + " " if note else "") + "context " + ", ".join(f"{e.source}->{e.variant}" for e in s.edges)
            if ends:
                note = (note + " " if note else "") + f"block ends (every {ends})"
            add(f"{inst.name}.{s.name}", s.kind, s.out_shape, params, flops, op.role, note, flops_norm)
            act += op.activation_bytes_per_token(args, d, ctx)
    if m.final_norm:
        nk = norm_kind(m.final_norm)
        nop, na = REGISTRY[nk], op_args(nk)
        add("norm", nk, ("B", d.seq_len, d.d_model), nop.param_count(na, d, None), nop.flops_per_token(na, d, None), "norm")
    head = REGISTRY["head"]
    ha = op_args("head", {"tied": m.head_tied})
    add("head", "head", ("B", d.seq_len, d.vocab), head.param_count(ha, d, None), head.flops_per_token(ha, d, None),
        "embed", "tied to embed" if m.head_tied else "")
    act += d.vocab * 4  # f32 logits
    params = sum(r.params for r in rows)
    flops = sum(by_role.values())
    tokens = batch * d.seq_len
    pbytes = params * _itemsize(d.param_dtype)
    return Report(model=m.name, rows=rows, params=params, flops_per_token=flops, flops_by_role=by_role,
                  batch=batch, seq_len=d.seq_len, activation_bytes=act * tokens, param_bytes=pbytes,
                  train_state_bytes=pbytes + params * 8, dtype=d.dtype, param_dtype=d.param_dtype)


def explain(source, overrides=None, batch: int = 8) -> Report:
    from bstc.frontend import parse

    return build_report(parse(source, overrides=overrides), batch=batch)
