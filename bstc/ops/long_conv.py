"""`long_conv`: the unstructured SSM — an explicit long-convolution kernel per channel
(Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions for Sequence Modeling"), the
paper's "unstructured" kernel option.

The kernel k (F, D, Lk) is a free parameter (init randn·0.002), regularised on every use by
smoothing (an average pool of width `smooth` along the length) and squashing
(relu(|k| − λ)·sign(k), which drives small entries to exactly zero). It trains with its own
learning rate: the module carries `lr_multiplier`, which the runtime applies to its updates.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops import _ssm
from bstc.ops.base import Op, Param, Problem, register


def smooth_kernel(k: Float[Array, "... L"], width: int) -> Float[Array, "... L"]:
    """Average pool of `width` along the last axis, same length (edge windows are shorter)."""
    if width <= 1:
        return k
    L = k.shape[-1]
    pad_l, pad_r = (width - 1) // 2, width // 2
    c = jnp.cumsum(jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(pad_l + 1, pad_r)]), axis=-1)
    sums = c[..., width:] - c[..., :-width]
    ones = jnp.cumsum(jnp.pad(jnp.ones((L,)), (pad_l + 1, pad_r)))
    counts = ones[width:] - ones[:-width]
    return sums / counts


def squash_kernel(k, lam: float):
    return jax.nn.relu(jnp.abs(k) - lam) * jnp.sign(k)


class LongConvLayer(eqx.Module):
    kernel_raw: Float[Array, "F H Lk"]
    D: Float[Array, "F H"]
    w_out: Float[Array, "H H"]
    b_out: Float[Array, "H"]
    smooth: int = eqx.field(static=True)
    lam: float = eqx.field(static=True)
    kernel_dropout: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    lr_multiplier: float = eqx.field(static=True)

    def kernel(self, *, key=None) -> Float[Array, "F H Lk"]:
        k = squash_kernel(smooth_kernel(self.kernel_raw.astype(jnp.float32), self.smooth), self.lam)
        if self.kernel_dropout > 0 and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.kernel_dropout, k.shape)
            k = jnp.where(keep, k / (1.0 - self.kernel_dropout), 0.0)
        return k

    def __call__(self, x: Float[Array, "B L H"], *, context=None, key=None):
        k_ker, k_out = jax.random.split(key) if key is not None else (None, None)
        y = _ssm.multi_filter_fft_conv(x, self.kernel(key=k_ker))  # (B, L, F, H)
        return _ssm.ssm_output(y, x, self.D, self.w_out, self.b_out, x.dtype, dropout=self.dropout, key=k_out)


@register
class LongConv(Op):
    kind = "long_conv"
    role = "ssm"
    context_source = True
    doc = "unstructured SSM: explicit long-convolution kernels, smoothed and squashed"
    params = (
        Param("filters", int, 1, min=1, doc="F: kernels per channel (MF: S)"),
        Param("kernel_len", int, 0, min=0, doc="kernel length (0 = seq_len); longer inputs see zeros beyond it"),
        Param("smooth", int, 3, min=1, doc="average-pool width applied to the kernel"),
        Param("lam", float, 0.001, min=0.0, doc="squash threshold λ (below the init scale 0.002, so most entries start alive)"),
        Param("kernel_dropout", float, 0.0, min=0.0, max=0.99),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
        Param("lr_mult", float, 0.1, min=0.0, doc="learning-rate multiplier of this layer's parameters"),
    )

    def _len(self, args, dims) -> int:
        return args["kernel_len"] or dims.seq_len

    def check(self, args, dims, context):
        if args["smooth"] > self._len(args, dims):
            return [Problem(f"smooth ({args['smooth']}) is longer than the kernel ({self._len(args, dims)})", "smooth")]
        return []

    def param_count(self, args, dims, context):
        H, F = dims.d_model, args["filters"]
        return F * H * self._len(args, dims) + F * H + H * H + H

    def flops_per_token(self, args, dims, context):
        H, F, L = dims.d_model, args["filters"], dims.seq_len
        kernel = F * H * self._len(args, dims) * 6.0 / L  # smoothing (cumsum, diff, divide) and squash, once per sequence
        return kernel + _ssm.ssm_common_flops(F, H, L)

    def activation_bytes_per_token(self, args, dims, context):
        return 4 * dims.d_model * args["filters"] * 4 + 2 * dims.d_model * 4

    def build(self, args, dims, context, *, key):
        H, F = dims.d_model, args["filters"]
        k_k, k_d, k_w = jax.random.split(key, 3)
        return LongConvLayer(
            kernel_raw=jax.random.normal(k_k, (F, H, self._len(args, dims))) * 0.002,
            D=jax.random.normal(k_d, (F, H)),
            w_out=jax.random.normal(k_w, (H, H)) / jnp.sqrt(H),
            b_out=jnp.zeros((H,)),
            smooth=int(args["smooth"]), lam=float(args["lam"]), kernel_dropout=float(args["kernel_dropout"]),
            dropout=float(args["dropout"]), lr_multiplier=float(args["lr_mult"]))
