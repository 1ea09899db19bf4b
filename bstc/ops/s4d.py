"""`s4d`: the diagonal state-space layer (S4D), a context source for Block-State Transformers.

Output: gelu(K * u + D·u) followed by a position-wise linear map, where K is the S4D kernel of
each channel (see _ssm.py) and * is a causal FFT convolution over the whole sequence.
With `centre: true` (the default) the convolution sees u_s − m_t, m_t the causal running mean
of the channel up to t: see `S4DLayer.__call__`. With
`filters: F > 1` every channel has F output sets (F complex C vectors and skip terms sharing one
A and dt), giving (B, L, F, D): the multi-head / multi-filter context of BST-MH and BST-MF.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from bstc.ops import _ssm
from bstc.ops.base import Op, Param, Problem, register


class S4DLayer(eqx.Module):
    """x (B, L, H) → (B, L, H), or (B, L, F, H) with F filters. H = d_model channels."""

    log_dt: Float[Array, "H"]  # log step, log-uniform in [dt_min, dt_max] at init
    log_A_re: Float[Array, "H N2"]  # Re A = −exp(log_A_re) < 0: every mode decays
    A_im: Float[Array, "H N2"]
    C: Float[Array, "F H N2 2"]  # complex C as (re, im): the lowering casts real leaves only
    D: Float[Array, "F H"]  # skip
    w_out: Float[Array, "H H"]  # (out, in), shared by the filters
    b_out: Float[Array, "H"]
    dropout: float = eqx.field(static=True)
    centre: bool = eqx.field(static=True, default=False)

    def kernel(self, length: int) -> Float[Array, "F H L"]:
        return _ssm.s4d_kernel(self.log_dt, self.log_A_re, self.A_im, self.C, length)

    def __call__(self, x: Float[Array, "B L H"], *, context=None, key=None):
        k = self.kernel(x.shape[1])  # (F, H, L) float32, generated once per call (not per batch row)
        y = _ssm.multi_filter_fft_conv(x, k)  # (B, L, F, H), float32
        if self.centre:
            # y_t = Σ_s K[t−s]·(u_s − m_t) = (K * u)_t − m_t·Σ_{l≤t} K[l]. Without it the slow modes
            # (dt·|A|·L < 1) integrate the mean input (the average token) and drift with the
            # position: at 2–8× the training length every context vector carries an offset the
            # attention never saw. With it a constant input contributes nothing at any length.
            y = y - _ssm.running_mean(x)[:, :, None, :] * jnp.moveaxis(jnp.cumsum(k, axis=-1), -1, 0)[None]
        return _ssm.ssm_output(y, x, self.D, self.w_out, self.b_out, x.dtype, dropout=self.dropout, key=key)

    def block_ends(self, x: Float[Array, "B L H"], window: int, *, key=None):
        """Rows W−1, 2W−1, …, L−1 of `self(x)`: (B, L/W, H), or (B, L/W, F, H) with F filters.

        What an `mf` context reads (the last output before each block). The F filters share A
        and dt and differ only in C, so one state per block end (`_ssm.block_end_states`) serves
        them all, each read out with its own C: no full-length convolution is computed."""
        B, L, H = x.shape
        nb = L // window
        dtA, Cp, _ = _ssm.discretize(self.log_dt, self.log_A_re, self.A_im, self.C)
        Xr = _ssm.block_end_states(x, dtA, window)  # (B, nb, H, 2·N2): (re, im)
        Cr = jnp.concatenate([Cp.real, -Cp.imag], axis=-1)  # 2·Re(C'·X) = 2·(C'.re·X.re − C'.im·X.im)
        y = 2.0 * jnp.einsum("bkhn,fhn->bkfh", Xr, Cr)  # (B, nb, F, H) float32
        if self.centre:  # as in __call__: minus u's running mean × Σ_{l≤e} K[l], at the block ends
            sums = jnp.cumsum(x.astype(jnp.float32).reshape(B, nb, window, H).sum(2), axis=1)
            mean = sums / (window * jnp.arange(1, nb + 1, dtype=jnp.float32))[None, :, None]
            y = y - mean[:, :, None, :] * _ssm.block_end_kernel_sums(dtA, Cp, window, nb)[None]
        u = x[:, window - 1::window]
        return _ssm.ssm_output(y, u, self.D, self.w_out, self.b_out, x.dtype, dropout=self.dropout, key=key)

    # ---- recurrent form, for decoding ---------------------------------------------------------
    def recurrence(self) -> _ssm.S4DRecurrence:
        """The convolution + skip as a recurrence (dA, dB, C, D), batched over sequences."""
        return _ssm.S4DRecurrence.from_params(self.log_dt, self.log_A_re, self.A_im, self.C, self.D)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    def init_cache(self, batch: int, dtype, length: int | None = None) -> Complex[Array, "B H N2"]:
        return self.init_state(batch)

    def decode(self, cache, x_t: Float[Array, "B H"], t, *, context=None):
        return self.step(cache, x_t)

    def init_state(self, batch: int):
        """The convolution's state (B, H, N2) complex; with `centre` also the same recurrence
        driven by ones (its output is the kernel's running sum Σ_{l≤t} K[l]), the running input
        sum (B, H) and the token count (B, 1)."""
        h = jnp.zeros((batch,) + self.log_A_re.shape, jnp.complex64)
        if not self.centre:
            return h
        return h, h, jnp.zeros((batch, self.log_A_re.shape[0]), jnp.float32), jnp.zeros((batch, 1), jnp.float32)

    def step(self, state: Complex[Array, "B H N2"], x_t: Float[Array, "B H"]):
        """One token of the whole layer: (state, x_t) → (state, y_t) with y_t (B, H) or (B, F, H),
        equal to row t of `self(x)` (deterministic). O(H·N) per token instead of an FFT."""
        rec = self.recurrence()
        if not self.centre:
            state, y = rec.step(state, x_t)  # y (B, F, H) float32, skip included
        else:
            h, z, total, n = state
            h, y = rec.step(h, x_t)
            z = rec.dA * z + rec.dB  # the response to a constant 1
            total, n = total + x_t.astype(jnp.float32), n + 1.0
            ksum = 2.0 * jnp.einsum("fhn,bhn->bfh", rec.C, z).real  # Σ_{l≤t} K[l]
            y = y - (total / n)[:, None, :] * ksum
            state = (h, z, total, n)
        out = _ssm.ssm_head(y[:, None], self.w_out, self.b_out, x_t.dtype)  # (B, 1, [F,] H)
        return state, out[:, 0]


@register
class S4D(Op):
    kind = "s4d"
    role = "ssm"
    axes = _ssm.SSM_AXES
    optim = _ssm.SSM_OPTIM
    context_source = True
    doc = "diagonal state-space layer (S4D), causal FFT convolution over the whole sequence"
    params = (
        Param("state", int, 64, min=2, doc="N: state size (N/2 complex modes); even"),
        Param("filters", int, 1, min=1, doc="F: output sets per channel (MH: = heads, MF: S)"),
        Param("init", str, "lin", choices=("lin", "inv", "real"),
              doc="S4D-Lin or S4D-Inv imaginary parts, or real modes with decay rates (n+1)/2"),
        Param("dt_min", float, 1e-3, min=1e-6, doc="smallest initial step"),
        Param("dt_max", float, 1e-1, min=1e-6, doc="largest initial step"),
        Param("centre", bool, True, doc="convolve u − (causal running mean of u): no drift with the length"),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
    )

    def check(self, args, dims, context):
        out = []
        if args["state"] % 2:
            out.append(Problem(f"s4d state must be even (N/2 complex modes), got {args['state']}", "state",
                               f"try state: {args['state'] + 1}"))
        if args["dt_min"] > args["dt_max"]:
            out.append(Problem("dt_min must not exceed dt_max", "dt_min"))
        return out

    def param_count(self, args, dims, context):
        H, n2, F = dims.d_model, args["state"] // 2, args["filters"]
        return H + 2 * H * n2 + F * H * n2 * 2 + F * H + H * H + H

    def flops_per_token(self, args, dims, context):
        H, n2, F, L = dims.d_model, args["state"] // 2, args["filters"], dims.seq_len
        # Kernel generation happens once per sequence: a complex (F·H, L2, N2)×(N2, L1) matmul
        # (8 real flops per complex multiply-add) plus the exponentials; spread over L tokens.
        kernel = 8.0 * F * H * n2 + 12.0 * H * n2 * (F + 1) / max(1, int(L ** 0.5))
        centre = (3.0 * F * H + 2.0 * H) if args["centre"] else 0.0  # running sums, u's mean × ΣK
        return kernel + centre + _ssm.ssm_common_flops(F, H, L)

    def block_ends_flops_per_token(self, args, dims, window):
        """`S4DLayer.block_ends`, per sequence and spread over its L tokens: the within-block
        contraction at every token; per block end the scan step, the F readouts, the centring
        and the output (skip, gelu, projection); once per call the (H, W, N2) powers and the
        discretisation. XLA's cost analysis counts one step of the scan over blocks (a loop),
        this rule all nb of them: 8·H·N2 per block, a few % of the layer at W = 8, nothing at W = 256."""
        H, n2, F, L, W = dims.d_model, args["state"] // 2, args["filters"], dims.seq_len, window
        nb = L // W
        per_call = 16.0 * H * W * n2 + (47.0 + 4.0 * F) * H * n2  # exp(lag·dtA); zoh, C·dB and dA^W
        within = 4.0 * L * H * n2
        per_end = 8.0 * H * n2 + F * H * (4 * n2 + 1) + F * H * (2 * H + 1 + 10)  # scan; readout; output
        if args["centre"]:  # block sums of u, the running mean, Σ_{l≤e} K[l] in closed form, y − m·ΣK
            within += L * H
            per_end += 2.0 * F * H + 3.0 * H + (4.0 + 2.0 * F) * H * n2
        return (per_call + within + nb * per_end) / L

    def activation_bytes_per_token(self, args, dims, context):
        return 4 * dims.d_model * args["filters"] * 4 + 2 * dims.d_model * 4  # f32 FFT buffers

    def build(self, args, dims, context, *, key):
        H, F = dims.d_model, args["filters"]
        k_ssm, k_d, k_w = jax.random.split(key, 3)
        log_dt, log_A_re, A_im, C = _ssm.s4d_init(k_ssm, H, args["state"], args["init"], args["dt_min"],
                                                  args["dt_max"], filters=F)
        return S4DLayer(log_dt=log_dt, log_A_re=log_A_re, A_im=A_im, C=C,
                        D=jax.random.normal(k_d, (F, H)),
                        w_out=jax.random.normal(k_w, (H, H)) / jnp.sqrt(H),
                        b_out=jnp.zeros((H,)), dropout=float(args["dropout"]), centre=bool(args["centre"]))
