"""`sliding_attention`: the paper's "Slide" baseline — sliding-window causal attention.

The sequence is cut into blocks of W. Block k's queries attend to all of block k−1 and causally
to block k, so a query at position t sees keys in [(⌊t/W⌋−1)·W, t]: a band between W and 2W
wide. Block 0 has no previous block (its first W keys are masked out).

Computed blockwise: keys are the concatenation [previous block; current block] (2W of them), so
the logits are (L/W)·W·2W = 2·L·W per head — linear in L, never L×L.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register
from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, KV_HEADS_PARAM_DOC, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads,
                              check_kv_heads, check_window, dense_init, dropout, fused_init, grouped_axes, heads_of,
                              kv_heads_of, merge_heads, named_axes, qkv_heads)


def sliding_mask(n_blocks: int, window: int) -> Bool[Array, "nb 1 W 2W"]:
    """Mask over [previous block; current block] keys, per block (broadcasts over heads)."""
    i = jnp.arange(window)[:, None]  # query index within the block
    j = jnp.arange(2 * window)[None, :]  # key index within [prev; cur]
    causal = j <= i + window  # prev block fully, current block causally
    has_prev = (jnp.arange(n_blocks) > 0)[:, None, None]  # block 0: no previous block
    m = causal[None] & (has_prev | (j >= window)[None])
    return m[:, None]  # (nb, 1, W, 2W)


def with_previous_block(t: Float[Array, "B nb W H dh"]) -> Float[Array, "B nb 2W H dh"]:
    """[block k−1; block k] for every k (block −1 is zeros, and masked)."""
    prev = jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
    return jnp.concatenate([prev, t], axis=2)


class SlidingAttention(eqx.Module):
    """x (B, L, D) -> sliding-window causal self-attention output (B, L, D)."""

    w_qkv: Float[Array, "D 3 D"] | None  # (in, q|k|v, out): see fused_init; None with kv_heads < heads
    w_o: Float[Array, "D D"]
    heads: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    rate: float = eqx.field(static=True)
    # Grouped-query attention (kv_heads G < H): w_q (D, D) and w_kv (D, 2, G·dh), as full_attention.
    w_q: Float[Array, "D D"] | None = None
    w_kv: Float[Array, "D 2 GK"] | None = None

    def _kv_heads(self) -> int:
        return self.heads if self.w_kv is None else self.w_kv.shape[-1] // (self.w_o.shape[0] // self.heads)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import apply_rope, attend

        B, L, D = x.shape
        W, nb = self.window, L // self.window
        q, k, v = qkv_heads(x, self.w_qkv, self.w_q, self.w_kv, self.heads)  # (B, L, H|G, dh)
        if self.rope:
            # RoPE is relative, so rotating by absolute positions before blocking is exact.
            pos = jnp.arange(L)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        blk = lambda t: t.reshape(B, nb, W, *t.shape[2:])  # noqa: E731
        q = blk(q)  # (B, nb, W, H, dh)
        k, v = with_previous_block(blk(k)), with_previous_block(blk(v))  # (B, nb, 2W, H, dh)
        y = attend(q, k, v, sliding_mask(nb, W))  # (B, nb, W, H, dh)
        y = merge_heads(y.reshape(B, L, *y.shape[3:])).astype(x.dtype) @ self.w_o.astype(x.dtype)
        return dropout(y, self.rate, key)

    # ---- the decoding protocol (bstc/decode.py): the last 2W keys/values, in a ring ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        from bstc.ops._attention import ring_cache

        return ring_cache(batch, 2 * self.window, self._kv_heads(), self.w_o.shape[0] // self.heads, dtype)

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import apply_rope, attend, ring_push, ring_visible

        W = self.window
        q, k, v = (a[:, None] for a in qkv_heads(x_t, self.w_qkv, self.w_q, self.w_kv, self.heads))  # (B, 1, H|G, dh)
        if self.rope:
            q, k = apply_rope(q, t[None]), apply_rope(k, t[None])
        cache = ring_push(cache, k[:, 0], v[:, 0], t)
        visible = ring_visible(cache, (t // W - 1) * W, t)  # blocks k−1 and k up to t
        y = attend(q, cache["k"], cache["v"], visible[None])[:, 0]
        return cache, merge_heads(y).astype(x_t.dtype) @ self.w_o.astype(x_t.dtype)


@register
class SlidingAttentionOp(Op):
    kind = "sliding_attention"
    role = "attn"
    axes = ATTN_AXES
    optim = ATTN_OPTIM
    params = (
        Param("window", int, doc="block length W: each block attends to the previous and the current block"),
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("rope", bool, True, doc="rotary position embedding on queries and keys"),
        Param("dropout", float, 0.0, min=0.0, max=1.0, doc="dropout on the attention output"),
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )
    doc = "Sliding-window causal attention (Slide): block k attends to blocks k−1 and k; O(L·W)."

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        return (check_heads(args, dims) or check_kv_heads(args, dims)) + check_window(args, dims)

    def logical_axes(self, args, dims: Dims, context, module):
        return named_axes(module, grouped_axes(self.axes, args, dims))

    def param_count(self, args, dims: Dims, context) -> int:
        D = dims.d_model
        DK = D // heads_of(args, dims) * kv_heads_of(args, dims)  # width of k (and of v)
        return 2 * D * D + 2 * D * DK

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, W, H = dims.d_model, int(args["window"]), heads_of(args, dims)
        DK = D // H * kv_heads_of(args, dims)
        proj = 2 * D * (D + 2 * DK) + 2 * D * D  # q, k|v, o
        attn = 2 * (2 * W) * D * 2 + SOFTMAX_FLOPS * H * 2 * W  # 2W keys per query
        rope = ROPE_FLOPS * (D + DK) if args.get("rope", True) else 0.0
        return float(proj + attn + rope)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        DK = dims.d_model // heads_of(args, dims) * kv_heads_of(args, dims)
        # q, output, and k, v over the block and the previous one (2·DK each)
        return (2 * dims.d_model + 4 * DK) * item + heads_of(args, dims) * 2 * int(args["window"]) * 4

    def build(self, args, dims: Dims, context, *, key):
        D, H, G = dims.d_model, heads_of(args, dims), kv_heads_of(args, dims)
        k1, k2 = jax.random.split(key)
        rest = (H, int(args["window"]), bool(args.get("rope", True)), float(args.get("dropout", 0.0)))
        if G == H:
            return SlidingAttention(fused_init(k1, D, 3, D), dense_init(k2, D, D), *rest)
        kq, kkv = jax.random.split(k1)
        return SlidingAttention(None, dense_init(k2, D, D), *rest,
                                w_q=dense_init(kq, D, D), w_kv=fused_init(kkv, D, 2, D // H * G))
