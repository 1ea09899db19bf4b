"""`linear`: a position-wise affine map with an optional activation, y = act(x W + b).

W is (D, out) with out = d_model unless `out` says otherwise. Each position is mapped alone, so
the layer is causal and decodes one token as the layer applied to it (`Positionwise`). Only a
d_model-wide output can join the residual stream: the checker reports a residual `linear` with
another width at its `out` argument (see `width_arg` and bstc/passes/check.py).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._common import GELU_FLOPS, Positionwise, dense_init, dropout
from bstc.ops.base import Op, Param, register

ACTS = {"none": None, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu, "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid}
# Per output element, as XLA's cost analysis counts the activation (tests/test_ops_linear.py).
ACT_FLOPS = {"none": 0.0, "gelu": GELU_FLOPS, "silu": 4.0, "relu": 1.0, "tanh": 1.0, "sigmoid": 3.0}


def out_width(args, dims) -> int:
    """`out: 0` means d_model."""
    return int(args.get("out", 0) or 0) or dims.d_model


class LinearLayer(eqx.Module, Positionwise):
    w: Float[Array, "D O"]
    b: Float[Array, "O"] | None
    act: str = eqx.field(static=True)
    dropout: float = eqx.field(static=True, default=0.0)

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None) -> Float[Array, "B L O"]:
        y = x @ self.w.astype(x.dtype)
        if self.b is not None:
            y = y + self.b.astype(x.dtype)
        f = ACTS[self.act]
        if f is not None:
            y = f(y)
        return dropout(y, self.dropout, key)


@register
class Linear(Op):
    kind = "linear"
    role = "mlp"  # a position-wise map: its cost counts with the feed-forward layers
    # Column-parallel like an MLP's input map: fsdp on the input width, tensor on the output.
    axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
    optim = {"w": "weight", "b": "bias"}
    # The argument that sets the output width: the checker points at it when that width cannot
    # join the residual stream.
    width_arg = "out"
    doc = "position-wise affine map y = act(x W + b)"
    params = (
        Param("out", int, 0, min=0, doc="output width (0 = d_model; other widths cannot be residual)"),
        Param("bias", bool, False, doc="add a bias b (out)"),
        Param("act", str, "none", choices=tuple(ACTS), doc="activation after the affine map"),
        Param("dropout", float, 0.0, min=0.0, max=0.99, doc="dropout on the output"),
    )

    def out_shape(self, args, dims):
        return ("B", dims.seq_len, out_width(args, dims))

    def param_count(self, args, dims, context):
        O = out_width(args, dims)
        return dims.d_model * O + (O if args["bias"] else 0)

    def flops_per_token(self, args, dims, context):
        O = out_width(args, dims)
        return 2.0 * dims.d_model * O + (O if args["bias"] else 0) + ACT_FLOPS[args["act"]] * O

    def activation_bytes_per_token(self, args, dims, context):
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        return (dims.d_model + 2 * out_width(args, dims)) * itemsize  # input, pre- and post-activation

    def build(self, args, dims, context, *, key):
        O = out_width(args, dims)
        return LinearLayer(w=dense_init(key, dims.d_model, O), b=jnp.zeros((O,)) if args["bias"] else None,
                           act=str(args["act"]), dropout=float(args["dropout"]))
