"""SSM layer kinds (s4d, long_conv) and their numerics in bstc/ops/_ssm.py, against oracles:
factorised kernel == Vandermonde == step-by-step recurrence, FFT == direct convolution, the
layer == a hand-written reference, recurrent decoding == the parallel forward, causality."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.lower import count_params
from bstc.ops import REGISTRY, Dims
from bstc.ops import _ssm
from bstc.ops.long_conv import smooth_kernel, squash_kernel

DIMS = Dims(vocab=32, d_model=8, heads=2, window=8, seq_len=32)


def args_of(kind, **given):
    a = {p.name: p.default for p in REGISTRY[kind].params if not p.required}
    a.update(given)
    return a


def build(kind, seed=0, dims=DIMS, **given):
    return REGISTRY[kind].build(args_of(kind, **given), dims, None, key=jax.random.key(seed))


# ---- the S4D kernel ---------------------------------------------------------------------------
@pytest.mark.parametrize("init,length", [("lin", 1), ("inv", 10), ("lin", 100), ("inv", 257), ("lin", 257)])
def test_s4d_kernel_factorised_equals_vandermonde_and_recurrence(init, length):
    p = _ssm.s4d_init(jax.random.key(1), channels=3, state=16, init=init, filters=2)
    fact = np.asarray(_ssm.s4d_kernel(*p, length))
    vand = np.asarray(_ssm.s4d_kernel_vandermonde(*p, length))
    assert fact.shape == vand.shape == (2, 3, length) and fact.dtype == np.float32
    scale = np.abs(vand).max()
    np.testing.assert_allclose(fact, vand, rtol=1e-5, atol=1e-5 * scale)
    # The recurrence's impulse response is the kernel (dB explicit there, folded into C' here).
    u = jnp.zeros((length, 3)).at[0].set(1.0)
    rec = np.moveaxis(np.asarray(_ssm.s4d_recurrence(*p, u)), 1, 2)  # (F, H, L)
    np.testing.assert_allclose(rec, vand, rtol=1e-5, atol=1e-5 * scale)


def test_s4d_kernel_never_builds_the_vandermonde_tensor():
    """No intermediate of the factorised kernel is as large as (H, N/2, L) (the naive one is)."""
    H, N, L = 4, 64, 4096
    p = _ssm.s4d_init(jax.random.key(0), channels=H, state=N)

    def biggest(f):
        jaxpr = jax.make_jaxpr(lambda *a: f(*a, L))(*p)
        return max(int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars)

    assert biggest(_ssm.s4d_kernel_vandermonde) >= H * (N // 2) * L  # the check can fail
    assert biggest(_ssm.s4d_kernel) < H * (N // 2) * L // 4


def test_s4d_kernel_upcasts_bf16_params():
    p = _ssm.s4d_init(jax.random.key(2), channels=2, state=8)
    k16 = _ssm.s4d_kernel(*(a.astype(jnp.bfloat16) for a in p), 40)
    k32 = _ssm.s4d_kernel(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in p), 40)
    assert k16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(k16), np.asarray(k32))


def test_s4d_init_follows_the_paper():
    log_dt, log_A_re, A_im, C = _ssm.s4d_init(jax.random.key(0), channels=64, state=8, init="lin")
    np.testing.assert_allclose(np.asarray(A_im[0]), np.pi * np.arange(4), rtol=1e-6)  # S4D-Lin: π·n
    np.testing.assert_allclose(np.exp(np.asarray(log_A_re)), 0.5, rtol=1e-6)  # Re A = −1/2
    dt = np.exp(np.asarray(log_dt))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5) and dt.max() / dt.min() > 10
    _, _, A_inv, _ = _ssm.s4d_init(jax.random.key(0), channels=1, state=8, init="inv")
    n = np.arange(4)
    np.testing.assert_allclose(np.asarray(A_inv[0]), 8 / np.pi * (8 / (2 * n + 1) - 1), rtol=1e-6)  # S4D-Inv
    _, log_A_real, A_real, _ = _ssm.s4d_init(jax.random.key(0), channels=2, state=8, init="real")
    assert not np.asarray(A_real).any()  # no rotation
    np.testing.assert_allclose(np.exp(np.asarray(log_A_real[1])), 0.5 * (n + 1), rtol=1e-6)


# ---- convolution --------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [7, 100])
def test_fft_conv_equals_direct_conv(L):
    u = jax.random.normal(jax.random.key(3), (2, L, 3))
    k = jax.random.normal(jax.random.key(4), (3, L))
    direct = np.asarray(_ssm.causal_direct_conv(u, k))
    # Written out once more from the definition y[t] = Σ_{s ≤ t} k[s]·u[t − s].
    un, kn = np.asarray(u), np.asarray(k)
    loops = np.stack([sum(kn[:, s] * un[:, t - s] for s in range(t + 1)) for t in range(L)], axis=1)
    np.testing.assert_allclose(direct, loops, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_ssm.causal_fft_conv(u, k)), direct, rtol=1e-4, atol=1e-4)
    # Several filters share one FFT of u; a kernel shorter than L acts as zero beyond its end.
    ks = jnp.stack([k, -2 * k])
    mf = np.asarray(_ssm.multi_filter_fft_conv(u, ks))
    np.testing.assert_allclose(mf[:, :, 1], -2 * direct, rtol=1e-4, atol=1e-4)
    short = np.asarray(_ssm.multi_filter_fft_conv(u, ks[..., : max(1, L // 2)]))[:, :, 0]
    np.testing.assert_allclose(short, np.asarray(_ssm.causal_direct_conv(u, k.at[:, max(1, L // 2):].set(0))),
                               rtol=1e-4, atol=1e-4)


def _fft_dtypes(f, *a):
    jaxpr = jax.make_jaxpr(f)(*a)
    out = []

    def walk(jx):
        for e in jx.eqns:
            if e.primitive.name == "fft":
                out.extend(str(v.aval.dtype) for v in e.invars)
            for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
                walk(sub)
            for p in e.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr)
    walk(jaxpr.jaxpr)
    return out


@pytest.mark.parametrize("kind", ["s4d", "long_conv"])
def test_bf16_layer_keeps_its_fft_in_float32(kind):
    layer = build(kind, filters=2)
    layer = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, layer)
    x = jax.random.normal(jax.random.key(1), (2, DIMS.seq_len, DIMS.d_model)).astype(jnp.bfloat16)
    out = layer(x)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    dts = _fft_dtypes(lambda x: layer(x), x)
    assert dts and set(dts) <= {"float32", "complex64"}, dts


# ---- the s4d layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("filters,centre", [(1, True), (3, True), (1, False), (3, False)])
def test_s4d_layer_equals_reference(filters, centre):
    layer = build("s4d", state=8, filters=filters, centre=centre)
    x = jax.random.normal(jax.random.key(5), (2, DIMS.seq_len, DIMS.d_model)) + 0.5  # a mean to remove
    got = np.asarray(jax.jit(lambda x: layer(x))(x))
    K = _ssm.s4d_kernel_vandermonde(layer.log_dt, layer.log_A_re, layer.A_im, layer.C, DIMS.seq_len)
    ref = []
    for f in range(filters):
        if centre:  # row t convolves the prefix minus its own mean: Σ_s K[t−s]·(x_s − mean(x_0..x_t))
            xn, kf = np.asarray(x, np.float64), np.asarray(K[f], np.float64)  # kf: (D, L)
            y = np.zeros_like(xn)
            for t in range(DIMS.seq_len):
                xc = xn[:, :t + 1] - xn[:, :t + 1].mean(1, keepdims=True)
                y[:, t] = np.einsum("bsd,ds->bd", xc, kf[:, t::-1])  # s = 0..t pairs with K[t], …, K[0]
            y = y + layer.D[f] * x
        else:
            y = _ssm.causal_direct_conv(x, K[f]) + layer.D[f] * x
        ref.append(jax.nn.gelu(y) @ layer.w_out.T + layer.b_out)
    ref = np.stack(ref, axis=2)
    ref = ref[:, :, 0] if filters == 1 else ref
    assert got.shape == ref.shape == tuple(n if n != "B" else 2 for n in REGISTRY["s4d"].out_shape(
        args_of("s4d", filters=filters), DIMS))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("filters,centre", [(1, True), (2, True), (1, False)])
def test_s4d_recurrent_step_equals_forward(filters, centre):
    layer = build("s4d", state=8, filters=filters, init="inv", centre=centre)
    x = jax.random.normal(jax.random.key(6), (2, DIMS.seq_len, DIMS.d_model)) + 0.5
    full = np.asarray(layer(x))
    step = jax.jit(lambda s, x_t: layer.step(s, x_t))
    state, ys = layer.init_state(2), []
    for t in range(DIMS.seq_len):
        state, y = step(state, x[:, t])
        ys.append(np.asarray(y))
    np.testing.assert_allclose(np.stack(ys, axis=1), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    rec = layer.recurrence()  # discretised dA, dB explicitly: ZOH with B = 1
    dt = np.exp(np.asarray(layer.log_dt))[:, None]
    A = -np.exp(np.asarray(layer.log_A_re)) + 1j * np.asarray(layer.A_im)
    np.testing.assert_allclose(np.asarray(rec.dA), np.exp(dt * A), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rec.dB), (np.exp(dt * A) - 1) / A, rtol=1e-4)


# ---- the unstructured kernel ------------------------------------------------------------------
def test_squash_zeroes_small_entries_and_shrinks_the_rest():
    k = jnp.array([-0.5, -0.1, -0.05, 0.0, 0.02, 0.1, 0.3])
    np.testing.assert_allclose(np.asarray(squash_kernel(k, 0.1)), [-0.4, 0, 0, 0, 0, 0, 0.2], atol=1e-7)
    g = jax.grad(lambda k: squash_kernel(k, 0.1).sum())(k)  # dead entries get no gradient
    np.testing.assert_array_equal(np.asarray(g), [1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(squash_kernel(k, 0.0)), np.asarray(k))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_smooth_is_a_same_length_moving_average(width):
    k = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 11)))
    got = np.asarray(smooth_kernel(jnp.asarray(k), width))
    assert got.shape == k.shape
    lo, hi = (width - 1) // 2, width // 2
    ref = np.stack([k[..., max(0, i - lo):i + hi + 1].mean(-1) for i in range(11)], axis=-1)  # edges: fewer taps
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_long_conv_kernel_pipeline_and_dropout():
    layer = build("long_conv", filters=2, smooth=3, lam=0.001, kernel_dropout=0.5)
    w = np.asarray(layer.kernel.weight)
    assert w.shape == (2, DIMS.d_model, DIMS.seq_len) and 0.0015 < w.std() < 0.0025  # randn·0.002
    ref = np.asarray(squash_kernel(smooth_kernel(jnp.asarray(w), 3), 0.001))
    np.testing.assert_array_equal(np.asarray(layer.kernel()), ref)  # no key: no kernel dropout
    dropped = np.asarray(layer.kernel(key=jax.random.key(1)))
    assert np.all((dropped == 0) | np.isclose(dropped, 2 * ref))
    assert (dropped == 0).sum() > (ref == 0).sum()


def test_long_conv_lr_multiplier_covers_the_kernel_only():
    layer = build("long_conv", lr_mult=0.25)
    owners = [m for m in jax.tree.leaves(layer, is_leaf=lambda m: isinstance(m, eqx.Module) and m is not layer)
              if isinstance(m, eqx.Module) and getattr(m, "lr_multiplier", None) is not None]
    assert len(owners) == 1 and owners[0].lr_multiplier == 0.25
    assert [a.shape for a in jax.tree.leaves(owners[0])] == [layer.kernel.weight.shape]
    assert getattr(layer, "lr_multiplier", None) is None  # the skip and output linear train at the base lr


def test_long_conv_short_kernel_forgets_beyond_its_length():
    layer = build("long_conv", kernel_len=8, lam=0.0, smooth=1)
    x = jax.random.normal(jax.random.key(2), (1, DIMS.seq_len, DIMS.d_model))
    base, out = layer(x), layer(x.at[0, 3].add(1.0))
    assert float(jnp.abs(out[0, 3:11] - base[0, 3:11]).max()) > 0
    assert float(jnp.abs(out[0, 11:] - base[0, 11:]).max()) < 1e-5 * float(jnp.abs(base).max())


# ---- every SSM kind: causality, counts, checks, determinism -----------------------------------
SETTINGS = [("s4d", {}), ("s4d", {"state": 6, "filters": 4, "init": "inv"}), ("long_conv", {"lam": 0.001}),
            ("long_conv", {"filters": 3, "kernel_len": 12, "smooth": 4, "lam": 0.0})]


@pytest.mark.parametrize("kind,given", SETTINGS)
def test_ssm_layers_are_causal(kind, given):
    layer = build(kind, **given)
    f = jax.jit(lambda x: layer(x))
    x = jax.random.normal(jax.random.key(3), (1, DIMS.seq_len, DIMS.d_model))
    base = f(x)
    scale = float(jnp.abs(base).max())
    for t in (1, 15, DIMS.seq_len - 1):
        out = f(x.at[0, t].add(1.0))
        assert float(jnp.abs(out[0, :t] - base[0, :t]).max()) <= 1e-4 * scale, (kind, t)
        assert float(jnp.abs(out[0, t:] - base[0, t:]).max()) > 1e-3 * scale, (kind, t)


@pytest.mark.parametrize("kind,given", SETTINGS + [("s4d", {"state": 2}), ("long_conv", {"kernel_len": 100})])
def test_param_count_is_exact(kind, given):
    op = REGISTRY[kind]
    a = args_of(kind, **given)
    for dims in (DIMS, Dims(vocab=10, d_model=12, heads=3, window=4, seq_len=20)):
        assert op.check(a, dims, None) == []
        assert count_params(op.build(a, dims, None, key=jax.random.key(0))) == op.param_count(a, dims, None)
        assert op.flops_per_token(a, dims, None) > 0


def test_ssm_checks_name_the_argument():
    s4d, lc = REGISTRY["s4d"], REGISTRY["long_conv"]
    assert [p.arg for p in s4d.check(args_of("s4d", state=7), DIMS, None)] == ["state"]
    assert [p.arg for p in s4d.check(args_of("s4d", dt_min=0.5, dt_max=0.1), DIMS, None)] == ["dt_min"]
    assert [p.arg for p in lc.check(args_of("long_conv", smooth=40), DIMS, None)] == ["smooth"]
    assert s4d.check(args_of("s4d"), DIMS, None) == [] and lc.check(args_of("long_conv"), DIMS, None) == []


@pytest.mark.parametrize("kind", ["s4d", "long_conv"])
def test_same_key_same_params_and_dropout_needs_a_key(kind):
    a, b, c = build(kind, seed=4, dropout=0.5), build(kind, seed=4, dropout=0.5), build(kind, seed=5, dropout=0.5)
    la, lb, lc = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (a, b, c))
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(la, lb))
    assert not all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(la, lc))
    x = jax.random.normal(jax.random.key(0), (1, DIMS.seq_len, DIMS.d_model))
    np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(a(x)))  # key=None: deterministic
    assert not np.array_equal(np.asarray(a(x, key=jax.random.key(1))), np.asarray(a(x)))
