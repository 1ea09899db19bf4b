"""`block_attention`: the Block Transformer sublayer of the Block-State Transformer.

The sequence is split into L/W blocks of `window` tokens. Each block's queries attend causally
within the block and fully to a set of S context vectors; with no context edge it is plain
block-local attention. Keys and values of the context come from the same K/V projections as
the tokens'. Context variants (Pal et al. 2023, §3), given by the edge `context: ssm -> V`:

* `sh` — single head: the context of block k is the SSM output Y (B, L, D) over block k−1
  (S = W vectors), shared by all heads; block 0 gets a learned (W, D) context (or zeros).
* `mh` — multi head: the SSM has F = H filters, Y (B, L, H, D); head h of block k attends to
  filter h's outputs over block k−1, projected by K/V and sliced to head h (S = W per head).
* `mf` — multi filter: the SSM has F = S filters, Y (B, L, S, D); the context of block k is the
  last SSM output before the block (position k·W − 1) of each filter, plus learned context IDs
  (S, D); block 0 gets a learned (S, D) context.

`context_block: own` (sh, mh) takes the context of block k from the block's own window instead,
as the BST paper's appendix writes it: the source's outputs at positions kW … kW+W−1, slot i
from position kW + i, and query i of the block sees context slots 0..i only (a causal cross
mask). The source is causal, so the layer stays causal, and no block needs a learned context.

Positions (`rope: true`): rotary embedding on queries and block keys with the position *within
the block* (t mod W). Inside a block RoPE is relative, so this equals absolute positions there;
what it fixes is the context: context keys carry no rotation (they summarise the past as a set),
so a query–context score depends only on the query's offset in its block, the same in every
block and at every sequence length (length generalisation, exact block-by-block decoding).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._attention import apply_rope, blockwise_attention
from bstc.ops._common import KV_HEADS_PARAM_DOC, SOFTMAX_FLOPS, check_kv_heads, dropout, grouped_axes, named_axes
from bstc.ops.base import Op, Param, Problem, register


class BlockAttentionLayer(eqx.Module):
    wq: Float[Array, "D D"]
    wk: Float[Array, "D GK"]  # GK = kv_heads·dh (= D unless grouped-query attention)
    wv: Float[Array, "D GK"]
    wo: Float[Array, "D D"]
    ctx_first: Float[Array, "S D"] | None  # block 0's learned context
    ctx_ids: Float[Array, "S D"] | None  # MF: learned context IDs
    window: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    variant: str | None = eqx.field(static=True)
    n_context: int = eqx.field(static=True)
    # "previous": block k's context is the source over block k−1; "own": over block k itself,
    # seen causally (sh, mh only).
    context_block: str = eqx.field(static=True, default="previous")

    def _proj(self, x, w):
        """(B, L, heads, dh) for wq; (B, L, kv_heads, dh) for wk and wv."""
        B, L, D = x.shape
        return (x @ w.astype(x.dtype)).reshape(B, L, -1, D // self.heads)

    def _kv_heads(self) -> int:
        return self.wk.shape[1] // (self._d() // self.heads)

    def first_context(self, dtype):
        """Block 0's context (learned, or zeros): (S, D), or for mh (W, H, D), each head its copy."""
        first = self.ctx_first if self.ctx_first is not None else jnp.zeros((self.n_context, self._d()), dtype)
        first = first.astype(dtype)
        if self.variant == "mh":
            return jnp.broadcast_to(first[:, None, :], (self.window, self.heads, first.shape[-1]))
        return first

    def project_context(self, c, dtype):
        """Context keys and values (..., S, H, dh) from context vectors (..., S, D) shared by the
        heads, or for mh (..., W, H, D), each head projecting its own filter's vectors."""
        D, H = self._d(), self.heads
        if self.variant == "mh":
            wk, wv = (w.astype(dtype).reshape(D, H, D // H) for w in (self.wk, self.wv))
            return jnp.einsum("...whd,dhe->...whe", c, wk), jnp.einsum("...whd,dhe->...whe", c, wv)
        return tuple((c @ w.astype(dtype)).reshape(*c.shape[:-1], -1, D // H) for w in (self.wk, self.wv))

    def context_vectors(self, y, B: int, nb: int, dtype):
        """The context set of every block, before projection: (B, nb, S, D) or, for mh, (B, nb, W, H, D)."""
        W = self.window
        if self.context_block == "own":  # block k's own window; the mask keeps it causal
            per_head = (self.heads,) if self.variant == "mh" else ()
            return y.reshape(B, nb, W, *per_head, -1).astype(dtype)
        first = self.first_context(dtype)
        if self.variant == "sh":
            prev = y.reshape(B, nb, W, -1)[:, :-1]  # block k−1 for k ≥ 1
            return jnp.concatenate([jnp.broadcast_to(first, (B, 1) + first.shape), prev.astype(dtype)], axis=1)
        if self.variant == "mh":
            prev = y.reshape(B, nb, W, self.heads, -1)[:, :-1]
            return jnp.concatenate([jnp.broadcast_to(first, (B, 1) + first.shape), prev.astype(dtype)], axis=1)
        if self.variant == "mf":
            # The source's outputs at every position, or (when the lowering had it compute only
            # those, `Sub.block_ends`) at the block ends alone: (B, nb, S, D) either way here.
            ends = y if y.shape[1] == nb else y[:, W - 1::W]
            last = ends[:, :-1]  # (B, nb−1, S, D): last output before blocks 1..nb−1
            ctx = jnp.concatenate([jnp.broadcast_to(first, (B, 1) + first.shape), last.astype(dtype)], axis=1)
            return ctx + self.ctx_ids.astype(dtype)[None, None]
        raise ValueError(self.variant)

    def _d(self):
        return self.wq.shape[0]

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None) -> Float[Array, "B L D"]:
        B, L, D = x.shape
        W, nb = self.window, L // self.window
        q, k, v = self._proj(x, self.wq), self._proj(x, self.wk), self._proj(x, self.wv)
        if self.rope:
            pos = jnp.arange(L) % W  # position within the block (see the module docstring)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        ck = cv = None
        if self.variant is not None:
            if context is None:
                raise ValueError("this block_attention expects a context (its edge's source output)")
            ck, cv = self.project_context(self.context_vectors(context, B, nb, x.dtype), x.dtype)
        o = blockwise_attention(q, k, v, W, ck, cv, causal_context=self.context_block == "own").reshape(B, L, D)
        o = o @ self.wo.astype(x.dtype)
        return dropout(o, self.dropout, key)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    # One token at a time: the keys/values of the current block so far (W slots, position t mod
    # W), the projected context of the current block, and the context source's outputs over the
    # current block (they become the next block's context). O((S + W)·D + D²) per token, and no
    # limit on the length: positions are taken within the block. With `context_block: own` the
    # context of position t is the source's output at t: projected and written to context slot
    # t mod W as it arrives, so no source outputs are kept.
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        W, H, D = self.window, self.heads, self._d()
        G = self._kv_heads()  # grouped-query attention caches G ≤ H key/value heads
        kv = jnp.zeros((batch, W, G, D // H), dtype)
        cache = {"k": kv, "v": kv}
        if self.variant is None:
            return cache
        S = W if self.variant == "mh" else self.n_context
        if self.context_block == "own":
            ckv = jnp.zeros((batch, W, G, D // H), dtype)
            return {**cache, "ck": ckv, "cv": ckv}
        src = {"sh": (batch, W, D), "mh": (batch, W, H, D), "mf": (batch, S, D)}[self.variant]
        ckv = jnp.zeros((batch, S, G, D // H), dtype)
        return {**cache, "ck": ckv, "cv": ckv, "src": jnp.zeros(src, dtype)}

    def _block_context(self, src, k_block, dtype):
        """Projected context keys/values of block k_block from the source's outputs over the
        block before it (`src`): the decoding twin of `context_vectors`."""
        c = jnp.where(k_block == 0, jnp.broadcast_to(self.first_context(dtype), src.shape), src)
        if self.variant == "mf":
            c = c + self.ctx_ids.astype(dtype)[None]
        return self.project_context(c, dtype)

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        B, D = x_t.shape
        W = self.window
        p = t % W
        q, k, v = (self._proj(x_t[:, None], w)[:, 0] for w in (self.wq, self.wk, self.wv))  # (B, H|G, dh)
        if self.rope:
            q, k = (apply_rope(a[:, None], p[None])[:, 0] for a in (q, k))
        cache = {**cache, "k": cache["k"].at[:, p].set(k), "v": cache["v"].at[:, p].set(v)}
        keys, values = cache["k"], cache["v"]
        visible = jnp.arange(W) <= p
        if self.variant is not None:
            if context is None:
                raise ValueError("this block_attention expects a context (its edge's source output)")
            if self.context_block == "own":
                # Slot p gets position t's context; slots after p still hold the last block's
                # and are masked like the keys (the same `visible`).
                ck_t, cv_t = self.project_context(context.astype(x_t.dtype)[:, None], x_t.dtype)
                ck, cv = cache["ck"].at[:, p].set(ck_t[:, 0]), cache["cv"].at[:, p].set(cv_t[:, 0])
                cache = {**cache, "ck": ck, "cv": cv}
                ctx_visible = visible
            else:
                # A new block starts: its context comes from the source's outputs over the last block.
                ck, cv = jax.lax.cond(p == 0, lambda c: self._block_context(c["src"], t // W, x_t.dtype),
                                      lambda c: (c["ck"], c["cv"]), cache)
                src = context.astype(x_t.dtype)
                src = src if self.variant == "mf" else cache["src"].at[:, p].set(src)
                cache = {**cache, "ck": ck, "cv": cv, "src": src}
                ctx_visible = jnp.ones((ck.shape[1],), bool)
            keys, values = jnp.concatenate([ck, keys], 1), jnp.concatenate([cv, values], 1)
            visible = jnp.concatenate([ctx_visible, visible])
        from bstc.ops._attention import attend

        o = attend(q[:, None], keys, values, visible[None]).reshape(B, D)
        return cache, o @ self.wo.astype(x_t.dtype)


def _heads(args, dims) -> int:
    return args["heads"] or dims.heads


def _kv_width(args, dims) -> int:
    """Width of the K (and V) projection: kv_heads·dh, D without grouped-query attention."""
    H = _heads(args, dims)
    return dims.d_model // H * (args.get("kv_heads", 0) or H)


def _learned_first(args, context) -> bool:
    """Whether block 0 gets learned context vectors: with an own-window context it has its own."""
    return context is not None and args["first_context"] == "learned" and args["context_block"] == "previous"


def _n_context(args, dims, context) -> int:
    if context is None:
        return 0
    return context.filters if context.variant == "mf" else args["window"]


@register
class BlockAttention(Op):
    kind = "block_attention"
    role = "attn"
    # Projections stored (in, out), heads·dh on the `heads` side; the learned context vectors are
    # (slots, embed).
    axes = {"wq": ("embed", "heads"), "wk": ("embed", "heads"), "wv": ("embed", "heads"), "wo": ("heads", "embed"),
            "ctx_first": (None, "embed"), "ctx_ids": (None, "embed")}
    optim = {"wq": "weight", "wk": "weight", "wv": "weight", "wo": "weight",
             "ctx_first": "embedding", "ctx_ids": "embedding"}  # learned context vectors are inputs

    def logical_axes(self, args, dims, context, module):
        # With kv_heads < heads the K/V projections are replicated over the tensor axis (see
        # _common.grouped_axes).
        return named_axes(module, grouped_axes(self.axes, args, dims, ("wk", "wv")))
    accepts_context = True
    doc = "causal attention within blocks of `window` tokens, plus full attention to a context set"
    params = (
        Param("window", int, doc="W: block length; must divide seq_len", min=1),
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("rope", bool, True, doc="rotary positions (within the block) on queries and block keys"),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
        Param("first_context", str, "learned", choices=("learned", "zero"), doc="block 0's context"),
        Param("context_block", str, "previous", choices=("previous", "own"),
              doc="block k's context: the source over block k−1, or over block k itself seen causally (sh, mh)"),
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )

    def check(self, args, dims, context):
        out = []
        H = _heads(args, dims)
        if dims.seq_len % args["window"]:
            out.append(Problem(f"seq_len ({dims.seq_len}) is not divisible by window ({args['window']})", "window",
                               "the sequence is split into blocks of `window` tokens"))
        if dims.d_model % H:
            out.append(Problem(f"d_model ({dims.d_model}) is not divisible by heads ({H})", "heads" if args["heads"] else None,
                               "choose heads that divide d_model"))
        elif args["rope"] and (dims.d_model // H) % 2:
            out.append(Problem(f"rope needs an even head width, got d_model/heads = {dims.d_model // H}", "rope",
                               "use `rope: false` or change heads"))
        grouped = False
        if not dims.d_model % H:
            kv = check_kv_heads(args, dims)
            out += kv
            grouped = not kv and (args.get("kv_heads", 0) or H) < H
        if context is not None:
            F = context.filters
            if context.variant == "sh" and F != 1:
                out.append(Problem(f"context variant 'sh' needs a source with 1 filter, but it has {F}", "context",
                                   "use `-> mf` for several filters, or give the source `filters: 1`"))
            elif context.variant == "mh" and grouped:
                # mh gives every head its own filter's keys and values; grouped K/V heads are
                # shared by heads/kv_heads query heads, so there is no per-head key to give.
                out.append(Problem(f"context variant 'mh' gives each head its own context keys and values, but "
                                   f"kv_heads ({args['kv_heads']}) < heads ({H}) shares them between heads",
                                   "kv_heads", "drop `kv_heads` (or set it to heads) with `-> mh`, or use the "
                                   "`-> sh` or `-> mf` context"))
            elif context.variant == "mh" and F != H:
                out.append(Problem(f"context variant 'mh' needs one source filter per head ({H}), but the source has {F}",
                                   "context", f"give the source `filters: {H}` (= heads)"))
            elif context.variant == "mf" and F < 2:
                out.append(Problem(f"context variant 'mf' needs a source with several filters, but it has {F}", "context",
                                   "give the source e.g. `filters: 16` (S context vectors per block)"))
        if args["context_block"] == "own":
            if context is None:
                out.append(Problem("`context_block: own` needs a context edge", "context_block",
                                   "add `context: SOURCE -> sh` (or `-> mh`), or drop `context_block`"))
            elif context.variant == "mf":
                # mf's context is each filter's last output before the block: one position, so
                # there is no window of the block's own positions to attend to causally.
                out.append(Problem("`context_block: own` applies to the 'sh' and 'mh' context variants, not 'mf'",
                                   "context_block", "use `-> sh` or `-> mh` for an own-window context, or drop "
                                   "`context_block` (mf reads the state entering the block)"))
        return out

    def context_stride(self, args, dims, context):
        # mf reads one output per block, the last before it; sh and mh read every position.
        return args["window"] if context is not None and context.variant == "mf" else 1

    def param_count(self, args, dims, context):
        D = dims.d_model
        S = _n_context(args, dims, context)
        n = 2 * D * D + 2 * D * _kv_width(args, dims)  # q, o; k, v
        if _learned_first(args, context):
            n += S * D
        if context is not None and context.variant == "mf":
            n += S * D
        return n

    def flops_per_token(self, args, dims, context):
        D, W, H = dims.d_model, args["window"], _heads(args, dims)
        DK = _kv_width(args, dims)
        S = _n_context(args, dims, context)
        proj = 2 * 2 * D * D + 2 * 2 * D * DK  # q, o; k, v
        if context is not None:  # K/V of the context: S vectors per block of W tokens
            proj += 2 * 2 * D * DK * S / W
        scores = 2 * 2 * D * (S + W)  # q·k and w·v over S + W keys, for every query head
        softmax = SOFTMAX_FLOPS * H * (S + W)
        rope = 3.0 * (D + DK) if args["rope"] else 0.0  # q and the block keys
        return proj + scores + softmax + rope

    def activation_bytes_per_token(self, args, dims, context):
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        S = _n_context(args, dims, context)
        H = _heads(args, dims)
        return (3 * dims.d_model + 2 * _kv_width(args, dims)) * itemsize + H * (S + args["window"]) * 4

    def build(self, args, dims, context, *, key):
        D = dims.d_model
        H = _heads(args, dims)
        ks = jax.random.split(key, 6)
        init = lambda k, n=D: jax.random.normal(k, (D, n)) / jnp.sqrt(D)  # noqa: E731
        DK = _kv_width(args, dims)
        S = _n_context(args, dims, context)
        variant = context.variant if context is not None else None
        first = ids = None
        if _learned_first(args, context):
            first = jax.random.normal(ks[4], (S, D)) * 0.02
        if variant == "mf":
            ids = jax.random.normal(ks[5], (S, D)) * 0.02
        return BlockAttentionLayer(wq=init(ks[0]), wk=init(ks[1], DK), wv=init(ks[2], DK), wo=init(ks[3]) / jnp.sqrt(2.0),
                                   ctx_first=first, ctx_ids=ids, window=int(args["window"]), heads=H,
                                   rope=bool(args["rope"]), dropout=float(args["dropout"]), variant=variant,
                                   n_context=S, context_block=str(args["context_block"]))
