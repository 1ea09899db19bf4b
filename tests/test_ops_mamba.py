"""The `mamba` layer kind (bstc/ops/mamba.py), against oracles: the chunked SSD scan == the
token-by-token recurrence (any L and chunk), the whole layer == a NumPy loop written from the
equations, decoding == the parallel forward, causality by perturbation, finite gradients at
L = 16384, exact parameter counts (also through `bstc explain`), FLOPs == XLA's count."""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc.lower import count_params
from bstc.ops import REGISTRY, Dims
from bstc.ops import mamba as M

DIMS = Dims(vocab=32, d_model=16, heads=2, window=8, seq_len=64)
OP = REGISTRY["mamba"]


def args_of(**given):
    a = {p.name: p.default for p in OP.params if not p.required}
    a.update(given)
    return a


def build(seed=0, dims=DIMS, **given):
    a = args_of(**given)
    assert OP.check(a, dims, None) == []
    return OP.build(a, dims, None, key=jax.random.key(seed))


SMALL = dict(state=8, head_dim=8, chunk=16)


def scan_inputs(seed, b, L, h, p, n, f, strong=False):
    """Random SSD inputs with steps and decays spanning Mamba-2's initial ranges (and beyond,
    `strong`: per-token decays down to e^-40, so masked entries would overflow if not masked)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    log_dt = jax.random.uniform(ks[0], (b, L, h), minval=np.log(1e-3), maxval=np.log(2.0 if strong else 0.1))
    A = jax.random.uniform(ks[1], (h,), minval=1.0, maxval=20.0 if strong else 16.0)
    dt = jnp.exp(log_dt)
    x = jax.random.normal(ks[2], (b, L, h, p)) * dt[..., None]
    return x, -dt * A, jax.random.normal(ks[3], (b, L, n)), jax.random.normal(ks[4], (b, L, f, n))


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.abs(got - ref).max() / np.abs(ref).max()


# ---- the chunked scan ---------------------------------------------------------------------------
@pytest.mark.parametrize("L,chunk,f", [(64, 16, 1), (100, 16, 3), (37, 64, 1), (50, 1, 1), (77, 13, 2),
                                       (256, 64, 1)])
def test_chunked_scan_equals_sequential_recurrence(L, chunk, f):
    x, a, Bm, Cm = scan_inputs(L + chunk, 2, L, 3, 4, 5, f)
    y, S = jax.jit(lambda *t: M.ssd_chunked(*t, chunk))(x, a, Bm, Cm)
    y_ref, S_ref = jax.jit(M.ssd_sequential)(x, a, Bm, Cm)
    assert y.shape == (2, L, f, 3, 4) and y.dtype == jnp.float32 and S.shape == (2, 3, 5, 4)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5


def test_sequential_recurrence_is_the_definition():
    """The oracle itself, against a plain NumPy loop over S_t = e^{a_t} S_{t−1} + B_t x_tᵀ."""
    x, a, Bm, Cm = (np.asarray(t, np.float64) for t in scan_inputs(3, 1, 20, 2, 3, 4, 2))
    S = np.zeros((1, 2, 4, 3))
    ys = []
    for t in range(20):
        S = np.exp(a[:, t])[..., None, None] * S + Bm[:, t, None, :, None] * x[:, t, :, None, :]
        ys.append(np.einsum("bfn,bhnp->bfhp", Cm[:, t], S))
    y, S_ref = jax.jit(M.ssd_sequential)(*(jnp.asarray(t, jnp.float32) for t in (x, a, Bm, Cm)))
    assert rel_err(y, np.stack(ys, 1)) <= 1e-5 and rel_err(S_ref, S) <= 1e-5


def test_strong_decays_stay_finite_and_exact():
    """Decays down to e^-40 per token: the masked exponents never overflow (forward or backward)."""
    x, a, Bm, Cm = scan_inputs(5, 2, 96, 2, 4, 4, 1, strong=True)
    y, _ = jax.jit(lambda *t: M.ssd_chunked(*t, 32))(x, a, Bm, Cm)
    assert rel_err(y, jax.jit(M.ssd_sequential)(x, a, Bm, Cm)[0]) <= 1e-5
    g = jax.jit(jax.grad(lambda a: jnp.sum(M.ssd_chunked(x, a, Bm, Cm, 32)[0] ** 2)))(a)
    assert bool(jnp.isfinite(g).all())


# ---- the whole layer ----------------------------------------------------------------------------
def numpy_layer(m: M.MambaLayer, x: np.ndarray) -> np.ndarray:
    """The layer written once more from the equations in the module docstring, token by token,
    in float64: projections, causal conv + silu, softplus step, recurrence, skip, gate, RMS norm,
    output projection."""
    p = {f.name: np.asarray(getattr(m, f.name), np.float64) for f in dataclasses.fields(m)
         if eqx.is_array(getattr(m, f.name))}
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    b, L, _ = x.shape
    K, E = p["conv_x"].shape
    F, hs = p["D"].shape
    P = E // hs
    z, xin = x @ p["w_zx"][:, 0], x @ p["w_zx"][:, 1]
    bc = np.einsum("bld,dpn->blpn", x, p["w_bc"])
    dt = np.log1p(np.exp(x @ p["w_dt"] + p["dt_bias"]))
    A = -np.exp(p["A_log"])

    def conv(u, w, bias, t):
        return bias + sum(w[k] * u[:, t - K + 1 + k] for k in range(K) if t - K + 1 + k >= 0)

    S = np.zeros((b, hs, bc.shape[-1], P))
    out = []
    for t in range(L):
        xt = silu(conv(xin, p["conv_x"], p["conv_x_bias"], t)).reshape(b, hs, P)
        bct = silu(conv(bc, p["conv_bc"], p["conv_bc_bias"], t))
        S = np.exp(dt[:, t] * A)[..., None, None] * S + np.einsum("bn,bhp->bhnp", bct[:, 0], dt[:, t, :, None] * xt)
        y = np.einsum("bfn,bhnp->bfhp", bct[:, 1:], S) + p["D"][None, :, :, None] * xt[:, None]
        y = y.reshape(b, F, E) * silu(z[:, t])[:, None]
        if "gate_norm" in p:
            y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + M.NORM_EPS) * p["gate_norm"]
        out.append(y @ p["w_out"])
    out = np.stack(out, 1)
    return out[:, :, 0] if F == 1 else out


@pytest.mark.parametrize("given", [{}, {"filters": 3, "gate_norm": False}, {"conv": 2, "chunk": 5, "filters": 2}])
def test_layer_equals_numpy_reference(given):
    m = build(**{**SMALL, **given})
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 40, DIMS.d_model)))
    got = np.asarray(jax.jit(lambda x: m(x))(jnp.asarray(x)))
    ref = numpy_layer(m, x)
    want = tuple(2 if s == "B" else s for s in OP.out_shape(args_of(**given), dataclasses.replace(DIMS, seq_len=40)))
    assert got.shape == ref.shape == want
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("given", [{}, {"filters": 3}, {"conv": 1, "filters": 2, "gate_norm": False}])
def test_decode_steps_equal_the_forward_pass(given):
    """init_cache/decode, token by token, over a length that is not a multiple of the chunk."""
    m = build(**{**SMALL, **given})
    x = jax.random.normal(jax.random.key(2), (3, 45, DIMS.d_model))
    full = np.asarray(m(x))
    step = jax.jit(lambda c, x_t, t: m.decode(c, x_t, t))
    cache, ys = m.init_cache(3, jnp.float32), []
    for t in range(45):
        cache, y = step(cache, x[:, t], jnp.int32(t))
        ys.append(np.asarray(y))
    assert rel_err(np.stack(ys, 1), full) <= 1e-5


@pytest.mark.parametrize("given", [{}, {"filters": 4, "chunk": 8}])
def test_layer_is_causal(given):
    m = build(**{**SMALL, **given})
    f = jax.jit(lambda x: m(x))
    x = jax.random.normal(jax.random.key(3), (1, 64, DIMS.d_model))
    base = f(x)
    scale = float(jnp.abs(base).max())
    for t in (0, 15, 16, 40, 63):
        out = f(x.at[0, t].add(1.0))
        if t:
            assert float(jnp.abs(out[0, :t] - base[0, :t]).max()) <= 1e-5 * scale, t
        assert float(jnp.abs(out[0, t:] - base[0, t:]).max()) > 1e-3 * scale, t


def test_gradients_are_finite_at_length_16384():
    dims = Dims(vocab=32, d_model=8, heads=2, window=8, seq_len=16384)
    m = build(dims=dims, state=4, expand=1, head_dim=4, chunk=64, dt_min=0.01, dt_max=1.0)
    x = jax.random.normal(jax.random.key(4), (1, 16384, 8))
    loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
    (gm, gx) = eqx.filter_jit(eqx.filter_grad(lambda mx: loss(*mx)))((m, x))
    leaves = jax.tree.leaves(eqx.filter(gm, eqx.is_array)) + [gx]
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    # the last output depends on the first token through the carried state (nothing is lost)
    assert float(jnp.abs(gm.A_log).max()) > 0 and float(jnp.abs(gx[0, 0]).max()) > 0


def test_bfloat16_layer_keeps_the_scan_in_float32():
    m = build(**SMALL, filters=2)
    x = jax.random.normal(jax.random.key(5), (2, 64, DIMS.d_model))
    mb = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, m)
    # jitted: one compilation per dtype instead of one per eagerly dispatched op
    ref, got = eqx.filter_jit(lambda m, x: m(x))(m, x), eqx.filter_jit(lambda m, x: m(x))(mb, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16 and bool(jnp.isfinite(got.astype(jnp.float32)).all())
    assert rel_err(got.astype(jnp.float32), ref) < 0.05
    jaxpr = jax.make_jaxpr(lambda x: mb(x))(x.astype(jnp.bfloat16))
    exps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)


# ---- contract: counts, costs, checks ------------------------------------------------------------
SETTINGS = [{}, {"filters": 4}, {"state": 16, "head_dim": 8, "chunk": 32, "gate_norm": False},
            {"expand": 1, "head_dim": 8, "conv": 2, "filters": 2, "chunk": 100}]
DIMS2 = Dims(vocab=10, d_model=32, heads=4, window=4, seq_len=100)


@pytest.mark.parametrize("given", SETTINGS)
def test_param_count_is_exact(given):
    a = args_of(**given)
    for dims in (DIMS, DIMS2):
        assert OP.check(a, dims, None) == []
        assert count_params(OP.build(a, dims, None, key=jax.random.key(0))) == OP.param_count(a, dims, None)


def test_explain_counts_the_built_model():
    text = """model m {
  vocab = 64; d_model = 32; heads = 2; window = 16; seq_len = 64
  block sh { ssm = mamba(state: 16); attn = block_attention(window: window, context: ssm -> sh) }
  block mf { ssm = mamba(state: 8, filters: 4, gate_norm: false); attn = block_attention(window: window, context: ssm -> mf) }
  layers { embed; sh; mf; norm rms; head untied }
}"""
    rep = bstc.explain(text)
    assert rep.params == count_params(bstc.load(text, key=jax.random.key(0)))


@pytest.mark.parametrize("D,L,given", [(32, 64, {"state": 8}), (32, 64, {"state": 8, "filters": 4}),
                                       (16, 256, {"state": 16, "head_dim": 8, "chunk": 32}),
                                       (16, 100, {"state": 16, "head_dim": 8, "chunk": 32, "filters": 2}),
                                       (64, 512, {"filters": 8, "gate_norm": False}),
                                       (8, 300, {"state": 4, "head_dim": 4, "filters": 2, "chunk": 32, "conv": 2})])
def test_flops_match_xla_cost_analysis(D, L, given):
    dims = Dims(vocab=32, d_model=D, heads=2, window=8, seq_len=L)
    a = args_of(**given)
    m = OP.build(a, dims, None, key=jax.random.key(0))
    cost = jax.jit(lambda x: m(x)).lower(jnp.ones((2, L, D))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert OP.flops_per_token(a, dims, None) * 2 * L == pytest.approx(cost["flops"], rel=0.10)


def test_checks_name_the_argument():
    assert [p.arg for p in OP.check(args_of(head_dim=12), DIMS, None)] == ["head_dim"]
    assert [p.arg for p in OP.check(args_of(dt_min=0.5, dt_max=0.1), DIMS, None)] == ["dt_min"]
    assert OP.out_shape(args_of(filters=3), DIMS) == ("B", 64, 3, 16)


def test_init_follows_mamba2():
    m = build(dims=Dims(vocab=32, d_model=256, heads=2, window=8, seq_len=64), head_dim=8)
    dt = np.asarray(jax.nn.softplus(m.dt_bias))
    A = np.exp(np.asarray(m.A_log))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4) and dt.max() / dt.min() > 10
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.max() - A.min() > 7
    np.testing.assert_array_equal(np.asarray(m.D), 1.0)


def test_same_key_same_params():
    a, b, c = build(seed=4, **SMALL), build(seed=4, **SMALL), build(seed=5, **SMALL)
    la, lb, lc = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (a, b, c))
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(la, lb))
    assert not all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(la, lc))


def test_dropout_only_with_a_key():
    m = build(**SMALL, dropout=0.5)
    f = jax.jit(lambda x, key: m(x, key=key))
    x = jax.random.normal(jax.random.key(0), (1, 64, DIMS.d_model))
    assert jnp.array_equal(f(x, None), f(x, None))
    assert not jnp.allclose(f(x, None), f(x, jax.random.key(1)))
