"""`mamba`: a Mamba-2-style selective state-space layer (Dao & Gu 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality",
arXiv:2405.21060), a context source for Block-State Transformers.

Per token t (E = expand·d_model inner channels in H_s = E / P heads of width P, state size N):

    z, x, B, C_1..C_F, dt_raw = x_t W                       (input projections)
    x, B, C = silu(causal depthwise conv of width K)          (the short convolution)
    dt_h = softplus(dt_raw_h + dt_bias_h),  A_h = −exp(A_log_h) < 0
    S_h,t = exp(dt_h A_h)·S_h,t−1 + dt_h·B_t x_h,tᵀ           (S_h: N × P, per head)
    y_f,h,t = C_f,tᵀ S_h,t + D_f,h·x_h,t
    out_f = RMSNorm(y_f ⊙ silu(z)) W_out                     (B, L, D), or (B, L, F, D) for F > 1

Unlike S4D the decay and the input/readout maps depend on the token (selectivity), so there is
no fixed kernel to convolve with; training uses the chunked state-space-duality algorithm
(`ssd_chunked`): quadratic (attention-like) within chunks of `chunk` tokens, a linear scan of
chunk states across them. Decoding steps the recurrence (`init_cache`/`decode`).

Filters: F readouts C_1..C_F of the same state (shared dt, A, B, x), each with its own skip
term D_f: the same sharing as s4d's filters (shared A and dt, own C and D), so F = 1, heads or S
plugs into block attention's sh, mh and mf context variants. The gate, norm and output
projection are shared by the filters.
"""
from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._common import dense_init, dropout as apply_dropout
from bstc.ops.base import Op, Param, Problem, register

# Initial decay rates A = −exp(A_log): uniform in [1, 16] as in Mamba-2, so that together with
# dt ∈ [dt_min, dt_max] the memory spans from about one token to thousands.
A_INIT_RANGE = (1.0, 16.0)
DT_FLOOR = 1e-4  # smallest initial step (Mamba's dt_init_floor)
NORM_EPS = 1e-5


def causal_depthwise_conv(u: Float[Array, "B L *C"], w: Float[Array, "K *C"], b: Float[Array, "*C"]):
    """y_t = Σ_k w[k]·u_{t−K+1+k} + b (zero history before t = 0), per channel, in float32.

    Written as a contraction of the K shifted copies of u with w (K is small: 4), which XLA
    computes once. As K elementwise shifted products it would be fused into, i.e. recomputed
    in, each of its several consumers (the layouts the scan's contractions and the skip term
    read it in), and a grouped `conv_general_dilated` has a 20–30× slower gradient on CPU."""
    K, L = w.shape[0], u.shape[1]
    up = jnp.pad(u.astype(jnp.float32), ((0, 0), (K - 1, 0)) + ((0, 0),) * (u.ndim - 2))
    shifted = jnp.stack([up[:, k:k + L] for k in range(K)], axis=2)  # (B, L, K, *C)
    y = jnp.einsum("blk...,k...->bl...", shifted, w.astype(jnp.float32))
    return y + b.astype(jnp.float32)


def conv_window(win: Float[Array, "B K *C"], w: Float[Array, "K *C"], b: Float[Array, "*C"]):
    """The convolution's output at the last position of a window of its K inputs (decoding),
    the decoding twin of `causal_depthwise_conv`."""
    y = b.astype(jnp.float32)
    for k in range(w.shape[0]):
        y = y + w[k].astype(jnp.float32) * win[:, k]
    return y


def ssd_chunked(x: Float[Array, "B L H P"], a: Float[Array, "B L H"], Bm: Float[Array, "B L N"],
                Cm: Float[Array, "B L F N"], chunk: int):
    """The selective scan S_t = exp(a_t)·S_{t−1} + B_t x_tᵀ, y_f,t = C_f,tᵀ S_t (no skip), by
    chunks (the state-space duality). x is already scaled by dt, a = dt·A ≤ 0; all float32.

    With Λ the within-chunk cumulative sum of a (inclusive) and S_c the state at the end of
    chunk c:

        y_i = Σ_{j ≤ i in the chunk} exp(Λ_i − Λ_j)·(C_i·B_j)·x_j     (masked C Bᵀ: quadratic form)
            + exp(Λ_i)·C_iᵀ S_{c−1}                                 (the carried state)
        S_c = exp(Λ_Q)·S_{c−1} + Σ_j exp(Λ_Q − Λ_j)·B_j x_jᵀ         (associative scan over chunks)

    Every exponent is a difference Λ_i − Λ_j with j ≤ i (or Λ_i itself), so ≤ 0: nothing
    overflows; entries above the diagonal are masked to −inf before the exponential, so their
    gradients are exactly zero. L is padded to a multiple of the chunk with zero inputs and
    zero log-decays, which leaves every real output and the final state unchanged.
    Returns (y (B, L, F, H, P), final state (B, H, N, P))."""
    b, L, h, p = x.shape
    n, f = Bm.shape[-1], Cm.shape[2]
    Q = max(1, min(chunk, L))
    pad = -L % Q
    if pad:
        x, a, Bm, Cm = (jnp.pad(t, ((0, 0), (0, pad)) + ((0, 0),) * (t.ndim - 2)) for t in (x, a, Bm, Cm))
    c = (L + pad) // Q
    xc = x.reshape(b, c, Q, h, p)
    Bc = Bm.reshape(b, c, Q, n)
    Cc = Cm.reshape(b, c, Q, f, n)
    cum = jnp.cumsum(jnp.moveaxis(a.reshape(b, c, Q, h), 3, 2), axis=-1)  # (b, c, h, Q) Λ, inclusive

    # Within chunks: the masked (C Bᵀ ∘ decay) matrix times x, one per head and filter.
    i = jnp.arange(Q)
    seg = jnp.where(i[:, None] >= i[None, :], cum[..., :, None] - cum[..., None, :], -jnp.inf)
    decay = jnp.exp(seg)  # (b, c, h, Q, Q), zero above the diagonal
    scores = jnp.einsum("bcifn,bcjn->bcfij", Cc, Bc)  # shared by the heads (one B, C group)
    y = jnp.einsum("bcfhij,bcjhp->bcifhp", scores[:, :, :, None] * decay[:, :, None], xc)

    # Each chunk's own end state, then the states carried across chunks.
    to_end = jnp.exp(cum[..., -1:] - cum)  # (b, c, h, Q)
    local = jnp.einsum("bcjn,bcjhp->bchnp", Bc, xc * jnp.moveaxis(to_end, 3, 2)[..., None])

    def combine(left, right):
        (dl, sl), (dr, sr) = left, right
        return dl * dr, dr[..., None, None] * sl + sr

    _, ends = jax.lax.associative_scan(combine, (jnp.exp(cum[..., -1]), local), axis=1)  # (b, c, h, n, p)
    prev = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)  # state entering chunk c
    carried = jnp.einsum("bcifn,bchnp->bcifhp", Cc, prev)
    y = y + carried * jnp.moveaxis(jnp.exp(cum), 3, 2)[:, :, :, None, :, None]
    return y.reshape(b, c * Q, f, h, p)[:, :L], ends[:, -1]


def ssd_sequential(x, a, Bm, Cm, state=None):
    """Oracle (and the decoding step's arithmetic): the recurrence token by token with lax.scan.
    Same arguments as `ssd_chunked`; returns (y (B, L, F, H, P), final state (B, H, N, P))."""
    b, L, h, p = x.shape
    n = Bm.shape[-1]
    if state is None:
        state = jnp.zeros((b, h, n, p), jnp.float32)

    def step(S, inp):
        x_t, a_t, B_t, C_t = inp
        S = ssd_step(S, x_t, a_t, B_t)
        return S, jnp.einsum("bfn,bhnp->bfhp", C_t, S)

    S, ys = jax.lax.scan(step, state, tuple(jnp.moveaxis(t, 1, 0) for t in (x, a, Bm, Cm)))
    return jnp.moveaxis(ys, 0, 1), S


def ssd_step(S, x_t, a_t, B_t):
    """S_t = exp(a_t)·S_{t−1} + B_t x_tᵀ for one token: S (B, H, N, P), x_t (B, H, P), a_t (B, H), B_t (B, N)."""
    return jnp.exp(a_t)[..., None, None] * S + B_t[:, None, :, None] * x_t[:, :, None, :]


class MambaLayer(eqx.Module):
    """x (B, L, D) → (B, L, D), or (B, L, F, D) with F filters."""

    w_zx: Float[Array, "D 2 E"]  # gate z and SSM input x, fused (parts axis), stored (in, part, out)
    w_bc: Float[Array, "D F1 N"]  # B, then C_1..C_F
    w_dt: Float[Array, "D Hs"]
    conv_x: Float[Array, "K E"]  # depthwise causal conv of x
    conv_x_bias: Float[Array, "E"]
    conv_bc: Float[Array, "K F1 N"]  # ... and of B, C (Mamba-2 convolves x, B and C alike)
    conv_bc_bias: Float[Array, "F1 N"]
    dt_bias: Float[Array, "Hs"]  # softplus⁻¹ of the initial step
    A_log: Float[Array, "Hs"]  # A = −exp(A_log) < 0: every head's state decays
    D: Float[Array, "F Hs"]  # skip, per filter and head
    gate_norm: Float[Array, "E"] | None  # RMS norm gain of the gated output (Mamba-2's gated norm)
    w_out: Float[Array, "E D"]
    head_dim: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def _inputs(self, u):
        """Projections of u (..., D) in the compute dtype: z, x, B/C before the convolution, dt_raw."""
        dt = u.dtype
        zx = jnp.einsum("...d,dpe->...pe", u, self.w_zx.astype(dt))
        bc = jnp.einsum("...d,dpn->...pn", u, self.w_bc.astype(dt))
        return zx[..., 0, :], zx[..., 1, :], bc, u @ self.w_dt.astype(dt)

    def _dynamics(self, dt_raw):
        """(dt, A·dt) in float32 from the raw step projection (..., Hs)."""
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
        return dt, dt * -jnp.exp(self.A_log.astype(jnp.float32))

    def _output(self, y, xs, z, dtype, key=None):
        """y (..., F, Hs, P) float32 → the layer output: skip, gate, norm, output projection."""
        F = self.D.shape[0]
        y = y + self.D.astype(jnp.float32)[..., None] * xs[..., None, :, :]
        y = y.reshape(*y.shape[:-2], -1) * jax.nn.silu(z.astype(jnp.float32))[..., None, :]  # (..., F, E)
        if self.gate_norm is not None:  # statistics in float32 (a bf16 mean over E loses too much)
            y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + NORM_EPS) * self.gate_norm.astype(jnp.float32)
        y = apply_dropout(y.astype(dtype), self.dropout, key)
        out = y @ self.w_out.astype(dtype)
        return out[..., 0, :] if F == 1 else out

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None):
        b, L, _ = x.shape
        P = self.head_dim
        z, xs, bc, dt_raw = self._inputs(x)
        xs = jax.nn.silu(causal_depthwise_conv(xs, self.conv_x, self.conv_x_bias))  # float32
        bc = jax.nn.silu(causal_depthwise_conv(bc, self.conv_bc, self.conv_bc_bias))
        dt, a = self._dynamics(dt_raw)  # (b, L, Hs)
        xs = xs.reshape(b, L, -1, P)
        y, _ = ssd_chunked(xs * dt[..., None], a, bc[:, :, 0], bc[:, :, 1:], self.chunk)
        return self._output(y, xs, z, x.dtype, key)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    # The cache: the last K − 1 pre-convolution inputs of x and of B/C (a shift register: the
    # convolution's window is them plus the new token), and the state S (B, Hs, N, P) float32.
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        K, E = self.conv_x.shape
        hs, n = self.A_log.shape[0], self.w_bc.shape[-1]
        return {"conv_x": jnp.zeros((batch, K - 1, E), jnp.float32),
                "conv_bc": jnp.zeros((batch, K - 1) + self.conv_bc.shape[1:], jnp.float32),
                "ssm": jnp.zeros((batch, hs, n, self.head_dim), jnp.float32)}

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        b = x_t.shape[0]
        z, xs, bc, dt_raw = self._inputs(x_t)
        win_x = jnp.concatenate([cache["conv_x"], xs.astype(jnp.float32)[:, None]], axis=1)  # (b, K, E)
        win_bc = jnp.concatenate([cache["conv_bc"], bc.astype(jnp.float32)[:, None]], axis=1)
        xs = jax.nn.silu(conv_window(win_x, self.conv_x, self.conv_x_bias))
        bc = jax.nn.silu(conv_window(win_bc, self.conv_bc, self.conv_bc_bias))
        dt, a = self._dynamics(dt_raw)  # (b, Hs)
        xs = xs.reshape(b, -1, self.head_dim)
        S = ssd_step(cache["ssm"], xs * dt[..., None], a, bc[:, 0])
        y = jnp.einsum("bfn,bhnp->bfhp", bc[:, 1:], S)
        cache = {"conv_x": win_x[:, 1:], "conv_bc": win_bc[:, 1:], "ssm": S}
        return cache, self._output(y, xs, z, x_t.dtype)


def mamba_sizes(args, dims) -> tuple[int, int, int, int, int, int]:
    """(E inner width, Hs heads, P head width, N state, F filters, K conv width)."""
    E = int(args["expand"]) * dims.d_model
    P = int(args["head_dim"])
    return E, max(1, E // P), P, int(args["state"]), int(args["filters"]), int(args["conv"])


@register
class Mamba(Op):
    kind = "mamba"
    role = "ssm"
    context_source = True
    doc = "Mamba-2 selective state-space layer (input-dependent decay), chunked SSD scan; context source"
    # Tensor parallelism splits the inner width (z, x, their conv, the norm, the output
    # projection's rows) like an MLP's hidden units; B, C, dt and the per-head vectors are small
    # and stay whole.
    axes = {"w_zx": ("embed", None, "mlp"), "w_bc": ("embed", None, None), "w_dt": ("embed", None),
            "conv_x": (None, "mlp"), "conv_x_bias": ("mlp",), "conv_bc": (None, None, None),
            "conv_bc_bias": (None, None), "dt_bias": (None,), "A_log": (None,), "D": (None, None),
            "gate_norm": ("mlp",), "w_out": ("mlp", "embed")}
    # The short conv kernel is an ordinary (decayed) weight, as in the Mamba reference; A and
    # the step bias are dynamics (no decay, capped rate), D a gain.
    optim = {"w_zx": "weight", "w_bc": "weight", "w_dt": "weight", "conv_x": "weight", "conv_bc": "weight",
             "conv_x_bias": "bias", "conv_bc_bias": "bias", "dt_bias": "ssm_dynamics", "A_log": "ssm_dynamics",
             "D": "gain", "gate_norm": "norm", "w_out": "weight"}
    params = (
        Param("state", int, 64, min=1, doc="N: state size per head (the B and C width)"),
        Param("expand", int, 2, min=1, doc="inner width E = expand · d_model"),
        Param("head_dim", int, 32, min=1, doc="P: head width; E / P heads, each with its own A and dt"),
        Param("conv", int, 4, min=1, doc="K: width of the causal depthwise convolution"),
        Param("chunk", int, 64, min=1, doc="SSD chunk length (training); any L, padded internally"),
        Param("filters", int, 1, min=1, doc="F: readouts C_f of the shared state (MH: = heads, MF: S)"),
        Param("gate_norm", bool, True, doc="RMS norm of the gated output before the output projection"),
        Param("dt_min", float, 1e-3, min=1e-6, doc="smallest initial step"),
        Param("dt_max", float, 1e-1, min=1e-6, doc="largest initial step"),
        Param("dropout", float, 0.0, min=0.0, max=0.99, doc="before the output projection"),
    )

    def check(self, args, dims, context):
        out = []
        E = int(args["expand"]) * dims.d_model
        if E % int(args["head_dim"]):
            out.append(Problem(f"mamba inner width expand·d_model = {E} is not divisible by head_dim "
                               f"({args['head_dim']})", "head_dim", "choose a head_dim that divides expand·d_model"))
        if args["dt_min"] > args["dt_max"]:
            out.append(Problem("dt_min must not exceed dt_max", "dt_min"))
        return out

    def param_count(self, args, dims, context):
        D = dims.d_model
        E, hs, _, N, F, K = mamba_sizes(args, dims)
        proj = D * 2 * E + D * (1 + F) * N + D * hs
        conv = (K + 1) * (E + (1 + F) * N)
        norm = E if args["gate_norm"] else 0
        return proj + conv + 2 * hs + F * hs + norm + E * D

    def flops_per_token(self, args, dims, context):
        """Forward FLOPs per token, term by term as XLA counts them (see tests/test_ops_mamba.py)."""
        D, L = dims.d_model, dims.seq_len
        E, hs, P, N, F, K = mamba_sizes(args, dims)
        Q = max(1, min(int(args["chunk"]), L))
        Lp = -(-L // Q) * Q  # padded length: the chunked work is done on it
        nc = Lp // Q
        C = E + (1 + F) * N  # convolved channels
        proj = 2 * D * (2 * E + (1 + F) * N + hs)
        conv = 2 * K * C + 4 * C  # K multiply-adds (+ bias), silu
        dyn = 6 * hs + E  # softplus, A = −exp(A_log)·dt, x·dt
        # Per padded token: the (Q, Q) decay mask per head, C·B scores per filter, the masked
        # product per filter and head, the matmul with x; the chunk-end states; the carried
        # state's readout and its decay; the associative scan over chunks (≈ 2 combines each).
        # The last chunk's end state is never read, so XLA drops it (the (nc − 1)/nc).
        intra = hs * Q * 3 + 16 * hs + 2 * Q * N * F + F * hs * Q + 2 * Q * E * F  # 16: XLA's cumsum
        states = (2 * hs + E + 2 * N * E) * (nc - 1) / nc
        inter = 2 * N * E * F + 2 * F * E + hs
        scan = 2 * (2 * N * E + hs) * (nc - 1) / nc / Q
        ssd = (intra + states + inter + scan) * Lp / L
        out = F * (2 * E + 4 * E) + (F * 5 * E if args["gate_norm"] else 0) + 2 * F * E * D  # skip, gate, norm, proj
        return float(proj + conv + dyn + ssd + out)

    def activation_bytes_per_token(self, args, dims, context):
        E, hs, _, N, F, _ = mamba_sizes(args, dims)
        Q = max(1, min(int(args["chunk"]), dims.seq_len))
        item = 2 if dims.dtype == "bfloat16" else 4
        return (2 * E + (1 + F) * N) * item + 4 * (F * E + 2 * F * hs * Q + 2 * E) + F * dims.d_model * item

    def build(self, args, dims, context, *, key):
        D = dims.d_model
        E, hs, P, N, F, K = mamba_sizes(args, dims)
        ks = jax.random.split(key, 9)
        bound = 1.0 / math.sqrt(K)  # a depthwise conv's fan-in is K (PyTorch's default init)
        log_dt = jax.random.uniform(ks[5], (hs,), minval=math.log(args["dt_min"]), maxval=math.log(args["dt_max"]))
        dt0 = jnp.maximum(jnp.exp(log_dt), DT_FLOOR)
        A0 = jax.random.uniform(ks[6], (hs,), minval=A_INIT_RANGE[0], maxval=A_INIT_RANGE[1])
        return MambaLayer(
            w_zx=dense_init(ks[0], D, 2 * E).reshape(D, 2, E),
            w_bc=dense_init(ks[1], D, (1 + F) * N).reshape(D, 1 + F, N),
            w_dt=dense_init(ks[2], D, hs),
            conv_x=jax.random.uniform(ks[3], (K, E), minval=-bound, maxval=bound),
            conv_x_bias=jax.random.uniform(ks[7], (E,), minval=-bound, maxval=bound),
            conv_bc=jax.random.uniform(ks[4], (K, 1 + F, N), minval=-bound, maxval=bound),
            conv_bc_bias=jax.random.uniform(ks[8], (1 + F, N), minval=-bound, maxval=bound),
            dt_bias=dt0 + jnp.log(-jnp.expm1(-dt0)),  # softplus(dt_bias) = dt0
            A_log=jnp.log(A0),
            D=jnp.ones((F, hs)),
            gate_norm=jnp.ones((E,)) if args["gate_norm"] else None,
            w_out=dense_init(jax.random.fold_in(key, 1), E, D),
            head_dim=P, chunk=int(args["chunk"]), dropout=float(args["dropout"]))
