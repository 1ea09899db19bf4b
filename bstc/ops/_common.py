"""Small helpers shared by the layer kinds: dropout, projection init, RMS norm, heads arithmetic,
argument checks, logical axes by parameter name, and the per-element FLOP costs used by the
cost rules."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from bstc.ops.base import Dims, Problem, named_axes  # noqa: F401 - re-exported for the ops


# Rough per-element costs of the non-matmul work, as XLA's cost analysis counts it (one flop per
# elementwise op; exp/rsqrt are counted as one flop each too). Calibrated against
# `compiled.cost_analysis()['flops']` in tests/test_ops_baselines.py so that `bstc explain` agrees
# with XLA within a few percent even at tiny widths, where these terms are not negligible.
SOFTMAX_FLOPS = 5.0  # per logit: scale, mask-select, max-subtract, exp, divide (+ the sum)
ROPE_FLOPS = 3.0  # per rotated element (q and k): two multiplies and an add
RMS_FLOPS = 4.0  # per element: square, sum, scale, weight
GELU_FLOPS = 8.0  # per element (tanh approximation as XLA lowers it)


def heads_of(args: Mapping[str, Any], dims: Dims) -> int:
    """`heads: 0` means the model's head count."""
    h = int(args.get("heads", 0) or 0)
    return h if h > 0 else dims.heads


def check_heads(args: Mapping[str, Any], dims: Dims) -> list[Problem]:
    h = heads_of(args, dims)
    if h <= 0 or dims.d_model % h:
        return [Problem(f"d_model ({dims.d_model}) is not divisible by heads ({h})",
                        "heads" if args.get("heads") else None,
                        "choose heads that divide d_model")]
    return []


def kv_heads_of(args: Mapping[str, Any], dims: Dims) -> int:
    """`kv_heads: 0` means one key/value head per query head (standard multi-head attention)."""
    g = int(args.get("kv_heads", 0) or 0)
    return g if g > 0 else heads_of(args, dims)


def check_kv_heads(args: Mapping[str, Any], dims: Dims) -> list[Problem]:
    """Grouped-query attention: every group of heads/kv_heads query heads shares one K/V head."""
    h, g = heads_of(args, dims), kv_heads_of(args, dims)
    if h > 0 and h % g:
        ok = ", ".join(str(d) for d in range(1, h + 1) if h % d == 0)
        return [Problem(f"kv_heads ({g}) does not divide heads ({h})", "kv_heads",
                        f"each K/V head serves heads/kv_heads query heads: choose one of {ok} "
                        f"(1 = multi-query, {h} or 0 = one K/V head per head)")]
    return []


KV_HEADS_PARAM_DOC = "key/value heads (grouped-query attention; 0 = heads, 1 = multi-query); must divide heads"


def grouped_axes(table: Mapping[str, tuple], args: Mapping[str, Any], dims: Dims,
                 kv_fields: tuple[str, ...] = ("w_kv",)) -> Mapping[str, tuple]:
    """The axes table of an attention op, with the K/V projections' output axis unsharded when
    kv_heads < heads. Their kv_heads·dh columns need not split evenly over a tensor axis sized
    for the query heads (kv_heads = 1 never does), and splitting inside a head would buy nothing:
    the K/V projection is heads/kv_heads times narrower than q's, so it is replicated across the
    tensor axis (Megatron does the same when tensor parallelism exceeds the K/V heads) while the
    embed axis still follows its rule (fsdp)."""
    if kv_heads_of(args, dims) == heads_of(args, dims):
        return table
    return {**table, **{f: tuple(table[f][:-1]) + (None,) for f in kv_fields}}


def check_window(args: Mapping[str, Any], dims: Dims, name: str = "window") -> list[Problem]:
    w = int(args[name])
    if w <= 0:
        return [Problem(f"{name} must be positive, got {w}", name)]
    if dims.seq_len % w:
        return [Problem(f"seq_len ({dims.seq_len}) is not divisible by {name} ({w})", name,
                        f"the sequence is split into blocks of {w}")]
    return []


def dense_init(key: PRNGKeyArray, fan_in: int, fan_out: int) -> Float[Array, "i o"]:
    """Normal(0, 1/fan_in): unit-variance outputs for unit-variance inputs."""
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * fan_in ** -0.5


def fused_init(key: PRNGKeyArray, fan_in: int, parts: int, fan_out: int) -> Float[Array, "i p o"]:
    """A fused projection (q, k, v, ...) stored (fan_in, parts, fan_out), initialised like
    dense_init(fan_in, parts·fan_out). Each part keeps its whole output width in the last axis,
    so tensor parallelism over heads splits every part alike; a flat (D, 3D) layout split over
    its columns would hand one device all of q and another all of v."""
    return dense_init(key, fan_in, parts * fan_out).reshape(fan_in, parts, fan_out)


def fused_heads(x: Float[Array, "*b D"], w: Float[Array, "D p E"], heads: int) -> list[Float[Array, "*b H dh"]]:
    """The parts of a fused projection of x, each split into heads."""
    y = jnp.einsum("...d,dpe->...pe", x, w.astype(x.dtype))
    return [split_heads(y[..., i, :], heads) for i in range(w.shape[1])]


def qkv_heads(x: Float[Array, "*b D"], w_qkv, w_q, w_kv, heads: int) -> list[Array]:
    """q (…, H, dh), k and v (…, G, dh) of an attention layer stored either fused (w_qkv: D, 3, D;
    G = H) or, with grouped-query attention, as w_q (D, D) and w_kv (D, 2, G·dh)."""
    if w_qkv is not None:
        return fused_heads(x, w_qkv, heads)
    q = split_heads(x @ w_q.astype(x.dtype), heads)
    return [q, *fused_heads(x, w_kv, w_kv.shape[-1] // q.shape[-1])]


class Positionwise:
    """Mixin for layers that treat every position alone (MLP, norms, dropout): decoding one token
    is the layer applied to it, with no cache. See bstc/decode.py for the decoding protocol:
    `init_cache(batch, dtype, length)` and `decode(cache, x_t, t, *, context=None) -> (cache, y_t)`."""

    def init_cache(self, batch: int, dtype, length: int | None = None):
        return None

    def decode(self, cache, x_t: Float[Array, "B D"], t, *, context=None):
        return cache, self(x_t[:, None])[:, 0]


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; key=None (evaluation) or rate 0 is the identity."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def rms_norm(x: Array, weight: Array, eps: float = 1e-6) -> Array:
    """RMS norm in float32 (a reduction over D in bf16 loses too much), cast back."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


# Attention projections are stored (in, out); the heads·dh side is `heads`, so tensor parallelism
# splits the input projections by column and the output projection by row (Megatron's pair).
ATTN_AXES = {"w_qkv": ("embed", None, "heads"), "w_q": ("embed", "heads"), "w_kv": ("embed", None, "heads"),
             "w_o": ("heads", "embed"), "rel_bias": (None, None)}


ATTN_OPTIM = {"w_qkv": "weight", "w_q": "weight", "w_kv": "weight", "w_o": "weight", "rel_bias": "bias"}


def split_heads(x: Float[Array, "*b T HD"], heads: int) -> Float[Array, "*b T H dh"]:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def merge_heads(x: Float[Array, "*b T H dh"]) -> Float[Array, "*b T HD"]:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
