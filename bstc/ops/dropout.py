"""`dropout`: zero activations at random while training (active only when a key is given)."""
from __future__ import annotations

import equinox as eqx

from bstc.ops._common import Positionwise, dropout
from bstc.ops.base import Op, Param, register


class DropoutLayer(eqx.Module, Positionwise):
    rate: float = eqx.field(static=True)

    def __call__(self, x, *, context=None, key=None):
        return dropout(x, self.rate, key)


@register
class Dropout(Op):
    kind = "dropout"
    role = "other"
    axes = {}  # no parameters
    optim = {}
    doc = "dropout"
    params = (Param("rate", float, 0.1, min=0.0, max=0.99),)

    def param_count(self, args, dims, context):
        return 0

    def flops_per_token(self, args, dims, context):
        return 2.0 * dims.d_model

    def build(self, args, dims, context, *, key):
        return DropoutLayer(float(args["rate"]))
