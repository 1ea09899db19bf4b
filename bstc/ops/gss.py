"""`gss`: the Gated State Space layer (Mehta, Gupta, Cutkosky, Neyshabur 2022), the SSM layer of
the paper's GSS-Hybrid baseline.

GSS (the paper's Fig. 1) with the S4D kernel of bstc/ops/_ssm.py in place of DSS:

    v  = gelu(x W_v + b_v)          (B, L, F)    F  = expand · d_model        the gate
    u  = gelu(x W_u + b_u)          (B, L, Hs)   Hs = ssm_dim (0 → d_model/4)  a narrow SSM input
    y  = K ∗ u + D ⊙ u              (B, L, Hs)   S4D kernel, causal FFT convolution in float32
    uc = y W_uc + b_uc              (B, L, F)
    o  = (uc ⊙ v) W_o + b_o         (B, L, D)

The SSM runs at a quarter of the model width (GSS's point: the gating lets the slow FFT part be
narrow), and the gate is `expand` times wider (the paper uses 4 with E = 1024, H = 256, F = 4096;
our default 3 keeps the layer's parameters near a Transformer layer's 12·D²). The block's
residual and pre-norm come from the model file, as for every sublayer.
"""
from __future__ import annotations


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from bstc.ops import _ssm
from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, fft_len, register
from bstc.ops._common import GELU_FLOPS, dense_init


def gss_sizes(args, dims: Dims) -> tuple[int, int, int]:
    """(F gate width, Hs SSM width, N/2 complex modes)."""
    F = int(args.get("expand", 3)) * dims.d_model
    hs = int(args.get("ssm_dim", 0) or 0)
    hs = hs if hs > 0 else max(1, dims.d_model // 4)
    return F, hs, int(args.get("state", 64)) // 2


class GatedStateSpace(eqx.Module):
    """x (B, L, D) -> GSS output (B, L, D)."""

    w_v: Float[Array, "D F"]
    b_v: Float[Array, "F"]
    w_u: Float[Array, "D Hs"]
    b_u: Float[Array, "Hs"]
    log_dt: Float[Array, "Hs"]
    log_A_re: Float[Array, "Hs N2"]
    A_im: Float[Array, "Hs N2"]
    C: Float[Array, "1 Hs N2 2"]
    D: Float[Array, "Hs"]
    w_uc: Float[Array, "Hs F"]
    b_uc: Float[Array, "F"]
    w_o: Float[Array, "F D"]
    b_o: Float[Array, "D"]

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        dt = x.dtype
        v = jax.nn.gelu(x @ self.w_v.astype(dt) + self.b_v.astype(dt))  # (B, L, F)
        u = jax.nn.gelu(x @ self.w_u.astype(dt) + self.b_u.astype(dt))  # (B, L, Hs)
        k = _ssm.s4d_kernel(self.log_dt, self.log_A_re, self.A_im, self.C, x.shape[1])[0]  # (Hs, L) f32
        y = _ssm.causal_fft_conv(u, k) + self.D.astype(jnp.float32) * u.astype(jnp.float32)  # (B, L, Hs) f32
        uc = y.astype(dt) @ self.w_uc.astype(dt) + self.b_uc.astype(dt)  # (B, L, F)
        return (uc * v) @ self.w_o.astype(dt) + self.b_o.astype(dt)

    # ---- the decoding protocol (bstc/decode.py): the S4D recurrence in place of the FFT ----
    def init_cache(self, batch: int, dtype, length: int | None = None) -> Complex[Array, "B Hs N2"]:
        return jnp.zeros((batch,) + self.log_A_re.shape, jnp.complex64)

    def decode(self, cache, x_t: Float[Array, "B D"], t, *, context=None):
        dt = x_t.dtype
        v = jax.nn.gelu(x_t @ self.w_v.astype(dt) + self.b_v.astype(dt))  # (B, F)
        u = jax.nn.gelu(x_t @ self.w_u.astype(dt) + self.b_u.astype(dt))  # (B, Hs)
        rec = _ssm.S4DRecurrence.from_params(self.log_dt, self.log_A_re, self.A_im, self.C, self.D[None])
        cache, y = rec.step(cache, u)  # y (B, 1, Hs) float32, skip included
        uc = y[:, 0].astype(dt) @ self.w_uc.astype(dt) + self.b_uc.astype(dt)
        return cache, (uc * v) @ self.w_o.astype(dt) + self.b_o.astype(dt)


@register
class GatedStateSpaceOp(Op):
    kind = "gss"
    role = "ssm"
    # The gate branch is MLP-like (embed -> mlp -> embed); the narrow SSM path stays whole.
    axes = {"w_v": ("embed", "mlp"), "b_v": ("mlp",), "w_u": ("embed", None), "w_uc": (None, "mlp"),
            "b_uc": ("mlp",), "w_o": ("mlp", "embed"), "b_o": ("embed",), "log_A_re": (None, "ssm_state"),
            "A_im": (None, "ssm_state"), "C": (None, None, "ssm_state", None), "log_dt": (None,), "D": (None,),
            "b_u": (None,)}
    optim = {"log_dt": "ssm_dynamics", "log_A_re": "ssm_dynamics", "A_im": "ssm_dynamics", "C": "weight", "D": "gain",
             "w_v": "weight", "w_u": "weight", "w_uc": "weight", "w_o": "weight",
             "b_v": "bias", "b_u": "bias", "b_uc": "bias", "b_o": "bias"}
    params = (
        Param("state", int, 64, min=2, doc="N: S4D state size (N/2 complex modes); even"),
        Param("expand", int, 3, min=1, doc="gate width F = expand · d_model"),
        Param("ssm_dim", int, 0, min=0, doc="width Hs of the SSM (0 = d_model / 4)"),
        Param("init", str, "lin", choices=("lin", "inv"), doc="S4D-Lin or S4D-Inv imaginary parts"),
    )
    doc = "Gated State Space layer: a narrow S4D convolution gated by a wide GELU branch (GSS)."

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        if int(args.get("state", 64)) % 2:
            return [Problem(f"gss state must be even (N/2 complex modes), got {args['state']}", "state",
                            f"try state: {int(args['state']) + 1}")]
        return []

    def param_count(self, args, dims: Dims, context) -> int:
        D = dims.d_model
        F, hs, n2 = gss_sizes(args, dims)
        ssm = hs + 2 * hs * n2 + hs * n2 * 2 + hs  # log_dt, log_A_re, A_im, C (re/im), D
        return D * F + F + D * hs + hs + ssm + hs * F + F + F * D + D

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, L = dims.d_model, dims.seq_len
        F, hs, n2 = gss_sizes(args, dims)
        dense = 2 * D * F + 2 * D * hs + 2 * hs * F + 2 * F * D + (F + hs + F + D)  # matmuls + biases
        pointwise = GELU_FLOPS * (F + hs) + F + 2 * hs  # gelus, the gate product, the skip term
        n = fft_len(2 * L)
        conv = 3 * hs * _ssm.fft_flops(n) / L + 6.0 * hs * (n // 2 + 1) / L  # u, kernel, inverse; products
        # Kernel generation, once per sequence: the factored Vandermonde product l = a·L1 + b is a
        # complex matmul (counted as XLA counts it, 2 per multiply-add) plus ~19 flops of complex
        # exp/multiply per (mode, L1 + L2) entry.
        l1, _ = _ssm.factor_length(L)
        kernel = hs * n2 * (2.0 + 19.0 * (l1 + -(-L // l1)) / L)
        return float(dense + pointwise + conv + kernel)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        F, hs, _ = gss_sizes(args, dims)
        return (3 * F + dims.d_model) * item + 4 * hs * 4  # gate branches, f32 FFT buffers

    def build(self, args, dims: Dims, context, *, key):
        D = dims.d_model
        F, hs, _ = gss_sizes(args, dims)
        ks = jax.random.split(key, 6)
        log_dt, log_A_re, A_im, C = _ssm.s4d_init(ks[0], hs, int(args.get("state", 64)),
                                                  str(args.get("init", "lin")))
        return GatedStateSpace(
            w_v=dense_init(ks[1], D, F), b_v=jnp.zeros((F,)), w_u=dense_init(ks[2], D, hs), b_u=jnp.zeros((hs,)),
            log_dt=log_dt, log_A_re=log_A_re, A_im=A_im, C=C, D=jax.random.normal(ks[3], (hs,)),
            w_uc=dense_init(ks[4], hs, F), b_uc=jnp.zeros((F,)), w_o=dense_init(ks[5], F, D), b_o=jnp.zeros((D,)))
