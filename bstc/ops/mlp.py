"""`mlp`: the position-wise feed-forward sublayer (GELU, ReLU or SwiGLU)."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._common import Positionwise, dropout
from bstc.ops.base import Op, Param, register

ACT_FLOPS = {"gelu": 8.0, "relu": 1.0, "swiglu": 6.0}  # per hidden element, as XLA counts them


class MLPLayer(eqx.Module, Positionwise):
    w_in: Float[Array, "D M"]
    w_gate: Float[Array, "D M"] | None
    w_out: Float[Array, "M D"]
    b_in: Float[Array, "M"] | None
    b_out: Float[Array, "D"] | None
    act: str = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None) -> Float[Array, "B L D"]:
        dt = x.dtype
        h = x @ self.w_in.astype(dt)
        if self.b_in is not None:
            h = h + self.b_in.astype(dt)
        if self.act == "swiglu":
            h = jax.nn.silu(x @ self.w_gate.astype(dt)) * h
        elif self.act == "gelu":
            h = jax.nn.gelu(h)
        else:
            h = jax.nn.relu(h)
        h = dropout(h, self.dropout, key)
        y = h @ self.w_out.astype(dt)
        if self.b_out is not None:
            y = y + self.b_out.astype(dt)
        return y


@register
class MLP(Op):
    kind = "mlp"
    role = "mlp"
    axes = {"w_in": ("embed", "mlp"), "w_gate": ("embed", "mlp"), "w_out": ("mlp", "embed"), "b_in": ("mlp",),
            "b_out": ("embed",)}
    optim = {"w_in": "weight", "w_gate": "weight", "w_out": "weight", "b_in": "bias", "b_out": "bias"}
    doc = "position-wise feed-forward network"
    params = (
        Param("hidden", int, min=1, doc="hidden width, e.g. 4 * d_model"),
        Param("act", str, "gelu", choices=("gelu", "swiglu", "relu")),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
        Param("bias", bool, False),
    )

    def param_count(self, args, dims, context):
        D, M = dims.d_model, args["hidden"]
        n = (3 if args["act"] == "swiglu" else 2) * D * M
        if args["bias"]:
            n += M + D
        return n

    def flops_per_token(self, args, dims, context):
        D, M = dims.d_model, args["hidden"]
        mats = (3 if args["act"] == "swiglu" else 2) * 2 * D * M
        return mats + ACT_FLOPS[args["act"]] * M + (M + D if args["bias"] else 0)

    def activation_bytes_per_token(self, args, dims, context):
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        return (dims.d_model + 2 * args["hidden"]) * itemsize

    def build(self, args, dims, context, *, key):
        D, M = dims.d_model, args["hidden"]
        k1, k2, k3 = jax.random.split(key, 3)
        return MLPLayer(
            w_in=jax.random.normal(k1, (D, M)) / jnp.sqrt(D),
            w_gate=jax.random.normal(k3, (D, M)) / jnp.sqrt(D) if args["act"] == "swiglu" else None,
            w_out=jax.random.normal(k2, (M, D)) / jnp.sqrt(M) / jnp.sqrt(2.0),
            b_in=jnp.zeros((M,)) if args["bias"] else None,
            b_out=jnp.zeros((D,)) if args["bias"] else None,
            act=args["act"], dropout=float(args["dropout"]))
