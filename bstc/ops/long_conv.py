"""`long_conv`: the unstructured SSM — an explicit long-convolution kernel per channel
(Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions for Sequence Modeling"), the
paper's "unstructured" kernel option.

The kernel k (F, D, Lk) is a free parameter (init randn·0.002), regularised on every use by
smoothing (an average pool of width `smooth` along the length) and squashing
(relu(|k| − λ)·sign(k), which drives small entries to exactly zero), then convolved with the
input by FFT in float32. Skip D, gelu and a position-wise output linear follow, as in `s4d`.
The kernel trains with its own learning rate: its submodule carries `lr_multiplier`, which
the runtime applies to the kernel's updates (not to the skip or the output linear).

Note on the defaults: after smoothing by 3 the init std 0.002 falls to ≈0.0012, and the squash
passes no gradient to entries below λ. λ = 0.001 keeps ~40% of the entries alive at init, so
the kernel trains from the first step; λ = 0.003 (~1% alive) gives a much sparser kernel that
only grows where it is useful, and learns slowly in short runs.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops import _ssm
from bstc.ops._common import dropout
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


def squash_kernel(k: Float[Array, "..."], lam: float) -> Float[Array, "..."]:
    """relu(|k| − λ)·sign(k): entries with |k| ≤ λ become exactly 0, the rest shrink towards 0 by λ."""
    return jax.nn.relu(jnp.abs(k) - lam) * jnp.sign(k)


class LongConvKernel(eqx.Module):
    """The explicit kernels and their regularisers. A module of its own so that `lr_multiplier`
    (read by the runtime for every array leaf under the module that carries it) scales the
    kernel's updates only, as in Fu et al., not the skip or the output linear."""

    weight: Float[Array, "F H Lk"]
    smooth: int = eqx.field(static=True)
    lam: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    lr_multiplier: float = eqx.field(static=True)

    def __call__(self, *, key=None) -> Float[Array, "F H Lk"]:
        # smooth, then squash, then dropout (the order of Fu et al.'s reference code); float32
        k = squash_kernel(smooth_kernel(self.weight.astype(jnp.float32), self.smooth), self.lam)
        return dropout(k, self.dropout, key)


class LongConvLayer(eqx.Module):
    """x (B, L, H) → (B, L, H), or (B, L, F, H) with F filters."""

    kernel: LongConvKernel
    D: Float[Array, "F H"]  # skip
    w_out: Float[Array, "H H"]  # (out, in), shared by the filters
    b_out: Float[Array, "H"]
    dropout: float = eqx.field(static=True)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    def init_cache(self, batch: int, dtype, length: int | None = None) -> Float[Array, "B Lk H"]:
        """The last Lk inputs, newest first (the kernel reaches no further back)."""
        return jnp.zeros((batch, self.kernel.weight.shape[-1], self.w_out.shape[0]), jnp.float32)

    def decode(self, cache, x_t: Float[Array, "B H"], t, *, context=None):
        """One token: y_t[f] = Σ_j K[f, :, j]·x_{t−j} over the cached history. O(F·H·Lk) per token,
        no FFT; equal to row t of `self(x)` (deterministic)."""
        hist = jnp.concatenate([x_t.astype(jnp.float32)[:, None], cache[:, :-1]], axis=1)  # (B, Lk, H)
        y = jnp.einsum("fhj,bjh->bfh", self.kernel(), hist)  # (B, F, H), float32
        out = _ssm.ssm_output(y[:, None], x_t[:, None], self.D, self.w_out, self.b_out, x_t.dtype)
        return hist, out[:, 0]

    def __call__(self, x: Float[Array, "B L H"], *, context=None, key=None):
        k_ker, k_out = jax.random.split(key) if key is not None else (None, None)
        # Kernels shorter than L are zero-padded (no influence beyond kernel_len); longer ones cut.
        y = _ssm.multi_filter_fft_conv(x, self.kernel(key=k_ker))  # (B, L, F, H), float32
        return _ssm.ssm_output(y, x, self.D, self.w_out, self.b_out, x.dtype, dropout=self.dropout, key=k_out)


@register
class LongConv(Op):
    kind = "long_conv"
    role = "ssm"
    axes = _ssm.SSM_AXES
    optim = _ssm.SSM_OPTIM
    context_source = True
    doc = "unstructured SSM: explicit long-convolution kernels, smoothed and squashed"
    params = (
        Param("filters", int, 1, min=1, doc="F: kernels per channel (MF: S)"),
        Param("kernel_len", int, 0, min=0, doc="kernel length (0 = seq_len); longer inputs see zeros beyond it"),
        Param("smooth", int, 3, min=1, doc="average-pool width applied to the kernel"),
        Param("lam", float, 0.001, min=0.0, doc="squash threshold λ: relu(|k| − λ)·sign(k)"),
        Param("kernel_dropout", float, 0.0, min=0.0, max=0.99),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
        Param("lr_mult", float, 0.1, min=0.0, doc="learning-rate multiplier of the kernel (its own lr group)"),
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
        kernel = LongConvKernel(jax.random.normal(k_k, (F, H, self._len(args, dims))) * 0.002,  # Fu et al.'s init
                                smooth=int(args["smooth"]), lam=float(args["lam"]),
                                dropout=float(args["kernel_dropout"]), lr_multiplier=float(args["lr_mult"]))
        return LongConvLayer(kernel=kernel, D=jax.random.normal(k_d, (F, H)),
                             w_out=jax.random.normal(k_w, (H, H)) / jnp.sqrt(H), b_out=jnp.zeros((H,)),
                             dropout=float(args["dropout"]))
