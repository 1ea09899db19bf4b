"""Attention numerics shared by the attention layer kinds.

All softmaxes run in float32. Masks are boolean, True = may attend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

_NEG = -1e30


def scores(q: Float[Array, "... Tq H dh"], k: Float[Array, "... Tk G dh"]) -> Float[Array, "... H Tq Tk"]:
    """q·kᵀ in float32 (unscaled). k may have fewer heads than q (grouped-query attention, G | H):
    query head h reads key head h // (H/G), the order `jnp.repeat(k, H // G, axis=-2)` gives,
    computed per group so the keys are never repeated in memory."""
    H, G = q.shape[-2], k.shape[-2]
    if G == H:
        return jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    qg = q.reshape(*q.shape[:-2], G, H // G, q.shape[-1])
    s = jnp.einsum("...qjgd,...kjd->...jgqk", qg, k, preferred_element_type=jnp.float32)
    return s.reshape(*s.shape[:-4], H, *s.shape[-2:])


def mix(w: Float[Array, "... H Tq Tk"], v: Float[Array, "... Tk G dh"]) -> Float[Array, "... Tq H dh"]:
    """w·v per head; v may have fewer heads than w (grouped, as in `scores`)."""
    H, G = w.shape[-3], v.shape[-2]
    if G == H:
        return jnp.einsum("...hqk,...khd->...qhd", w, v)
    wg = w.reshape(*w.shape[:-3], G, H // G, *w.shape[-2:])
    o = jnp.einsum("...jgqk,...kjd->...qjgd", wg, v)
    return o.reshape(*o.shape[:-3], H, o.shape[-1])


def attend(q: Float[Array, "... Tq H dh"], k: Float[Array, "... Tk G dh"], v: Float[Array, "... Tk G dh"],
           mask: Bool[Array, "..."]) -> Float[Array, "... Tq H dh"]:
    """softmax(q·kᵀ/√dh + mask)·v; mask broadcastable to (..., H, Tq, Tk). k and v may have
    G < H heads (grouped-query attention; see `scores`)."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = scores(q, k) * scale
    logits = jnp.where(mask, logits, _NEG)
    w = jax.nn.softmax(logits, axis=-1)
    return mix(w.astype(v.dtype), v).astype(q.dtype)


def block_mask(window: int, n_context: int | tuple[int, ...], causal_context: bool | tuple[bool, ...] = False
               ) -> Bool[Array, "W S+W"]:
    """[ones(W, S) | tril(W)]: every query sees all context vectors and the block's past.
    `causal_context`: the context is the block's own window (S = W, slot i from position i of
    the block), so query i sees context slots 0..i only: [tril(W) | tril(W)].

    Several context sets (one per context edge) are laid side by side: `n_context` gives their
    sizes in order and `causal_context` one flag per set, so the own-window mask applies to
    the slots of the sets that need it and no others: [ones(W, S1) | tril(W) | … | tril(W)]."""
    sizes = (n_context,) if isinstance(n_context, int) else tuple(n_context)
    flags = causal_context if isinstance(causal_context, tuple) else (causal_context,) * len(sizes)
    if len(flags) != len(sizes):
        raise ValueError(f"{len(sizes)} context sets but {len(flags)} causal_context flags")
    tril = jnp.tril(jnp.ones((window, window), bool))
    parts = []
    for S, causal in zip(sizes, flags):
        if causal and S != window:
            raise ValueError(f"a causal context has one slot per position of the block ({window}), got {S}")
        parts.append(tril if causal else jnp.ones((window, S), bool))
    return jnp.concatenate(parts + [tril], axis=1)


def blockwise_attention(q: Float[Array, "B L H dh"], k: Float[Array, "B L H dh"], v: Float[Array, "B L H dh"],
                        window: int, ctx_k: Float[Array, "B nb S H dh"] | None = None,
                        ctx_v: Float[Array, "B nb S H dh"] | None = None,
                        causal_context: bool | tuple[bool, ...] = False,
                        context_sizes: tuple[int, ...] | None = None) -> Float[Array, "B L H dh"]:
    """Causal attention within blocks of `window` tokens, plus full attention to each block's
    context vectors (or, with `causal_context`, causal attention to a context aligned with the
    block's positions: see `block_mask`). Computed block by block (B·L/W independent problems
    of W queries and S + W keys): the L×L logits are never built, so the cost is O(L·(S + W)·D).

    `ctx_k`/`ctx_v` may hold several context sets concatenated along the slot axis;
    `context_sizes` then gives their sizes and `causal_context` one flag per set."""
    B, L, H, dh = q.shape
    nb = L // window
    qb, kb, vb = (t.reshape(B, nb, window, *t.shape[2:]) for t in (q, k, v))  # k, v: G ≤ H heads
    sizes: tuple[int, ...] | int = 0
    if ctx_k is not None:
        sizes = context_sizes if context_sizes is not None else ctx_k.shape[2]
        kb = jnp.concatenate([ctx_k.astype(kb.dtype), kb], axis=2)
        vb = jnp.concatenate([ctx_v.astype(vb.dtype), vb], axis=2)
    out = attend(qb, kb, vb, block_mask(window, sizes, causal_context))
    return out.reshape(B, L, H, dh)


def dense_attention(q: Float[Array, "B L H dh"], k: Float[Array, "B L H dh"], v: Float[Array, "B L H dh"],
                    mask: Bool[Array, "..."]) -> Float[Array, "B L H dh"]:
    """Oracle / full attention: the L×L problem with an explicit mask (L, L) or (B, H, L, L)."""
    return attend(q, k, v, mask)


def apply_rope(x: Float[Array, "... T H dh"], positions) -> Float[Array, "... T H dh"]:
    """Rotary position embedding (Su et al. 2021) on the last axis, half-split convention."""
    dh = x.shape[-1]
    half = dh // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang = jnp.asarray(positions, jnp.float32)[:, None] * freqs[None]  # (T, half)
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]  # (T, 1, half)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:2 * half].astype(jnp.float32)
    rot = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    if 2 * half < dh:
        rot = jnp.concatenate([rot, x[..., 2 * half:].astype(jnp.float32)], axis=-1)
    return rot.astype(x.dtype)


# ---- key/value rings for decoding (sliding, Transformer-XL and BRT attention) -------------------


def ring_cache(batch: int, slots: int, heads: int, dh: int, dtype) -> dict:
    """The keys and values of the last `slots` tokens; pos −1 marks an empty slot."""
    kv = jnp.zeros((batch, slots, heads, dh), dtype)
    return {"k": kv, "v": kv, "pos": jnp.full((slots,), -1, jnp.int32)}


def ring_push(cache: dict, k: Float[Array, "B H dh"], v: Float[Array, "B H dh"], t) -> dict:
    """Token t's key and value into slot t mod slots (other entries of `cache` are kept)."""
    slot = t % cache["pos"].shape[0]
    return {**cache, "k": cache["k"].at[:, slot].set(k), "v": cache["v"].at[:, slot].set(v),
            "pos": cache["pos"].at[slot].set(t)}


def ring_visible(cache: dict, first, t) -> Bool[Array, "slots"]:
    """The slots holding positions first..t."""
    pos = cache["pos"]
    return (pos >= 0) & (pos >= first) & (pos <= t)
