"""`xl_attention`: Transformer-XL attention (Dai et al. 2019), the paper's Transformer-XL row.

The sequence is cut into segments (blocks) of W. Block k attends causally to itself and to a
*memory*: the previous M tokens. As in Transformer-XL the memory is the layer's input over
those tokens with the gradient stopped (`h̃ = [SG(m); h]`): keys and values of the memory are
computed from `stop_gradient(x)` with the current weights, so the weights learn from the memory
path but no gradient flows back into earlier blocks' activations. Training therefore sees the
same truncated-backprop structure as segment-by-segment Transformer-XL, computed here for all
blocks in parallel.

Positions: T5-style relative position biases (Raffel et al. 2020) instead of TXL's sinusoidal
relative encoding with its r/u/v terms — the same information (a learned function of the
query–key distance), one (buckets, heads) table, and one (H, W, M+W) bias shared by every
block because every block sees the same distance pattern. 32 buckets, half exact distances,
half log-spaced up to the farthest key (M + W − 1).

The table starts as a recency prior (ALiBi's per-head slopes, Press et al. 2022: head h's bias
is −2^(−8(h+1)/H) × distance), not at zero. A zero table leaves the layer with no sense of
order beyond the causal mask, and Adam moves each bias by about the learning rate per step, so
learning "the previous byte matters most" from zero takes thousands of steps: at the LM
table's size and 300 steps, the zero start left Transformer-XL 0.6 bits/byte behind Slide.
"""
from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register
from bstc.ops._common import (ATTN_AXES, ATTN_OPTIM, KV_HEADS_PARAM_DOC, SOFTMAX_FLOPS, check_heads, check_kv_heads,
                              check_window, dense_init, dropout, fused_heads, fused_init, grouped_axes, heads_of,
                              kv_heads_of, merge_heads, named_axes, split_heads)

NUM_BUCKETS = 32


def memory_of(args, dims: Dims) -> int:
    m = int(args.get("memory", 0) or 0)
    return m if m > 0 else int(args["window"])


def t5_buckets(distance: np.ndarray, num_buckets: int, max_distance: int, xp=np) -> np.ndarray:
    """Causal T5 bucketing of a distance q − k ≥ 0: exact below num_buckets/2, then log-spaced.
    xp: numpy for the static layout of the forward pass, jax.numpy for a traced decode position."""
    n = xp.maximum(distance, 0)
    exact = num_buckets // 2
    large = exact + (xp.log(xp.maximum(n, 1) / exact) / math.log(max(max_distance, exact + 1) / exact)
                     * (num_buckets - exact)).astype(xp.int32)
    return xp.where(n < exact, n, xp.minimum(large, num_buckets - 1))


def recency_prior(heads: int, max_distance: int) -> np.ndarray:
    """(buckets, heads) initial biases: ALiBi's slope per head times each bucket's smallest
    distance (a bucket no distance reaches gets the farthest)."""
    n = np.arange(max_distance + 1)
    buckets = t5_buckets(n, NUM_BUCKETS, max_distance)
    first = np.full(NUM_BUCKETS, max_distance, np.float32)
    np.minimum.at(first, buckets, n.astype(np.float32))
    slopes = 2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)
    return -(first[:, None] * slopes[None, :]).astype(np.float32)


def xl_layout(window: int, memory: int, n_blocks: int):
    """Static index arrays: memory positions per block, their validity, and the bias buckets."""
    W, M = window, memory
    start = np.arange(n_blocks)[:, None] * W
    mem_pos = start - M + np.arange(M)[None, :]  # (nb, M) absolute positions of the memory
    mem_ok = mem_pos >= 0  # block 0 (and early blocks when M > W) have no (full) memory
    i = np.arange(W)[:, None]
    j = np.arange(M + W)[None, :]  # key index in [memory; block]
    dist = i + M - j  # query − key distance, the same for every block
    buckets = t5_buckets(dist, NUM_BUCKETS, M + W - 1)
    return np.maximum(mem_pos, 0), mem_ok, buckets, dist >= 0


def attend_with_bias(q: Float[Array, "*b Tq H dh"], k: Float[Array, "*b Tk H dh"], v: Float[Array, "*b Tk H dh"],
                     mask: Bool[Array, "..."], bias: Float[Array, "H Tq Tk"]) -> Float[Array, "*b Tq H dh"]:
    """Softmax attention with an additive bias (bstc.ops._attention.attend takes none); f32 softmax.
    k and v may have fewer heads than q (grouped-query attention, see `_attention.scores`)."""
    from bstc.ops._attention import mix, scores

    logits = scores(q, k)
    logits = logits * q.shape[-1] ** -0.5 + bias
    logits = jnp.where(mask, logits, -1e30)
    p = jax.nn.softmax(logits, axis=-1)
    return mix(p.astype(v.dtype), v)


class XLAttention(eqx.Module):
    """x (B, L, D) -> attention over [stop-gradient memory of M tokens; current block] (B, L, D)."""

    w_q: Float[Array, "D D"]
    w_kv: Float[Array, "D 2 GK"]  # (in, k|v, out): see fused_init; GK = kv_heads·dh (= D by default)
    w_o: Float[Array, "D D"]
    rel_bias: Float[Array, "buckets H"]
    heads: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    memory: int = eqx.field(static=True)
    rate: float = eqx.field(static=True)
    stop_memory_grad: bool = eqx.field(static=True, default=True)  # False only in tests (the contrast)

    def _kv_heads(self) -> int:
        return self.w_kv.shape[-1] // (self.w_q.shape[-1] // self.heads)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        B, L, D = x.shape
        W, M, H, nb = self.window, self.memory, self.heads, L // self.window
        G = self._kv_heads()
        mem_pos, mem_ok, buckets, causal = xl_layout(W, M, nb)
        q = split_heads(x @ self.w_q.astype(x.dtype), H).reshape(B, nb, W, H, -1)  # (B, nb, W, H, dh)
        k, v = (t.reshape(B, nb, W, G, -1) for t in fused_heads(x, self.w_kv, G))  # G ≤ H K/V heads
        # The memory: keys/values from the stop-gradient input (weights still get gradients).
        xm = jax.lax.stop_gradient(x) if self.stop_memory_grad else x
        xm = xm[:, mem_pos.reshape(-1)]  # (B, nb·M, D): the M tokens before each block
        km, vm = (t.reshape(B, nb, M, G, -1) for t in fused_heads(xm, self.w_kv, G))
        k = jnp.concatenate([km, k], axis=2)  # (B, nb, M+W, H, dh)
        v = jnp.concatenate([vm, v], axis=2)
        ok = np.concatenate([mem_ok, np.ones((nb, W), bool)], axis=1)  # (nb, M+W)
        mask = jnp.asarray(causal[None] & ok[:, None, :])[:, None]  # (nb, 1, W, M+W)
        bias = jnp.transpose(self.rel_bias.astype(jnp.float32)[buckets], (2, 0, 1))  # (H, W, M+W)
        y = attend_with_bias(q, k, v, mask, bias)  # (B, nb, W, H, dh)
        y = merge_heads(y.reshape(B, L, H, -1)).astype(x.dtype) @ self.w_o.astype(x.dtype)
        return dropout(y, self.rate, key)

    # ---- the decoding protocol (bstc/decode.py): the last M + W keys/values, in a ring ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        from bstc.ops._attention import ring_cache

        return ring_cache(batch, self.memory + self.window, self._kv_heads(), self.w_o.shape[0] // self.heads, dtype)

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import ring_push, ring_visible

        W, M, H = self.window, self.memory, self.heads
        q = split_heads(x_t @ self.w_q.astype(x_t.dtype), H)[:, None]  # (B, 1, H, dh)
        k, v = fused_heads(x_t, self.w_kv, self._kv_heads())
        cache = ring_push(cache, k, v, t)
        visible = ring_visible(cache, (t // W) * W - M, t)  # the M tokens before the block, the block up to t
        buckets = t5_buckets(t - cache["pos"], NUM_BUCKETS, M + W - 1, xp=jnp)
        bias = jnp.transpose(self.rel_bias.astype(jnp.float32)[buckets])[:, None, :]  # (H, 1, M + W)
        y = attend_with_bias(q, cache["k"], cache["v"], visible[None], bias)[:, 0]
        return cache, merge_heads(y).astype(x_t.dtype) @ self.w_o.astype(x_t.dtype)


@register
class XLAttentionOp(Op):
    kind = "xl_attention"
    role = "attn"
    axes = ATTN_AXES
    optim = ATTN_OPTIM
    params = (
        Param("window", int, doc="segment (block) length W"),
        Param("memory", int, 0, min=0, doc="memory length M in tokens (0 = window)"),
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("dropout", float, 0.0, min=0.0, max=1.0, doc="dropout on the attention output"),
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )
    doc = ("Transformer-XL attention: each block attends causally to itself and to a stop-gradient memory "
           "of the previous M tokens, with T5 relative position biases; O(L·(M+W)).")

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        out = (check_heads(args, dims) or check_kv_heads(args, dims)) + check_window(args, dims)
        if int(args.get("memory", 0) or 0) > dims.seq_len:
            out.append(Problem(f"memory ({args['memory']}) is longer than seq_len ({dims.seq_len})", "memory"))
        return out

    def logical_axes(self, args, dims: Dims, context, module):
        return named_axes(module, grouped_axes(self.axes, args, dims))

    def param_count(self, args, dims: Dims, context) -> int:
        D, H = dims.d_model, heads_of(args, dims)
        DK = D // H * kv_heads_of(args, dims)  # width of k (and of v)
        return 2 * D * D + 2 * D * DK + NUM_BUCKETS * H

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, W, H, M = dims.d_model, int(args["window"]), heads_of(args, dims), memory_of(args, dims)
        DK = D // H * kv_heads_of(args, dims)
        # q, k, v, out for the block, plus k, v again for the memory (M per block of W tokens).
        proj = 2 * D * (2 * D + 2 * DK) + 2 * D * 2 * DK * M / W
        attn = 2 * (M + W) * D * 2 + (SOFTMAX_FLOPS + 1) * H * (M + W)  # +1: the bias add
        return float(proj + attn)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        M, W = memory_of(args, dims), int(args["window"])
        DK = dims.d_model // heads_of(args, dims) * kv_heads_of(args, dims)
        return (2 * dims.d_model + (2 + 2 * M / W) * DK) * item + heads_of(args, dims) * (M + W) * 4

    def build(self, args, dims: Dims, context, *, key):
        D, H = dims.d_model, heads_of(args, dims)
        k1, k2, k3 = jax.random.split(key, 3)
        DK = D // H * kv_heads_of(args, dims)  # with kv_heads = heads, DK = D: the layout is unchanged
        return XLAttention(dense_init(k1, D, D), fused_init(k2, D, 2, DK), dense_init(k3, D, D),
                           jnp.asarray(recency_prior(H, memory_of(args, dims) + int(args["window"]) - 1)), H, int(args["window"]),
                           memory_of(args, dims), float(args.get("dropout", 0.0)))
