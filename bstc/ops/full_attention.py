"""`full_attention`: GPT-style causal multi-head self-attention over the whole sequence.

The paper's "Transformer" baseline (Table 1). Every query attends to every earlier key, so the
cost is quadratic in L: the L×L logits are materialised (this is the baseline whose cost BST's
block attention avoids). Positions come from RoPE on queries and keys (no absolute embedding).
"""
from __future__ import annotations


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads, dense_init, dropout, fused_heads,
                              fused_init, heads_of, merge_heads)
from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register

# ---- the op ------------------------------------------------------------------------------------


class FullAttention(eqx.Module):
    """x (B, L, D) -> causal self-attention output (B, L, D)."""

    w_qkv: Float[Array, "D 3 D"]  # (in, q|k|v, out): see fused_init
    w_o: Float[Array, "D D"]
    heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    rate: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import apply_rope, attend

        L = x.shape[1]
        q, k, v = fused_heads(x, self.w_qkv, self.heads)  # (B, L, H, dh) each
        if self.rope:
            pos = jnp.arange(L)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        mask = jnp.tril(jnp.ones((L, L), bool))  # the quadratic part: (L, L) logits per head
        y = attend(q, k, v, mask)  # (B, L, H, dh)
        y = merge_heads(y).astype(x.dtype) @ self.w_o.astype(x.dtype)
        return dropout(y, self.rate, key)

    # ---- the decoding protocol (bstc/decode.py): a key/value cache of `length` positions ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        if length is None:
            raise ValueError("full_attention decodes into a cache of a given length: pass length")
        D = self.w_o.shape[0]
        kv = jnp.zeros((batch, length, self.heads, D // self.heads), dtype)
        return {"k": kv, "v": kv}

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import apply_rope, attend

        q, k, v = (a[:, None] for a in fused_heads(x_t, self.w_qkv, self.heads))  # (B, 1, H, dh)
        if self.rope:
            q, k = apply_rope(q, t[None]), apply_rope(k, t[None])
        cache = {"k": cache["k"].at[:, t].set(k[:, 0]), "v": cache["v"].at[:, t].set(v[:, 0])}
        visible = jnp.arange(cache["k"].shape[1]) <= t  # O(length) per token: the growing past
        y = attend(q, cache["k"], cache["v"], visible[None])[:, 0]
        return cache, merge_heads(y).astype(x_t.dtype) @ self.w_o.astype(x_t.dtype)


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
    )
    doc = "Causal multi-head self-attention over the whole sequence (the GPT baseline); O(L²)."

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        return check_heads(args, dims)

    def param_count(self, args, dims: Dims, context) -> int:
        return 4 * dims.d_model * dims.d_model

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, L, H = dims.d_model, dims.seq_len, heads_of(args, dims)
        proj = 2 * D * 3 * D + 2 * D * D
        # Every query computes all L logits (the causal half is masked, not skipped).
        attn = 2 * L * D * 2 + SOFTMAX_FLOPS * H * L
        rope = ROPE_FLOPS * 2 * D if args.get("rope", True) else 0.0
        return float(proj + attn + rope)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        # q, k, v, output, plus the f32 probabilities (H·L per token) kept for the backward pass.
        return 4 * dims.d_model * item + heads_of(args, dims) * dims.seq_len * 4

    def build(self, args, dims: Dims, context, *, key):
        D = dims.d_model
        k1, k2 = jax.random.split(key)
        return FullAttention(fused_init(k1, D, 3, D), dense_init(k2, D, D), heads_of(args, dims),
                             bool(args.get("rope", True)), float(args.get("dropout", 0.0)))
