"""`sliding_attention`: the paper's "Slide" baseline — sliding-window causal attention.

The sequence is cut into blocks of W. Block k's queries attend to all of block k−1 and causally
to block k, so a query at position t sees keys in [(⌊t/W⌋−1)·W, t]: a band between W and 2W
wide. Block 0 has no previous block (its first W keys are masked out).

Computed blockwise: keys are the concatenation [previous block; current block] (2W of them), so
the logits are (L/W)·W·2W = 2·L·W per head — linear in L, never L×L.
"""
from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, KV_HEADS_PARAM_DOC, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads,
                              check_kv_heads, check_window, dropout, grouped_axes, heads_of, kv_heads_of, named_axes)
from bstc.ops._self_attention import SelfAttentionWeights, build_self_attention, self_attention_params
from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register


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


class SlidingAttention(SelfAttentionWeights):
    """x (B, L, D) -> sliding-window causal self-attention output (B, L, D)."""

    window: int = eqx.field(static=True, kw_only=True)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import apply_rope, attend

        B, L, D = x.shape
        W, nb = self.window, L // self.window
        q, k, v = self.project(x)  # (B, L, H|G, dh)
        if self.rope:
            # RoPE is relative, so rotating by absolute positions before blocking is exact.
            pos = jnp.arange(L)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        blk = lambda t: t.reshape(B, nb, W, *t.shape[2:])  # noqa: E731
        q = blk(q)  # (B, nb, W, H, dh)
        k, v = with_previous_block(blk(k)), with_previous_block(blk(v))  # (B, nb, 2W, H, dh)
        y = attend(q, k, v, sliding_mask(nb, W))  # (B, nb, W, H, dh)
        return dropout(self.output(y.reshape(B, L, *y.shape[3:]), x.dtype), self.rate, key)

    # ---- the decoding protocol (bstc/decode.py): the last 2W keys/values, in a ring ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        from bstc.ops._attention import ring_cache

        return ring_cache(batch, 2 * self.window, self._kv_heads(), self._head_dim(), dtype)

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import apply_rope, attend, ring_push, ring_visible

        W = self.window
        q, k, v = (a[:, None] for a in self.project(x_t))  # (B, 1, H|G, dh)
        if self.rope:
            q, k = apply_rope(q, t[None]), apply_rope(k, t[None])
        cache = ring_push(cache, k[:, 0], v[:, 0], t)
        visible = ring_visible(cache, (t // W - 1) * W, t)  # blocks k−1 and k up to t
        y = attend(q, cache["k"], cache["v"], visible[None])[:, 0]
        return cache, self.output(y, x_t.dtype)


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
        return self_attention_params(args, dims)

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
        return build_self_attention(SlidingAttention, args, dims, key, window=int(args["window"]))
