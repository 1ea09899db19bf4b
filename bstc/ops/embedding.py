"""`embedding` (token ids → vectors) and `head` (vectors → logits, tied to the embedding or not)."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bstc.ops.base import Op, Param, register


class EmbeddingLayer(eqx.Module):
    weight: Float[Array, "V D"]

    def __call__(self, tokens: Int[Array, "B L"], *, context=None, key=None) -> Float[Array, "B L D"]:
        return jnp.take(self.weight, tokens, axis=0)


class HeadLayer(eqx.Module):
    weight: Float[Array, "V D"] | None  # None: tied to the embedding

    def __call__(self, x: Float[Array, "B L D"], *, embedding: EmbeddingLayer | None = None, key=None):
        if self.weight is None:
            # The embedding is N(0, 1) (a unit-scale residual stream); scaling by 1/√D gives the
            # tied head unit-scale logits at init, like the untied head's N(0, 1/D) weights.
            x = x * jnp.asarray(x.shape[-1] ** -0.5, x.dtype)
            return x @ embedding.weight.astype(x.dtype).T
        w = self.weight
        return x @ w.astype(x.dtype).T


@register
class Embedding(Op):
    kind = "embedding"
    role = "embed"
    axes = {"weight": ("vocab", "embed")}
    optim = {"weight": "embedding"}
    doc = "token embedding"
    params = ()

    def out_shape(self, args, dims):
        return ("B", dims.seq_len, dims.d_model)

    def param_count(self, args, dims, context):
        return dims.vocab * dims.d_model

    def flops_per_token(self, args, dims, context):
        return 0.0

    def activation_bytes_per_token(self, args, dims, context):
        return 0.0

    def build(self, args, dims, context, *, key):
        return EmbeddingLayer(jax.random.normal(key, (dims.vocab, dims.d_model)))


@register
class Head(Op):
    kind = "head"
    role = "embed"
    axes = {"weight": ("vocab", "embed")}
    optim = {"weight": "weight"}  # untied: an output projection (tied: no parameter of its own)
    doc = "output projection to the vocabulary"
    params = (Param("tied", bool, False, doc="reuse the embedding matrix"),)

    def out_shape(self, args, dims):
        return ("B", dims.seq_len, dims.vocab)

    def param_count(self, args, dims, context):
        return 0 if args["tied"] else dims.vocab * dims.d_model

    def flops_per_token(self, args, dims, context):
        return 2.0 * dims.d_model * dims.vocab

    def activation_bytes_per_token(self, args, dims, context):
        return 0.0

    def build(self, args, dims, context, *, key):
        if args["tied"]:
            return HeadLayer(None)
        return HeadLayer(jax.random.normal(key, (dims.vocab, dims.d_model)) / jnp.sqrt(dims.d_model))
