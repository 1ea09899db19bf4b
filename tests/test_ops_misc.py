"""The small layer kinds (mlp, rms_norm, layer_norm, embedding, head, dropout) against numpy
references, plus what every kind must satisfy: exact parameter counts, position-wise
causality, bf16, jit and deterministic construction."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.lower import count_params
from bstc.ops import REGISTRY, Dims

DIMS = Dims(vocab=11, d_model=8, heads=2, window=4, seq_len=12)
DIMS2 = Dims(vocab=5, d_model=6, heads=3, window=3, seq_len=9)


def args_of(kind, **given):
    a = {p.name: p.default for p in REGISTRY[kind].params if not p.required}
    a.update(given)
    return a


def build(kind, dims=DIMS, seed=0, **given):
    return REGISTRY[kind].build(args_of(kind, **given), dims, None, key=jax.random.key(seed))


def x_in(seed=1, dims=DIMS):
    return jax.random.normal(jax.random.key(seed), (2, dims.seq_len, dims.d_model))


def gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("act", ["gelu", "swiglu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_equals_numpy(act, bias):
    m = build("mlp", hidden=20, act=act, bias=bias)
    if bias:  # zero-initialised: give them values so a missing bias would show
        m = eqx.tree_at(lambda m: (m.b_in, m.b_out), m, (jnp.linspace(-1, 1, 20), jnp.linspace(1, 2, DIMS.d_model)))
    x = np.asarray(x_in())
    h = x @ np.asarray(m.w_in) + (np.asarray(m.b_in) if bias else 0)
    if act == "gelu":
        h = gelu_tanh(h)
    elif act == "relu":
        h = np.maximum(h, 0)
    else:
        g = x @ np.asarray(m.w_gate)
        h = g / (1 + np.exp(-g)) * h
    ref = h @ np.asarray(m.w_out) + (np.asarray(m.b_out) if bias else 0)
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-5)


def test_norms_equal_numpy():
    x = np.asarray(x_in()) * 3 + 1
    rms = build("rms_norm", eps=1e-5)
    rms = eqx.tree_at(lambda m: m.weight, rms, jnp.linspace(0.5, 2, DIMS.d_model))
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 2, DIMS.d_model)
    np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    ln = build("layer_norm")
    ln = eqx.tree_at(lambda m: (m.weight, m.bias), ln, (jnp.full(DIMS.d_model, 2.0), jnp.full(DIMS.d_model, -1.0)))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * 2 - 1
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)
    # bf16 in, bf16 out, statistics in f32 (a bf16 mean of squares would be visibly off)
    xb = jnp.asarray(x, jnp.bfloat16)
    out = rms(xb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(rms(xb.astype(jnp.float32))),
                               rtol=1e-2, atol=1e-2)


def test_embedding_and_heads():
    emb = build("embedding")
    assert emb.weight.shape == (DIMS.vocab, DIMS.d_model)
    tokens = jnp.array([[0, 3, 10, 3], [1, 1, 2, 9]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(emb(tokens)), np.asarray(emb.weight)[np.asarray(tokens)])
    x = x_in()
    untied = build("head")
    assert untied.weight.shape == (DIMS.vocab, DIMS.d_model)
    ref = np.asarray(x) @ np.asarray(untied.weight).T
    np.testing.assert_allclose(np.asarray(untied(x)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(untied(x, embedding=emb)), ref, rtol=1e-5, atol=1e-5)  # ignored
    tied = build("head", tied=True)
    assert count_params(tied) == 0
    # tied logits are (x / √D)·Eᵀ: unit scale at init with a N(0, 1) embedding
    np.testing.assert_allclose(np.asarray(tied(x, embedding=emb)),
                               np.asarray(x) @ np.asarray(emb.weight).T / np.sqrt(DIMS.d_model), rtol=1e-5, atol=1e-5)
    for kind, given in (("embedding", {}), ("head", {}), ("head", {"tied": True})):
        shape = REGISTRY[kind].out_shape(args_of(kind, **given), DIMS)
        assert shape == ("B", DIMS.seq_len, DIMS.d_model if kind == "embedding" else DIMS.vocab)


def test_dropout_is_identity_without_a_key_and_unbiased_with_one():
    m = build("dropout", rate=0.25)
    x = jnp.ones((4, 64, 32))
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(x))
    y = np.asarray(m(x, key=jax.random.key(0)))
    assert np.all((y == 0) | np.isclose(y, 1 / 0.75))
    assert abs((y == 0).mean() - 0.25) < 0.03 and abs(y.mean() - 1) < 0.05
    assert not np.array_equal(y, np.asarray(m(x, key=jax.random.key(1))))
    np.testing.assert_array_equal(np.asarray(build("dropout", rate=0.0)(x, key=jax.random.key(0))), np.asarray(x))
    mlp = build("mlp", hidden=16, dropout=0.5)
    np.testing.assert_array_equal(np.asarray(mlp(x_in())), np.asarray(mlp(x_in())))
    assert not np.array_equal(np.asarray(mlp(x_in(), key=jax.random.key(0))), np.asarray(mlp(x_in())))


CASES = [("mlp", {"hidden": 16}), ("mlp", {"hidden": 7, "act": "swiglu"}), ("mlp", {"hidden": 9, "bias": True}),
         ("mlp", {"hidden": 9, "act": "relu", "bias": True}), ("rms_norm", {}), ("layer_norm", {"eps": 1e-3}),
         ("embedding", {}), ("head", {}), ("head", {"tied": True}), ("dropout", {"rate": 0.3})]


@pytest.mark.parametrize("kind,given", CASES)
def test_param_count_is_exact_and_costs_are_sane(kind, given):
    op = REGISTRY[kind]
    a = args_of(kind, **given)
    for dims in (DIMS, DIMS2):
        assert op.check(a, dims, None) == []
        assert count_params(op.build(a, dims, None, key=jax.random.key(0))) == op.param_count(a, dims, None)
        assert op.flops_per_token(a, dims, None) >= 0
    assert op.role in ("attn", "ssm", "mlp", "norm", "embed", "other")


@pytest.mark.parametrize("kind,given", [c for c in CASES if c[0] not in ("embedding", "head")])
def test_position_wise_layers_are_causal_jit_and_bf16(kind, given):
    m = build(kind, **given)
    f = jax.jit(lambda x: m(x))
    x = x_in()
    base = f(x)
    t = 5
    out = f(x.at[:, t].add(1.0))
    diff = np.abs(np.asarray(out - base)).max(axis=(0, 2))
    assert diff[:t].max() == 0 and diff[t + 1:].max() == 0  # position-wise: only row t moves
    if kind != "dropout":
        assert diff[t] > 0
    mb = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, m)
    yb = mb(x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and bool(jnp.isfinite(yb.astype(jnp.float32)).all())


@pytest.mark.parametrize("kind,given", CASES)
def test_same_key_same_params(kind, given):
    a, b = build(kind, seed=3, **given), build(kind, seed=3, **given)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for p, q in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    if kind in ("mlp", "embedding", "head") and not given.get("tied"):
        c = build(kind, seed=4, **given)
        assert not np.array_equal(np.asarray(jax.tree.leaves(a)[0]), np.asarray(jax.tree.leaves(c)[0]))


def test_build_is_vmappable_like_the_lowering_does():
    """The lowering builds repeated layers with eqx.filter_vmap over keys: every kind must allow it."""
    keys = jax.random.split(jax.random.key(0), 3)
    for kind, given in [("mlp", {"hidden": 7, "act": "swiglu", "bias": True}), ("layer_norm", {}), ("s4d", {"filters": 2}),
                        ("head", {"tied": True})]:
        op = REGISTRY[kind]
        stacked = eqx.filter_vmap(lambda k: op.build(args_of(kind, **given), DIMS, None, key=k))(keys)
        for leaf in jax.tree.leaves(eqx.filter(stacked, eqx.is_array)):
            assert leaf.shape[0] == 3, kind
