"""What full and sliding-window self-attention share: their q/k/v and output weights (fused, or
apart for grouped-query attention), the projections in and out of heads, the parameter count
and the construction. Each kind's own file keeps what differs: which keys a query sees, its
decoding cache and its cost rule."""
from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from bstc.ops._common import dense_init, fused_init, heads_of, kv_heads_of, merge_heads, qkv_heads
from bstc.ops.base import Dims


class SelfAttentionWeights(eqx.Module):
    """x (B, L, D) -> q (B, L, H, dh) and k, v (B, L, G, dh); attention output (…, H, dh) -> (…, D)."""

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

    def _head_dim(self) -> int:
        return self.w_o.shape[0] // self.heads

    def project(self, x: Float[Array, "*b D"]) -> list[Array]:
        """q (…, H, dh), k and v (…, G, dh)."""
        return qkv_heads(x, self.w_qkv, self.w_q, self.w_kv, self.heads)

    def output(self, y: Float[Array, "*b H dh"], dtype) -> Float[Array, "*b D"]:
        return merge_heads(y).astype(dtype) @ self.w_o.astype(dtype)


def self_attention_params(args, dims: Dims) -> int:
    """q and output D×D each; k and v D×(G·dh) each."""
    D = dims.d_model
    DK = D // heads_of(args, dims) * kv_heads_of(args, dims)  # width of k (and of v)
    return 2 * D * D + 2 * D * DK


def build_self_attention(cls, args, dims: Dims, key: PRNGKeyArray, **static) -> SelfAttentionWeights:
    """A `cls` layer with fresh weights: fused q|k|v, or q apart from k|v with kv_heads < heads."""
    D, H, G = dims.d_model, heads_of(args, dims), kv_heads_of(args, dims)
    k1, k2 = jax.random.split(key)
    common = dict(heads=H, rope=bool(args.get("rope", True)), rate=float(args.get("dropout", 0.0)), **static)
    if G == H:
        return cls(w_qkv=fused_init(k1, D, 3, D), w_o=dense_init(k2, D, D), **common)
    kq, kkv = jax.random.split(k1)
    return cls(w_qkv=None, w_o=dense_init(k2, D, D), w_q=dense_init(kq, D, D), w_kv=fused_init(kkv, D, 2, D // H * G),
               **common)
