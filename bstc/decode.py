"""Cached decoding: a lowered model run one token at a time, each layer carrying a cache.

The protocol, for the op modules that support it:

    cache = module.init_cache(batch, dtype, length)            # length: tokens to be decoded
    cache, y_t = module.decode(cache, x_t, t, context=c_t)     # x_t (B, D), t the position

where `c_t` is the context source's output at the same token (a context edge), and `y_t` equals
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

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bstc.lower import _DTYPES, Block, LoweredModel, Scanned, SharedRef, Single, cast_floating

__all__ = ["decodable", "init_caches", "step", "decode_logits"]


def _blocks(model: LoweredModel):
    for stage in model.stages:
        if isinstance(stage, Scanned):
            yield from stage.unit
        elif isinstance(stage, Single):
            yield stage.block
    yield from model.shared.values()


def decodable(model: LoweredModel) -> tuple[bool, str]:
    """(True, "") when every sublayer has a decode step, else (False, the kinds that have none)."""
    missing = sorted({type(sub.op).__name__ for blk in _blocks(model) for sub in blk.subs
                      if not hasattr(sub.op, "decode")})
    return (not missing, ", ".join(missing))


# ---- caches ----------------------------------------------------------------------------------


def _block_cache(block: Block, batch: int, dtype, length: int | None) -> tuple:
    return tuple((sub.norm.init_cache(batch, dtype, length) if sub.norm is not None else None,
                  sub.op.init_cache(batch, dtype, length)) for sub in block.subs)


def init_caches(model: LoweredModel, batch: int, length: int | None = None) -> tuple:
    """One cache per stage (a stacked one for a scanned stage, one per occurrence of a shared
    block). `length`: how many tokens will be decoded (full attention caches that many)."""
    dt = _DTYPES[model.dtype]
    out = []
    for stage in model.stages:
        if isinstance(stage, Scanned):
            # Layer by layer: a cache may start from learned parameters (a BRT's initial state),
            # so layer 0's cache broadcast to the others would be wrong.
            unit = tuple(eqx.filter_vmap(lambda b: _block_cache(b, batch, dt, length))(b) for b in stage.unit)
            out.append(unit)
        elif isinstance(stage, SharedRef):
            out.append(_block_cache(model.shared[stage.group], batch, dt, length))
        else:
            out.append(_block_cache(stage.block, batch, dt, length))
    return tuple(out)


# ---- one token -------------------------------------------------------------------------------


def _block_step(block: Block, cache: tuple, x: Float[Array, "B D"], t) -> tuple[tuple, Float[Array, "B D"]]:
    """Block.__call__ for one token: the same residual stream, norms and context edges."""
    outputs: dict[str, Any] = {}
    new = []
    for sub, (nc, oc) in zip(block.subs, cache):
        h = x
        if sub.norm is not None and sub.placement == "pre":
            nc, h = sub.norm.decode(nc, x, t)
        ctx = outputs[sub.context_source] if sub.context_source else None
        oc, y = sub.op.decode(oc, h, t, context=ctx)
        if sub.keep_output:
            outputs[sub.name] = y
        if sub.residual:
            x = x + y.astype(x.dtype)
            if sub.norm is not None and sub.placement == "post":
                nc, x = sub.norm.decode(nc, x, t)
        new.append((nc, oc))
    return tuple(new), x


def step(model: LoweredModel, caches: tuple, tokens: Int[Array, "B"], t) -> tuple[tuple, Float[Array, "B V"]]:
    """Feed token `tokens` at position t: (new caches, float32 logits for position t + 1)."""
    dt = _DTYPES[model.dtype]
    m = cast_floating(model, dt)
    t = jnp.asarray(t, jnp.int32)
    x = m.embed(tokens[:, None])[:, 0].astype(dt)
    new = []
    for stage, cache in zip(m.stages, caches):
        if isinstance(stage, Scanned):
            params, static = eqx.partition(stage.unit, eqx.is_array)

            def body(x, pc, static=static):
                p, c = pc
                unit = eqx.combine(p, static)
                out = []
                for blk, bc in zip(unit, c):
                    bc, x = _block_step(blk, bc, x, t)
                    out.append(bc)
                return x, tuple(out)

            x, cache = jax.lax.scan(body, x, (params, cache))
        else:
            block = m.shared[stage.group] if isinstance(stage, SharedRef) else stage.block
            cache, x = _block_step(block, cache, x, t)
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
