"""`rms_norm` and `layer_norm` over the model width, computed in float32."""
from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._common import Positionwise, rms_norm
from bstc.ops.base import Op, Param, register


NORM_AXES = {"weight": ("embed",), "bias": ("embed",)}


class RMSNormLayer(eqx.Module, Positionwise):
    weight: Float[Array, "D"]
    eps: float = eqx.field(static=True)

    def __call__(self, x, *, context=None, key=None):
        return rms_norm(x, self.weight, self.eps)


class LayerNormLayer(eqx.Module, Positionwise):
    weight: Float[Array, "D"]
    bias: Float[Array, "D"]
    eps: float = eqx.field(static=True)

    def __call__(self, x, *, context=None, key=None):
        xf = x.astype(jnp.float32)
        mu = xf.mean(-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(-1, keepdims=True)
        y = (xf - mu) / jnp.sqrt(var + self.eps)
        return (y * self.weight.astype(jnp.float32) + self.bias.astype(jnp.float32)).astype(x.dtype)


@register
class RMSNorm(Op):
    kind = "rms_norm"
    role = "norm"
    axes = NORM_AXES
    optim = {"weight": "norm", "bias": "norm"}
    doc = "RMS normalisation with a learned scale"
    params = (Param("eps", float, 1e-6, min=0.0),)

    def param_count(self, args, dims, context):
        return dims.d_model

    def flops_per_token(self, args, dims, context):
        return 4.0 * dims.d_model

    def build(self, args, dims, context, *, key):
        return RMSNormLayer(jnp.ones((dims.d_model,)), float(args["eps"]))


@register
class LayerNorm(Op):
    kind = "layer_norm"
    role = "norm"
    axes = NORM_AXES
    optim = {"weight": "norm", "bias": "norm"}
    doc = "layer normalisation with learned scale and bias"
    params = (Param("eps", float, 1e-6, min=0.0),)

    def param_count(self, args, dims, context):
        return 2 * dims.d_model

    def flops_per_token(self, args, dims, context):
        return 7.0 * dims.d_model

    def build(self, args, dims, context, *, key):
        return LayerNormLayer(jnp.ones((dims.d_model,)), jnp.zeros((dims.d_model,)), float(args["eps"]))
