"""The block-end form of the s4d layer (what an `mf` context reads) against the FFT path it
replaces: the layer's rows W−1, 2W−1, … and their gradients, the block-end states against the
step-by-step recurrence, and a whole MF model lowered both ways."""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc.lower import Sub
from bstc.ops import REGISTRY, Dims, _ssm

DIMS = Dims(vocab=32, d_model=8, heads=2, window=8, seq_len=64)


def s4d(**given):
    a = {p.name: p.default for p in REGISTRY["s4d"].params if not p.required}
    a.update(state=16, **given)
    return REGISTRY["s4d"].build(a, DIMS, None, key=jax.random.key(0))


# windows: 8 blocks, a block per token, one block of the whole sequence
@pytest.mark.parametrize("filters,centre,init,window", [(1, True, "lin", 8), (4, True, "inv", 1),
                                                        (4, False, "lin", 64), (3, True, "real", 8)])
def test_block_ends_equal_the_fft_path_rows(filters, centre, init, window):
    layer = s4d(filters=filters, centre=centre, init=init)
    x = jax.random.normal(jax.random.key(1), (2, DIMS.seq_len, DIMS.d_model)) + 0.5  # a mean to remove
    full = np.asarray(jax.jit(lambda x: layer(x))(x))[:, window - 1::window]
    got = np.asarray(jax.jit(lambda x: layer.block_ends(x, window))(x))
    assert got.shape == full.shape
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


def test_block_ends_gradients_equal_the_fft_path():
    layer = s4d(filters=4)
    x = jax.random.normal(jax.random.key(2), (2, DIMS.seq_len, DIMS.d_model)) + 0.5
    w = jax.random.normal(jax.random.key(3), (2, DIMS.seq_len // 8, 4, DIMS.d_model))  # a loss that weighs every output

    def loss(params, x, ends):
        m = eqx.combine(params, static)
        y = m.block_ends(x, 8) if ends else m(x)[:, 7::8]
        return jnp.sum(w * y)

    params, static = eqx.partition(layer, eqx.is_inexact_array)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    ref, got = grad(params, x, False), grad(params, x, True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4 * float(jnp.abs(b).max()))


def test_block_end_states_equal_the_recurrence():
    """x_t = dA·x_{t−1} + u_t step by step (complex, one token at a time), read at every block end."""
    log_dt, log_A_re, A_im, _ = _ssm.s4d_init(jax.random.key(4), 3, 8, "inv")
    dtA, dA, _ = _ssm.zoh(log_dt, log_A_re, A_im)
    u = jax.random.normal(jax.random.key(5), (2, 24, 3))
    _, xs = jax.jit(jax.lax.scan, static_argnums=0)(lambda x, u_t: (dA * x + u_t[..., None],) * 2, jnp.zeros((2, 3, 4), jnp.complex64),
                         jnp.moveaxis(u, 1, 0))
    ref = np.asarray(jnp.moveaxis(xs, 0, 1)[:, 5::6])  # (2, 4, 3, 4)
    got = np.asarray(jax.jit(_ssm.block_end_states, static_argnums=2)(u, dtA, 6))
    np.testing.assert_allclose(got[..., :4] + 1j * got[..., 4:], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


MF = """model mf {
  vocab = 64; d_model = 16; heads = 2; window = 8; seq_len = 32
  block b {
    ssm = s4d(state: 8, filters: 4)
    attn = block_attention(window: window, context: ssm -> mf)
    mlp = mlp(hidden: 32)
  }
  layers { embed; b; norm rms; head untied }
}
"""


def _every_position(model):
    """The same model with its context sources computing every position (the FFT path)."""
    return jax.tree.map(lambda s: dataclasses.replace(s, block_ends=0) if isinstance(s, Sub) else s, model,
                        is_leaf=lambda s: isinstance(s, Sub))


def test_an_mf_model_reads_block_ends_and_equals_the_fft_path():
    model = bstc.load(MF, key=jax.random.key(0), scan=False)
    assert [s.block_ends for s in model.stages[0].block.subs] == [8, 0, 0]
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(m):
        return jnp.sum(m(tokens) ** 2)

    (got, g), (ref, g_ref) = loss(model), loss(_every_position(model))
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4 * float(jnp.abs(b).max()) + 1e-7)


def test_explain_counts_the_block_end_algorithm_where_it_applies():
    rep = bstc.explain(MF)
    row = next(r for r in rep.rows if r.name.endswith(".ssm"))
    assert "block ends (every 8)" in row.note
    full = REGISTRY["s4d"].flops_per_token(dict(bstc.parse(MF).layers[0].sublayers[0].args), bstc.parse(MF).dims, None)
    assert row.flops_per_token < full
    for other in (MF.replace("filters: 4", "filters: 1").replace("-> mf", "-> sh"),  # sh reads every position
                  MF.replace("s4d(state: 8, filters: 4)", "long_conv(filters: 4)")):  # no block-end form
        assert all("block ends" not in r.note for r in bstc.explain(other).rows)
        m = bstc.load(other, key=jax.random.key(0), scan=False)
        assert all(s.block_ends == 0 for s in m.stages[0].block.subs)
