"""SSM numerics shared by the SSM-like layer kinds: S4D kernels, their oracles, causal convolution.

S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
Models"): per channel h, N/2 complex modes A_n = -exp(log_A_re) + i·A_im, B = 1, complex C,
zero-order-hold discretisation with step dt = exp(log_dt):

    dA = exp(dt·A),  dB = (dA − 1)/A,  K[h, l] = 2·Re Σ_n C_n·dB_n·dA_n^l.

Everything here runs in float32 / complex64 whatever the compute dtype.
"""
from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from bstc import shard
from bstc.ops._common import dropout as apply_dropout
from bstc.ops.base import fft_len


def s4d_init(key, channels: int, state: int, init: str = "lin", dt_min: float = 1e-3, dt_max: float = 1e-1,
             filters: int = 1):
    """Initial (log_dt (H,), log_A_re (H,N2), A_im (H,N2), C (F,H,N2,2) as re/im pairs)."""
    n2 = state // 2
    k_dt, k_c = jax.random.split(key)
    log_dt = jax.random.uniform(k_dt, (channels,), minval=math.log(dt_min), maxval=math.log(dt_max))
    log_A_re = jnp.full((channels, n2), math.log(0.5))
    n = jnp.arange(n2, dtype=jnp.float32)
    if init == "lin":  # S4D-Lin: imaginary parts π·n
        A_im = jnp.broadcast_to(math.pi * n, (channels, n2))
    elif init == "inv":  # S4D-Inv: (N/π)(N/(2n+1) − 1)
        A_im = jnp.broadcast_to((state / math.pi) * (state / (2 * n + 1) - 1), (channels, n2))
    elif init == "real":  # S4D-Real-like: no rotation, decay rates (n+1)/2 (the slowest as in Lin)
        # A mode that does not rotate responds to an input at lag l the same way for every l ≪ its
        # time constant, so what a slow channel stores can be read at distances not seen in training.
        A_im = jnp.zeros((channels, n2))
        log_A_re = jnp.broadcast_to(jnp.log(0.5 * (n + 1)), (channels, n2))
    else:
        raise ValueError(f"unknown S4D init {init!r}")
    # C ~ complex normal with unit variance (each part variance 1/2)
    C = jax.random.normal(k_c, (filters, channels, n2, 2)) * math.sqrt(0.5)
    return log_dt, log_A_re, jnp.asarray(A_im, jnp.float32), C


def zoh(log_dt: Float[Array, "H"], log_A_re: Float[Array, "H N2"], A_im: Float[Array, "H N2"]
        ) -> tuple[Complex[Array, "H N2"], Complex[Array, "H N2"], Complex[Array, "H N2"]]:
    """Zero-order hold with B = 1: (dt·A, dA = exp(dt·A), dB = (exp(dt·A) − 1)/A), complex64."""
    log_dt, log_A_re, A_im = (jnp.asarray(t, jnp.float32) for t in (log_dt, log_A_re, A_im))
    A = -jnp.exp(log_A_re) + 1j * A_im  # (H, N2)
    dtA = jnp.exp(log_dt)[:, None] * A
    dA = jnp.exp(dtA)
    return dtA, dA, (dA - 1.0) / A


def discretize(log_dt, log_A_re, A_im, C) -> tuple[Complex[Array, "H N2"], Complex[Array, "F H N2"], Complex[Array, "H N2"]]:
    """(dtA, C' = C·dB, dA): `zoh` with dB folded into the readout."""
    dtA, dA, dB = zoh(log_dt, log_A_re, A_im)
    C = jnp.asarray(C, jnp.float32)
    Cc = C[..., 0] + 1j * C[..., 1]  # (F, H, N2)
    return dtA, Cc * dB[None], dA


def factor_length(length: int) -> tuple[int, int]:
    """(L1, L2) with L1 = ⌈√length⌉ and L1·L2 ≥ length: the two sides of s4d_kernel's factorisation."""
    L1 = math.isqrt(length - 1) + 1 if length > 1 else 1
    return L1, -(-length // L1)


def s4d_kernel(log_dt: Float[Array, "H"], log_A_re: Float[Array, "H N2"], A_im: Float[Array, "H N2"],
               C: Float[Array, "F H N2 2"], length: int) -> Float[Array, "F H L"]:
    """K[f, h, l] = 2·Re Σ_n C'[f, h, n]·dA[h, n]^l for l < length, in float32, without materialising
    the (H, N2, L) Vandermonde tensor.

    Factor l = a·L1 + b (0 ≤ b < L1, 0 ≤ a < L2, L1 ≈ √L): dA^l = exp(a·L1·dtA)·exp(b·dtA), so
    K[f, h, a, b] = 2·Re Σ_n (C'[f, h, n]·exp(a·L1·dtA[h, n]))·exp(b·dtA[h, n]): one batched
    complex matmul (H batches of (F·L2, N2) @ (N2, L1)). The intermediates are
    O(H·N2·(F·L2 + L1)) instead of O(H·N2·L); exponents are formed as products with integer
    offsets (not by repeated multiplication), so rounding does not compound along l."""
    dtA, Cp, _ = discretize(log_dt, log_A_re, A_im, C)
    L1, L2 = factor_length(length)
    a = jnp.arange(L2, dtype=jnp.float32) * L1
    b = jnp.arange(L1, dtype=jnp.float32)
    outer = jnp.exp(dtA[:, None, :] * a[None, :, None])  # (H, L2, N2): shared by the F filters
    inner = jnp.exp(dtA[:, :, None] * b[None, None, :])  # (H, N2, L1)
    lhs = Cp[:, :, None, :] * outer[None]  # (F, H, L2, N2)
    K = jnp.einsum("fhan,hnb->fhab", lhs, inner)  # (F, H, L2, L1)
    K = 2.0 * K.real.reshape(K.shape[0], K.shape[1], L2 * L1)
    return K[..., :length]


def s4d_kernel_vandermonde(log_dt, log_A_re, A_im, C, length: int) -> Float[Array, "F H L"]:
    """Oracle: the naive kernel through the full (H, N2, L) Vandermonde tensor."""
    dtA, Cp, _ = discretize(log_dt, log_A_re, A_im, C)
    V = jnp.exp(dtA[:, :, None] * jnp.arange(length, dtype=jnp.float32))  # (H, N2, L)
    return 2.0 * jnp.einsum("fhn,hnl->fhl", Cp, V).real


class S4DRecurrence(eqx.Module):
    """The S4D convolution as a recurrence, for decoding one token at a time:

        x_t = dA ⊙ x_{t−1} + dB·u_t          (state x: (B, H, N2) complex64, shared by the filters)
        y_t[f] = 2·Re Σ_n C[f]·x_t + D[f]·u_t

    It equals `causal_fft_conv(u, s4d_kernel(...)) + D·u` (the layer before gelu/output linear).
    Built by `S4DLayer.recurrence()`; everything in float32 / complex64."""

    dA: Complex[Array, "H N2"]
    dB: Complex[Array, "H N2"]
    C: Complex[Array, "F H N2"]
    D: Float[Array, "F H"]

    @staticmethod
    def from_params(log_dt, log_A_re, A_im, C: Float[Array, "F H N2 2"], D: Float[Array, "F H"]) -> "S4DRecurrence":
        _, dA, dB = zoh(log_dt, log_A_re, A_im)
        C = jnp.asarray(C, jnp.float32)
        return S4DRecurrence(dA, dB, C[..., 0] + 1j * C[..., 1], jnp.asarray(D, jnp.float32))

    def init_state(self, batch: int) -> Complex[Array, "B H N2"]:
        return jnp.zeros((batch,) + self.dA.shape, jnp.complex64)

    def step(self, state: Complex[Array, "B H N2"], u_t: Float[Array, "B H"]
             ) -> tuple[Complex[Array, "B H N2"], Float[Array, "B F H"]]:
        u = u_t.astype(jnp.float32)
        state = self.dA * state + self.dB * u[..., None]  # (B, H, N2)
        y = 2.0 * jnp.einsum("fhn,bhn->bfh", self.C, state).real + self.D * u[:, None, :]
        return state, y


def s4d_recurrence(log_dt, log_A_re, A_im, C, u: Float[Array, "L H"]) -> Float[Array, "F L H"]:
    """Oracle: x_t = dA·x_{t−1} + dB·u_t, y_t = 2·Re(C·x_t), step by step with `lax.scan` (no skip term).

    Written with dB explicit (not folded into C as in s4d_kernel), so it checks the folding too."""
    F = C.shape[0]
    rec = S4DRecurrence.from_params(log_dt, log_A_re, A_im, C, jnp.zeros((F, C.shape[1])))
    _, ys = jax.lax.scan(lambda x, u_t: rec.step(x, u_t[None]), rec.init_state(1), u)  # ys (L, 1, F, H)
    return jnp.moveaxis(ys[:, 0], 1, 0)


def block_end_states(u: Float[Array, "B L H"], dtA: Complex[Array, "H N2"], window: int) -> Float[Array, "B NB H N"]:
    """The state x_e = Σ_{s ≤ e} dA^{e−s}·u_s (B = 1; dB is folded into C') at the end of every
    block of `window` tokens, e = W−1, 2W−1, …, L−1 (L a multiple of W): the chunked recurrence.
    Returned in real form, (re, im) of the N2 modes side by side: (B, L/W, H, 2·N2).

    Within block k: z_k = Σ_i dA^{W−1−i}·u_{kW+i}, one real matmul per channel (the complex
    weights as 2·N2 real columns: (B·nb, W) @ (W, 2·N2)), every power exp(integer·dtA) so rounding
    does not compound. Across blocks x_k = dA^W·x_{k−1} + z_k: a scan over the nb = L/W blocks,
    whose step is small (B·H·N2). O(L·H·N2) in all, against F·O(H·L·log L) for F full-length FFT
    convolutions. (A log-depth doubling over blocks was 10× slower on a CPU: its slices and
    concatenations cost more than the arithmetic.)"""
    B, L, H = u.shape
    W, n2 = window, dtA.shape[-1]
    nb = L // W
    lag = jnp.arange(W - 1, -1, -1, dtype=jnp.float32)  # W−1−i: distance to the block's end
    V = jnp.exp(dtA[:, None, :] * lag[None, :, None])  # (H, W, N2)
    Vr = jnp.concatenate([V.real, V.imag], axis=-1)  # (H, W, 2·N2)
    z = jnp.einsum("bkih,hin->kbhn", u.astype(jnp.float32).reshape(B, nb, W, H), Vr)  # (nb, B, H, 2·N2)
    a = jnp.exp(W * dtA)  # dA^W
    ar, ai = a.real, a.imag

    def step(x, z_k):  # x ↦ dA^W·x + z_k, complex product written out on the (re, im) halves
        xr, xi = x[..., :n2], x[..., n2:]
        x = z_k + jnp.concatenate([ar * xr - ai * xi, ar * xi + ai * xr], axis=-1)
        return x, x

    _, x = jax.lax.scan(step, jnp.zeros_like(z[0]), z)
    return jnp.moveaxis(x, 0, 1)


def block_end_kernel_sums(dtA: Complex[Array, "H N2"], Cp: Complex[Array, "F H N2"], window: int, blocks: int
                          ) -> Float[Array, "NB F H"]:
    """Σ_{l ≤ e} K[f, h, l] at the block ends e = kW − 1 (k = 1..nb), in closed form: the
    geometric sum Σ_{l<e+1} dA^l = expm1((e+1)·dtA) / expm1(dtA) (expm1 keeps slow modes, with
    dA ≈ 1, accurate)."""
    ends = window * jnp.arange(1, blocks + 1, dtype=jnp.float32)  # e + 1
    geo = jnp.expm1(ends[:, None, None] * dtA[None]) / jnp.expm1(dtA)[None]  # (nb, H, N2)
    return 2.0 * jnp.einsum("fhn,khn->kfh", Cp, geo).real


def running_mean(u: Float[Array, "B L H"]) -> Float[Array, "B L H"]:
    """m[:, t] = mean of u[:, :t + 1] (causal), in float32."""
    n = jnp.arange(1, u.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    return jnp.cumsum(u.astype(jnp.float32), axis=1) / n


def causal_fft_conv(u: Float[Array, "B L C"], k: Float[Array, "C L"]) -> Float[Array, "B L C"]:
    """y[:, t, c] = Σ_{s ≤ t} k[c, s]·u[:, t − s, c], by FFT of length ≥ 2L (no wrap-around), in float32."""
    L = u.shape[1]
    n = fft_len(2 * L)
    U = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)  # (B, n/2+1, C)
    Kf = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=-1)  # (C, n/2+1)
    return jnp.fft.irfft(U * Kf.T[None], n=n, axis=1)[:, :L]


def causal_direct_conv(u: Float[Array, "B L C"], k: Float[Array, "C L"]) -> Float[Array, "B L C"]:
    """Oracle: the same convolution as an explicit lower-triangular Toeplitz product."""
    L = u.shape[1]
    t = jnp.arange(L)
    lag = t[:, None] - t[None, :]  # (L, L): t − s
    T = jnp.where(lag[None] >= 0, k[:, jnp.clip(lag, 0, L - 1)], 0.0)  # (C, L, L)
    return jnp.einsum("cts,bsc->btc", T, u.astype(jnp.float32))


def multi_filter_fft_conv(u: Float[Array, "B L H"], k: Float[Array, "F H Lk"]) -> Float[Array, "B L F H"]:
    """Causal convolution of each channel with F kernels; one FFT of u shared by all filters."""
    B, L, H = u.shape
    F, _, Lk = k.shape
    if Lk < L:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, L - Lk)))
    k = k[..., :L]
    n = fft_len(2 * L)
    U = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)  # (B, n/2+1, H)
    Kf = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=-1)  # (F, H, n/2+1)
    Y = U[:, :, None, :] * jnp.moveaxis(Kf, -1, 0)[None]  # (B, n/2+1, F, H)
    return jnp.fft.irfft(Y, n=n, axis=1)[:, :L]


# Logical axes of the SSM sublayers' parameters (s4d, long_conv). Everything is per channel, so
# tensor parallelism splits the FFT convolution over channels; the output map is stored
# (out, in) = (embed, channels).
# Optimizer roles of the SSM sublayers' parameters (s4d, long_conv; gss reuses the names).
SSM_OPTIM = {"log_dt": "ssm_dynamics", "log_A_re": "ssm_dynamics", "A_im": "ssm_dynamics", "C": "weight",
             "weight": "conv_kernel", "D": "gain", "w_out": "weight", "b_out": "bias"}
SSM_AXES = {"log_dt": ("channels",), "log_A_re": ("channels", "ssm_state"), "A_im": ("channels", "ssm_state"),
            "C": ("filters", "channels", "ssm_state", None), "weight": ("filters", "channels", None),
            "D": ("filters", "channels"), "w_out": ("embed", "channels"), "b_out": ("embed",)}


# Under a mesh (bstc.shard) run the FFT convolutions per (batch, channel) shard: XLA's partitioner
# would gather the whole batch onto every device for an FFT (openxla/xla#24). Identity otherwise.
causal_fft_conv = shard.local(causal_fft_conv, (("batch", None, "channels"), ("channels", None)),
                              ("batch", None, "channels"))
multi_filter_fft_conv = shard.local(multi_filter_fft_conv, (("batch", None, "channels"), (None, "channels", None)),
                                    ("batch", None, None, "channels"))


def fft_flops(n: int) -> float:
    """FLOPs of one real FFT of length n, per channel: ≈ 2.5·n·log2(n).

    The textbook count is 5·n·log2(n) for a complex FFT of length n; a real FFT of length n is a
    complex FFT of length n/2 plus O(n) twiddles, i.e. 5·(n/2)·log2(n). Used for the forward
    rfft of the input, the kernel's rfft and the inverse irfft alike."""
    return 2.5 * n * math.log2(max(n, 2))


def ssm_head(y: Float[Array, "B L F H"], w_out: Float[Array, "H H"], b_out: Float[Array, "H"], dtype, *,
             dropout: float = 0.0, key=None) -> Float[Array, "B L H"] | Float[Array, "B L F H"]:
    """gelu, dropout, then a position-wise linear map shared by the F filters (the S4 block's
    output mixing, without its GLU: the context sources feed attention keys/values, which are
    projected again there). Squeezes the filter axis when F == 1."""
    y = jax.nn.gelu(y.astype(jnp.float32)).astype(dtype)  # gelu in f32: cheap, and bf16 tanh is coarse
    y = apply_dropout(y, dropout, key)
    y = y @ w_out.T.astype(dtype) + b_out.astype(dtype)  # w_out is (out, in)
    return y[:, :, 0] if y.shape[2] == 1 else y


def ssm_output(y: Float[Array, "B L F H"], u: Float[Array, "B L H"], D: Float[Array, "F H"],
               w_out: Float[Array, "H H"], b_out: Float[Array, "H"], dtype, *, dropout: float = 0.0,
               key=None):
    """The SSM sublayer's output from the convolution y (float32): gelu(y + D·u), dropout, then the
    output linear (`ssm_head`). Returns (B, L, H) for one filter, (B, L, F, H) for several."""
    y = y + D[None, None].astype(jnp.float32) * u.astype(jnp.float32)[:, :, None, :]
    return ssm_head(y, w_out, b_out, dtype, dropout=dropout, key=key)


def ssm_common_flops(F: int, H: int, L: int) -> float:
    """Per-token FLOPs of what every FFT-convolution SSM does besides making its kernel:
    FFT of the input (shared by filters), F kernel FFTs and F inverse FFTs, the complex products,
    the skip term, gelu and the output projection."""
    n = fft_len(2 * L)
    ffts = (1 + 2 * F) * H * fft_flops(n) / L
    products = 6.0 * F * H * (n // 2 + 1) / L
    pointwise = F * H * (2 + 8)  # skip (mul+add) and gelu (≈ 8 as XLA counts the tanh form)
    proj = F * (2 * H * H + H)
    return ffts + products + pointwise + proj
