"""`full_attention`: GPT-style causal multi-head self-attention over the whole sequence.

The paper's "Transformer" baseline (Table 1). Every query attends to every earlier key, so the
cost is quadratic in L: the L×L logits are materialised (this is the baseline whose cost BST's
block attention avoids). Positions come from RoPE on queries and keys (no absolute embedding).
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, KV_HEADS_PARAM_DOC, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads,
                              check_kv_heads, dropout, grouped_axes, heads_of, kv_heads_of, named_axes)
from bstc.ops._self_attention import SelfAttentionWeights, build_self_attention, self_attention_params
from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register

# ---- the op ------------------------------------------------------------------------------------


class FullAttention(SelfAttentionWeights):
    """x (B, L, D) -> causal self-attention output (B, L, D)."""

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import apply_rope, attend

        L = x.shape[1]
        q, k, v = self.project(x)  # (B, L, H|G, dh)
        if self.rope:
            pos = jnp.arange(L)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        mask = jnp.tril(jnp.ones((L, L), bool))  # the quadratic part: (L, L) logits per head
        y = attend(q, k, v, mask)  # (B, L, H, dh)
        return dropout(self.output(y, x.dtype), self.rate, key)

    # ---- the decoding protocol (bstc/decode.py): a key/value cache of `length` positions ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        if length is None:
            raise ValueError("full_attention decodes into a cache of a given length: pass length")
        kv = jnp.zeros((batch, length, self._kv_heads(), self._head_dim()), dtype)  # G K/V heads
        return {"k": kv, "v": kv}

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import apply_rope, attend

        q, k, v = (a[:, None] for a in self.project(x_t))  # (B, 1, H|G, dh)
        if self.rope:
            q, k = apply_rope(q, t[None]), apply_rope(k, t[None])
        cache = {"k": cache["k"].at[:, t].set(k[:, 0]), "v": cache["v"].at[:, t].set(v[:, 0])}
        visible = jnp.arange(cache["k"].shape[1]) <= t  # O(length) per token: the growing past
        y = attend(q, cache["k"], cache["v"], visible[None])[:, 0]
        return cache, self.output(y, x_t.dtype)


@register
class FullAttentionOp(Op):
    kind = "full_attention"
    role = "attn"
    axes = ATTN_AXES
    optim = ATTN_OPTIM
    params = (
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("rope", bool, True, doc="rotary position embedding on queries and keys"),
        Param("dropout", float, 0.0, min=0.0, max=1.0, doc="dropout on the attention output"),
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )
    doc = "Causal multi-head self-attention over the whole sequence (the GPT baseline); O(L²)."

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        return check_heads(args, dims) or check_kv_heads(args, dims)

    def logical_axes(self, args, dims: Dims, context, module):
        return named_axes(module, grouped_axes(self.axes, args, dims))

    def param_count(self, args, dims: Dims, context) -> int:
        return self_attention_params(args, dims)

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, L, H = dims.d_model, dims.seq_len, heads_of(args, dims)
        DK = D // H * kv_heads_of(args, dims)
        proj = 2 * D * (D + 2 * DK) + 2 * D * D  # q, k|v, o
        # Every query computes all L logits (the causal half is masked, not skipped).
        attn = 2 * L * D * 2 + SOFTMAX_FLOPS * H * L
        rope = ROPE_FLOPS * (D + DK) if args.get("rope", True) else 0.0
        return float(proj + attn + rope)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        DK = dims.d_model // heads_of(args, dims) * kv_heads_of(args, dims)
        # q, k, v, output, plus the f32 probabilities (H·L per token) kept for the backward pass.
        return (2 * dims.d_model + 2 * DK) * item + heads_of(args, dims) * dims.seq_len * 4

    def build(self, args, dims: Dims, context, *, key):
        return build_self_attention(FullAttention, args, dims, key)
