"""Lowering: every zoo model lowers, is causal, trains, and matches explain's parameter count;
scan-stacked and unrolled lowerings agree; compile time stays nearly flat in depth."""
from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bstc
from bstc import zoo
from bstc.lower import Scanned, count_params, lower, plan_stages
from conftest import tiny_overrides, zoo_params


def _tokens(m, batch=2, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, m.dims.seq_len), 0, m.dims.vocab)


# Every kind, and every context source in each context variant, has its parameter count and
# causality checked by itself in test_contract; the default suite lowers the representative
# pair and the own-window context (which test_contract's cases lack), `pytest -m slow` the rest.
@pytest.mark.parametrize("path", zoo_params(("bst_sh_s4.bst", "transformer.bst", "bst_sh_own_s4.bst")))
def test_zoo_param_count_matches_explain_and_causal(path):
    """The lowered model's parameters are explain's count; and causality: changing token t
    leaves logits < t unchanged and changes some logit ≥ t. One test per zoo file, so that
    each model is lowered (seconds of eagerly dispatched initialisers) once for both checks."""
    m = bstc.parse(path, overrides=tiny_overrides(path))
    model = lower(m, key=jax.random.key(1))
    assert count_params(model) == bstc.explain(m).params
    fwd = eqx.filter_jit(model)
    toks = _tokens(m, batch=1)
    base = fwd(toks)
    scale = float(jnp.abs(base).max())
    L = m.dims.seq_len
    for t in (0, m.dims.window - 1, m.dims.window, L // 2 + 3, L - 1):
        pert = toks.at[0, t].set((toks[0, t] + 7) % m.dims.vocab)
        out = fwd(pert)
        if t > 0:
            before = float(jnp.abs(out[0, :t] - base[0, :t]).max())
            assert before <= 1e-4 * scale, f"position {t} leaked into earlier outputs ({before})"
        after = float(jnp.abs(out[0, t:] - base[0, t:]).max())
        assert after > 1e-6 * scale, f"perturbing token {t} changed nothing"


@pytest.mark.parametrize("path", zoo_params())
def test_zoo_gradient_step_reduces_loss(path):
    m = bstc.parse(path, overrides=tiny_overrides(path))
    model = lower(m, key=jax.random.key(2))
    toks = _tokens(m, batch=2, seed=3)

    @eqx.filter_value_and_grad
    def loss_fn(model):
        logits = model(toks)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    opt = optax.adam(3e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        loss, g = loss_fn(model)
        upd, state = opt.update(g, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, upd), state, loss

    losses = []
    for _ in range(5):
        model, state, loss = step(model, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.05, losses


def test_a_short_run_is_planned_as_the_blocks_unrolled():
    """A unit repeated fewer than SCAN_MIN_COUNT times gets no stacked weights: the model is the
    unrolled one, leaf for leaf (test_lax_scan_equals_unrolled covers the scan itself)."""
    path = zoo.resolve("bst_sh_s4")
    m = bstc.parse(path, overrides=tiny_overrides(path, groups=2))
    a = lower(m, key=jax.random.key(4), scan=True)
    b = lower(m, key=jax.random.key(4), scan=False)
    assert not any(isinstance(s, Scanned) for s in a.stages) and len(a.stages) == len(m.layers)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plan_finds_repeating_units():
    path = zoo.resolve("bst_sh_s4")
    m = bstc.parse(path, overrides=tiny_overrides(path))
    # local; bst; local; local: the trailing pair repeats too few times to be scanned
    assert plan_stages(m.layers) == [("single", i, 1, 1) for i in range(4)]
    m = bstc.parse(path, overrides=tiny_overrides(path, groups=3))
    assert all(k == "single" for k, *_ in plan_stages(m.layers))
    m = bstc.parse(path, overrides=tiny_overrides(path, groups=5))
    assert plan_stages(m.layers) == [("scan", 0, 4, 5)]  # repeat 5 { local; bst; local; local }
    assert all(k == "single" for k, *_ in plan_stages(m.layers, scan=False))


DEPTH_MODEL = """
model deep {
  vocab = 64
  d_model = 32
  heads = 2
  window = 16
  seq_len = 64
  depth = 6
  block bst {
    ssm = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh)
    mlp = mlp(hidden: 64)
  }
  layers { embed; repeat depth { bst }; norm rms; head tied }
}
"""


def _compile_seconds(depth: int) -> float:
    model = bstc.load(DEPTH_MODEL, key=jax.random.key(0), overrides={"depth": depth})
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def forward(p, toks):
        return eqx.combine(p, static)(toks)

    toks = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    t0 = time.perf_counter()
    jax.jit(forward).lower(params, toks).compile()
    return time.perf_counter() - t0


def test_lax_scan_equals_unrolled():
    from bstc.lower import SCAN_MIN_COUNT

    m = bstc.parse(DEPTH_MODEL, overrides={"depth": SCAN_MIN_COUNT})
    a, b = (lower(m, key=jax.random.key(4), scan=s) for s in (True, False))
    assert isinstance(a.stages[0], Scanned) and a.stages[0].count == SCAN_MIN_COUNT
    toks = _tokens(m)
    forward = eqx.filter_jit(lambda model, t: model(t))
    np.testing.assert_allclose(np.asarray(forward(a, toks)), np.asarray(forward(b, toks)), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_compile_time_nearly_flat_in_depth():
    _compile_seconds(2)  # warm up tracing caches
    t6 = min(_compile_seconds(6) for _ in range(2))
    t24 = _compile_seconds(24)
    assert t24 < 1.5 * t6 + 0.5, (t6, t24)


def test_shared_blocks_hold_one_set_of_weights():
    text = DEPTH_MODEL.replace("repeat depth { bst }", "bst share g; bst share g; bst")
    m = bstc.parse(text)
    model = lower(m, key=jax.random.key(0))
    assert list(model.shared) == ["g"]
    assert count_params(model) == bstc.explain(m).params
    single = bstc.explain(DEPTH_MODEL, overrides={"depth": 2}).params
    assert count_params(model) == single  # two distinct blocks: the shared one and the last


def test_bf16_compute_f32_params():
    path = zoo.resolve("bst_sh_s4")
    m = bstc.parse(path, overrides=tiny_overrides(path, dtype="bfloat16"))
    model = lower(m, key=jax.random.key(0))
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert all(x.dtype == jnp.float32 for x in leaves)
    out = eqx.filter_jit(lambda model, t: model(t))(model, _tokens(m))
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
