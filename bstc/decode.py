"""Cached decoding: a lowered model run one token at a time, each layer carrying a cache.

The protocol, for the op modules that support it:

    cache = module.init_cache(batch, dtype, length)            # length: tokens to be decoded
    cache, y_t = module.decode(cache, x_t, t, context=c_t)     # x_t (B, D), t the position

where `c_t` is the context source's output at the same token (a context edge; a tuple of the
sources' outputs, in the order written, for a layer with several), and `y_t` equals
row t of `module(x)` for a causal module. Position-wise layers (MLP, norms, dropout) get it from
`bstc.ops._common.Positionwise`; `s4d` and `gss` step the S4D recurrence
(x_t = dA·x_{t−1} + dB·u_t); `long_conv` convolves a history of its kernel's length;
`block_attention` keeps the current block's keys/values and context; sliding and
Transformer-XL attention keep the last 2W / M + W keys in a ring; the BRT keeps its state and
updates it when a block ends. All of these cost O(1) per token in the length of the history
(the parallel forward pass costs O(L) per token) and have no length limit. Only
`full_attention` keeps every key (`length` of them): O(t) per token.

A model with a layer that has no `decode` (a new layer kind, until it gets one) is not
decodable; `bstc sample` then recomputes the forward pass over a sliding window (see
`bstc.runtime.sampling`). `decodable(model)` says which layers lack it.

Scanned stacks keep stacked caches and run their step under `lax.scan`, like the forward pass.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bstc.lower import _DTYPES, LoweredModel, cast_floating

__all__ = ["decodable", "init_caches", "step", "decode_logits"]


def decodable(model: LoweredModel) -> tuple[bool, str]:
    """(True, "") when every sublayer has a decode step, else (False, the kinds that have none)."""
    missing = sorted({name for blk in model.blocks() for name in blk.decodable()})
    return (not missing, ", ".join(missing))


def init_caches(model: LoweredModel, batch: int, length: int | None = None) -> tuple:
    """One cache per stage (a stacked one for a scanned stage, one per occurrence of a shared
    block). `length`: how many tokens will be decoded (full attention caches that many)."""
    dt = _DTYPES[model.dtype]
    return tuple(stage.init_cache(batch, dt, length, model.shared) for stage in model.stages)


def step(model: LoweredModel, caches: tuple, tokens: Int[Array, "B"], t) -> tuple[tuple, Float[Array, "B V"]]:
    """Feed token `tokens` at position t: (new caches, float32 logits for position t + 1).
    Each block runs its one walk over norms, residuals and context edges (`Block.step`)."""
    dt = _DTYPES[model.dtype]
    m = cast_floating(model, dt)
    t = jnp.asarray(t, jnp.int32)
    x = m.embed(tokens[:, None])[:, 0].astype(dt)
    new = []
    for stage, cache in zip(m.stages, caches):
        cache, x = stage.step(cache, x, t, m.shared)
        new.append(cache)
    if m.final_norm is not None:
        x = m.final_norm(x[:, None])[:, 0]
    logits = m.head(x[:, None], embedding=m.embed)[:, 0]
    return tuple(new), logits.astype(jnp.float32)


@eqx.filter_jit
def decode_logits(model: LoweredModel, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    """Logits of every position, token by token through the caches: equals `model(tokens)`
    (the parallel forward) for a causal model — the test oracle of every decode step."""
    caches = init_caches(model, tokens.shape[0], tokens.shape[1])

    def body(carry, tok_t):
        caches, t = carry
        caches, logits = step(model, caches, tok_t, t)
        return (caches, t + 1), logits

    _, logits = jax.lax.scan(body, (caches, jnp.int32(0)), tokens.T)
    return jnp.moveaxis(logits, 0, 1)
