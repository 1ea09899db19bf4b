"""Numerical oracles for the BST layer kinds: S4D kernel (factorised == Vandermonde ==
recurrence), FFT == direct convolution, blockwise == dense attention for every context
variant, causality by perturbation, exact parameter counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.lower import count_params
from bstc.ops import REGISTRY, ContextSpec, Dims
from bstc.ops import _attention as att
from bstc.ops import _ssm
from bstc.ops.long_conv import smooth_kernel, squash_kernel

DIMS = Dims(vocab=64, d_model=16, heads=2, window=8, seq_len=32)


def _args(kind, **given):
    op = REGISTRY[kind]
    a = {p.name: p.default for p in op.params if not p.required}
    a.update(given)
    return a


@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("length", [1, 7, 64, 1000])
def test_s4d_kernel_factorised_equals_vandermonde_and_recurrence(init, length):
    p = _ssm.s4d_init(jax.random.key(0), channels=4, state=8, init=init, filters=2)
    fact = np.asarray(_ssm.s4d_kernel(*p, length))
    vand = np.asarray(_ssm.s4d_kernel_vandermonde(*p, length))
    assert fact.shape == (2, 4, length)
    scale = np.abs(vand).max()
    np.testing.assert_allclose(fact, vand, rtol=1e-5, atol=1e-5 * scale)
    if length <= 64:  # the impulse response of the recurrence is the kernel
        u = jnp.zeros((length, 4)).at[0].set(1.0)
        rec = np.asarray(_ssm.s4d_recurrence(*p, u))  # (F, L, H)
        np.testing.assert_allclose(np.moveaxis(rec, 1, 2), vand, rtol=1e-5, atol=1e-5 * scale)


def test_s4d_recurrence_equals_convolution_on_random_input():
    p = _ssm.s4d_init(jax.random.key(1), channels=3, state=6)
    u = jax.random.normal(jax.random.key(2), (50, 3))
    rec = np.asarray(_ssm.s4d_recurrence(*p, u))[0]  # (L, H)
    k = _ssm.s4d_kernel(*p, 50)[0]
    conv = np.asarray(_ssm.causal_fft_conv(u[None], k))[0]
    np.testing.assert_allclose(rec, conv, rtol=1e-4, atol=1e-4 * np.abs(conv).max())


@pytest.mark.parametrize("L", [5, 32, 33])
def test_fft_conv_equals_direct(L):
    u = jax.random.normal(jax.random.key(3), (2, L, 3))
    k = jax.random.normal(jax.random.key(4), (3, L))
    np.testing.assert_allclose(np.asarray(_ssm.causal_fft_conv(u, k)), np.asarray(_ssm.causal_direct_conv(u, k)),
                               rtol=1e-4, atol=1e-4)
    mf = _ssm.multi_filter_fft_conv(u, jnp.stack([k, 2 * k]))
    np.testing.assert_allclose(np.asarray(mf[:, :, 1]), 2 * np.asarray(_ssm.causal_direct_conv(u, k)), rtol=1e-4, atol=1e-4)


def test_fft_conv_stays_float32_for_bf16_input():
    u = jax.random.normal(jax.random.key(3), (1, 16, 2)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(4), (2, 16))
    assert _ssm.causal_fft_conv(u, k).dtype == jnp.float32


def test_long_conv_kernel_regularisers():
    k = jnp.array([[0.0, 3.0, 0.0, 0.0, 6.0]])
    np.testing.assert_allclose(np.asarray(smooth_kernel(k, 3)), [[1.5, 1.0, 1.0, 2.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(smooth_kernel(k, 1)), np.asarray(k))
    s = np.asarray(squash_kernel(jnp.array([-0.5, -0.05, 0.0, 0.05, 0.5]), 0.1))
    np.testing.assert_allclose(s, [-0.4, 0.0, 0.0, 0.0, 0.4], rtol=1e-6)


# ---- attention ------------------------------------------------------------------------------
def _qkv(B=2, L=32, H=2, dh=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, L, H, dh)) for k in ks]


def test_blockwise_equals_dense_block_local():
    q, k, v = _qkv()
    W, L = 8, 32
    t = np.arange(L)
    mask = (t[:, None] >= t[None, :]) & (t[:, None] // W == t[None, :] // W)
    np.testing.assert_allclose(np.asarray(att.blockwise_attention(q, k, v, W)),
                               np.asarray(att.dense_attention(q, k, v, jnp.asarray(mask))), rtol=1e-5, atol=1e-5)


def test_blockwise_with_context_equals_dense_over_augmented_keys():
    """Each block attends to its own S context keys: build that as one dense problem per block."""
    q, k, v = _qkv(seed=1)
    B, L, H, dh = q.shape
    W, S = 8, 3
    nb = L // W
    ck = jax.random.normal(jax.random.key(7), (B, nb, S, H, dh))
    cv = jax.random.normal(jax.random.key(8), (B, nb, S, H, dh))
    got = np.asarray(att.blockwise_attention(q, k, v, W, ck, cv))
    for b in range(nb):
        sl = slice(b * W, (b + 1) * W)
        keys = jnp.concatenate([ck[:, b], k[:, sl]], axis=1)
        vals = jnp.concatenate([cv[:, b], v[:, sl]], axis=1)
        mask = np.concatenate([np.ones((W, S), bool), np.tril(np.ones((W, W), bool))], axis=1)
        ref = att.attend(q[:, sl], keys, vals, jnp.asarray(mask))
        np.testing.assert_allclose(got[:, sl], np.asarray(ref), rtol=1e-5, atol=1e-5)


def _expected_context(variant, y, layer, W):
    """The context set of every block, written from the definitions (independent of the layer code)."""
    y = np.asarray(y)
    B, L = y.shape[:2]
    nb = L // W
    first = np.asarray(layer.ctx_first)
    out = []
    for kb in range(nb):
        if variant == "sh":
            c = np.broadcast_to(first, (B,) + first.shape) if kb == 0 else y[:, (kb - 1) * W:kb * W]
        elif variant == "mh":
            c = np.broadcast_to(first[:, None], (B, W, y.shape[2], first.shape[-1])) if kb == 0 \
                else y[:, (kb - 1) * W:kb * W]
        else:  # mf: last output before the block from each filter, plus context ids
            c = np.broadcast_to(first, (B,) + first.shape) if kb == 0 else y[:, kb * W - 1]
            c = c + np.asarray(layer.ctx_ids)
        out.append(c)
    return out


@pytest.mark.parametrize("variant,filters", [("sh", 1), ("mh", 2), ("mf", 3)])
def test_block_attention_context_variants_equal_dense(variant, filters):
    D, H, W, L = DIMS.d_model, DIMS.heads, DIMS.window, DIMS.seq_len
    dh = D // H
    ctx = ContextSpec(variant, filters)
    layer = REGISTRY["block_attention"].build(_args("block_attention", window=W, rope=False), DIMS, ctx,
                                              key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, L, D))
    yshape = (2, L, D) if filters == 1 else (2, L, filters, D)
    y = jax.random.normal(jax.random.key(2), yshape)
    got = np.asarray(layer(x, context=y))
    ctxs = _expected_context(variant, y, layer, W)
    q = (x @ layer.wq).reshape(2, L, H, dh)
    k = (x @ layer.wk).reshape(2, L, H, dh)
    v = (x @ layer.wv).reshape(2, L, H, dh)
    for kb, c in enumerate(ctxs):
        sl = slice(kb * W, (kb + 1) * W)
        c = jnp.asarray(c)
        if variant == "mh":  # head h projects its own filter's states, then keeps its slice
            ckh = [(c[:, :, h] @ layer.wk).reshape(2, -1, H, dh)[:, :, h] for h in range(H)]
            cvh = [(c[:, :, h] @ layer.wv).reshape(2, -1, H, dh)[:, :, h] for h in range(H)]
            ck, cv = jnp.stack(ckh, axis=2), jnp.stack(cvh, axis=2)
        else:
            ck = (c @ layer.wk).reshape(2, -1, H, dh)
            cv = (c @ layer.wv).reshape(2, -1, H, dh)
        S = ck.shape[1]
        mask = np.concatenate([np.ones((W, S), bool), np.tril(np.ones((W, W), bool))], axis=1)
        o = att.attend(q[:, sl], jnp.concatenate([ck, k[:, sl]], 1), jnp.concatenate([cv, v[:, sl]], 1), jnp.asarray(mask))
        ref = o.reshape(2, W, D) @ layer.wo
        np.testing.assert_allclose(got[:, sl], np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_rope_is_relative():
    q, k, _ = _qkv(B=1, L=8)
    s1 = jnp.einsum("bqhd,bkhd->bhqk", att.apply_rope(q, jnp.arange(8)), att.apply_rope(k, jnp.arange(8)))
    s2 = jnp.einsum("bqhd,bkhd->bhqk", att.apply_rope(q, jnp.arange(8) + 5), att.apply_rope(k, jnp.arange(8) + 5))
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-4, atol=1e-4)


# ---- every kind: causality and parameter counts -----------------------------------------------
CASES = [
    ("s4d", {}, None), ("s4d", {"filters": 3, "init": "inv"}, None), ("long_conv", {}, None),
    ("long_conv", {"filters": 2, "kernel_len": 16}, None), ("block_attention", {"window": 8}, None),
    ("block_attention", {"window": 8}, ContextSpec("sh", 1)), ("block_attention", {"window": 8}, ContextSpec("mh", 2)),
    ("block_attention", {"window": 8, "first_context": "zero"}, ContextSpec("mf", 3)),
    ("mlp", {"hidden": 24}, None), ("mlp", {"hidden": 24, "act": "swiglu", "bias": True}, None),
    ("rms_norm", {}, None), ("layer_norm", {}, None), ("dropout", {}, None),
]


def _context_input(ctx, L, D, seed):
    if ctx is None:
        return None
    shape = (1, L, D) if ctx.filters == 1 else (1, L, ctx.filters, D)
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("kind,given,ctx", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_param_count_and_causality(kind, given, ctx):
    op = REGISTRY[kind]
    args = _args(kind, **given)
    assert op.check(args, DIMS, ctx) == []
    layer = op.build(args, DIMS, ctx, key=jax.random.key(0))
    assert count_params(layer) == op.param_count(args, DIMS, ctx)
    L, D = DIMS.seq_len, DIMS.d_model
    x = jax.random.normal(jax.random.key(1), (1, L, D))
    c = _context_input(ctx, L, D, 2)
    f = jax.jit(lambda x, c: layer(x, context=c))
    base = f(x, c)
    assert base.shape == tuple(s if s != "B" else 1 for s in op.out_shape(args, DIMS))
    scale = float(jnp.abs(base).max())
    for t in (0, 7, 8, 20, L - 1):
        x2 = x.at[0, t].add(1.0)
        c2 = None if c is None else c.at[0, t].add(1.0)  # the context source is causal too
        out = f(x2, c2)
        if t > 0:
            assert float(jnp.abs(out[0, :t] - base[0, :t]).max()) <= 1e-4 * scale, f"{kind}: position {t} leaked"
        if kind not in ("dropout",):
            assert float(jnp.abs(out[0, t:] - base[0, t:]).max()) > 0


def test_bf16_layers_run_and_keep_dtype():
    for kind, given, ctx in CASES:
        op = REGISTRY[kind]
        args = _args(kind, **given)
        layer = op.build(args, DIMS, ctx, key=jax.random.key(0))
        layer = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, layer)
        x = jnp.ones((1, DIMS.seq_len, DIMS.d_model), jnp.bfloat16)
        c = _context_input(ctx, DIMS.seq_len, DIMS.d_model, 2)
        out = layer(x, context=None if c is None else c.astype(jnp.bfloat16))
        assert out.dtype == jnp.bfloat16, kind
        assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), kind


def test_checks_report_bad_arguments():
    ba = REGISTRY["block_attention"]
    probs = ba.check(_args("block_attention", window=5), DIMS, None)
    assert [p.arg for p in probs] == ["window"]
    assert "not divisible by window (5)" in probs[0].message
    probs = ba.check(_args("block_attention", window=8), DIMS, ContextSpec("mh", 3))
    assert probs and "one source filter per head (2)" in probs[0].message and "filters: 2" in probs[0].hint
    assert ba.check(_args("block_attention", window=8), DIMS, ContextSpec("sh", 2))
    assert ba.check(_args("block_attention", window=8), DIMS, ContextSpec("mf", 1))
    assert REGISTRY["s4d"].check(_args("s4d", state=7), DIMS, None)[0].arg == "state"


def test_same_key_same_params():
    a = REGISTRY["s4d"].build(_args("s4d"), DIMS, None, key=jax.random.key(5))
    b = REGISTRY["s4d"].build(_args("s4d"), DIMS, None, key=jax.random.key(5))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_s4d_recurrent_form_matches_layer_convolution():
    op = REGISTRY["s4d"]
    layer = op.build(_args("s4d", state=8), DIMS, None, key=jax.random.key(3))
    dA, Cp, Dskip = layer.recurrent_form()
    u = jax.random.normal(jax.random.key(4), (DIMS.seq_len, DIMS.d_model))
    state = jnp.zeros(dA.shape, jnp.complex64)
    ys = []
    for t in range(DIMS.seq_len):
        state, y = _ssm.s4d_step(dA, Cp, state, u[t])
        ys.append(y[0])
    conv = _ssm.causal_fft_conv(u[None], layer.kernel(DIMS.seq_len)[0])[0]
    np.testing.assert_allclose(np.stack(ys), np.asarray(conv), rtol=1e-4, atol=1e-4 * float(jnp.abs(conv).max()))
