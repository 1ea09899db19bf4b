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

from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, KV_HEADS_PARAM_DOC, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads,
                              check_kv_heads, dense_init, dropout, fused_init, grouped_axes, heads_of, kv_heads_of,
                              merge_heads, named_axes, qkv_heads)
from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register

# ---- the op ------------------------------------------------------------------------------------


class FullAttention(eqx.Module):
    """x (B, L, D) -> causal self-attention output (B, L, D)."""

    w_qkv: Float[Array, "D 3 D"] | None  # (in, q|k|v, out): see fused_init; None with kv_heads < heads
    w_o: Float[Array, "D D"]
    heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    rate: float = eqx.field(static=True)
    # Grouped-query attention (kv_heads G < H): q and k|v differ in width and in sharding, so
    # they are stored apart: w_q (D, D) and w_kv (D, 2, G·dh).
    w_q: Float[Array, "D D"] | None = None
    w_kv: Float[Array, "D 2 GK"] | None = None

    def _kv_heads(self) -> int:
        return self.heads if self.w_kv is None else self.w_kv.shape[-1] // (self.w_o.shape[0] // self.heads)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import apply_rope, attend

        L = x.shape[1]
        q, k, v = qkv_heads(x, self.w_qkv, self.w_q, self.w_kv, self.heads)  # (B, L, H|G, dh)
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
        kv = jnp.zeros((batch, length, self._kv_heads(), D // self.heads), dtype)  # G K/V heads
        return {"k": kv, "v": kv}

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import apply_rope, attend

        q, k, v = (a[:, None] for a in qkv_heads(x_t, self.w_qkv, self.w_q, self.w_kv, self.heads))  # (B, 1, H|G, dh)
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
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )
    doc = "Causal multi-head self-attention over the whole sequence (the GPT baseline); O(L²)."

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        return check_heads(args, dims) or check_kv_heads(args, dims)

    def logical_axes(self, args, dims: Dims, context, module):
        return named_axes(module, grouped_axes(self.axes, args, dims))

    def param_count(self, args, dims: Dims, context) -> int:
        D = dims.d_model
        DK = D // heads_of(args, dims) * kv_heads_of(args, dims)  # width of k (and of v)
        return 2 * D * D + 2 * D * DK

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
        D, H, G = dims.d_model, heads_of(args, dims), kv_heads_of(args, dims)
        k1, k2 = jax.random.split(key)
        rope, rate = bool(args.get("rope", True)), float(args.get("dropout", 0.0))
        if G == H:
            return FullAttention(fused_init(k1, D, 3, D), dense_init(k2, D, D), H, rope, rate)
        kq, kkv = jax.random.split(k1)
        return FullAttention(None, dense_init(k2, D, D), H, rope, rate,
                             w_q=dense_init(kq, D, D), w_kv=fused_init(kkv, D, 2, D // H * G))
