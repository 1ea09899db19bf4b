"""The paper's baseline layer kinds: full, sliding-window and Transformer-XL attention, the
Block-Recurrent Transformer layer, and the Gated State Space layer.

Oracles: naive dense attention with an explicit L×L mask (written here, independent of
bstc.ops._attention); causality by perturbation; BRT's scan == a Python loop over blocks;
the XL memory carries no gradient (and does carry one when the stop-gradient is removed);
param_count == the built module's leaf count; flops_per_token == XLA's cost analysis.
"""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.ops import Dims, get

D, H, W, L, B = 32, 2, 16, 64, 2
DIMS = Dims(vocab=256, d_model=D, heads=H, window=W, seq_len=L)

CASES = {
    "full": ("full_attention", {}),
    "sliding": ("sliding_attention", {"window": W}),
    "xl": ("xl_attention", {"window": W}),
    "xl_m40": ("xl_attention", {"window": W, "memory": 40}),
    "brt_fixed_skip": ("brt", {"window": W}),
    "brt_fixed_mlp": ("brt", {"window": W, "state": 8, "skip": False, "hidden": 48}),
    "brt_lstm_mlp": ("brt", {"window": W, "state": 8, "gate": "lstm", "skip": False, "hidden": 48}),
    "gss": ("gss", {"state": 16}),
    "gss_e2": ("gss", {"state": 8, "expand": 2, "ssm_dim": 12}),
}


def full_args(kind: str, given: dict) -> dict:
    op = get(kind)
    out = {p.name: p.default for p in op.params if not p.required}
    out.update(given)
    return out


def build(case: str, key=0):
    kind, given = CASES[case]
    args = full_args(kind, given)
    op = get(kind)
    assert op.check(args, DIMS, None) == []
    return op, args, op.build(args, DIMS, None, key=jax.random.key(key))


def x_input(seed=1, shape=(B, L, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def naive_attention(q, k, v, mask):
    """q, k, v (B, T, H, dh); mask (T, T) bool — the L×L oracle."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def naive_rope(x, pos):
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-np.arange(half) / half)
    ang = np.asarray(pos)[:, None] * freq[None]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


# ---- contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_contract_and_causality(case):
    """param_count == leaf count; (B, L, D) out; perturbing token t leaves outputs < t unchanged."""
    op, args, m = build(case)
    leaves = jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
    assert op.param_count(args, DIMS, None) == sum(x.size for x in leaves)
    assert op.out_shape(args, DIMS) == ("B", L, D)
    f = jax.jit(lambda x: m(x))
    x = x_input()
    y0 = f(x)
    assert y0.shape == (B, L, D) and y0.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y0)))
    scale = float(jnp.max(jnp.abs(y0)))
    for t in (0, W - 1, W, 2 * W + 5, L - 1):
        y1 = f(x.at[:, t].add(3.0))
        if t > 0:
            assert float(jnp.max(jnp.abs(y1[:, :t] - y0[:, :t]))) <= 1e-4 * scale, f"position {t} leaks backwards"
        assert float(jnp.max(jnp.abs(y1[:, t] - y0[:, t]))) > 1e-3 * scale, f"position {t} does not see itself"


@pytest.mark.parametrize("case", ["full", "sliding", "xl", "brt_fixed_skip", "brt_lstm_mlp", "gss"])
def test_flops_match_xla_cost_analysis(case):
    op, args, m = build(case)
    if case.startswith("brt"):
        m = dataclasses.replace(m, unroll=True)  # XLA's cost analysis counts a loop body once
    cost = jax.jit(lambda x: m(x)).lower(x_input()).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mine = op.flops_per_token(args, DIMS, None) * B * L
    assert mine == pytest.approx(cost["flops"], rel=0.05)


@pytest.mark.parametrize("case", ["full", "sliding", "xl", "brt_fixed_skip"])
def test_dropout_only_with_a_key(case):
    kind, given = CASES[case]
    args = full_args(kind, {**given, "dropout": 0.5})
    m = get(kind).build(args, DIMS, None, key=jax.random.key(0))
    x = x_input()
    assert jnp.array_equal(m(x), m(x))
    assert not jnp.allclose(m(x), m(x, key=jax.random.key(3)))


# ---- attention oracles ------------------------------------------------------------------------------


def qkv_of(m, x):
    q, k, v = (x @ m.w_qkv[:, i] for i in range(3))  # stored (in, q|k|v, out)
    sh = lambda t: t.reshape(*t.shape[:-1], H, D // H)  # noqa: E731
    return sh(q), sh(k), sh(v)


def test_full_equals_dense_causal():
    _, _, m = build("full")
    x = x_input()
    q, k, v = qkv_of(m, x)
    pos = np.arange(L)
    q, k = naive_rope(q, pos), naive_rope(k, pos)
    ref = naive_attention(q, k, v, np.tril(np.ones((L, L), bool))).reshape(B, L, D) @ m.w_o
    np.testing.assert_allclose(m(x), ref, atol=2e-5, rtol=1e-4)


def test_sliding_equals_dense_with_band_mask():
    _, _, m = build("sliding")
    x = x_input()
    q, k, v = qkv_of(m, x)
    pos = np.arange(L)
    q, k = naive_rope(q, pos), naive_rope(k, pos)
    t, s = pos[:, None], pos[None, :]
    band = (s <= t) & (s >= (t // W - 1) * W)  # the previous block and the current one, causally
    ref = naive_attention(q, k, v, band).reshape(B, L, D) @ m.w_o
    np.testing.assert_allclose(m(x), ref, atol=2e-5, rtol=1e-4)
    # and the band really is W..2W wide: a query at the end of a block sees 2W keys
    assert band[2 * W - 1].sum() == 2 * W and band[2 * W].sum() == W + 1


def test_sliding_is_not_full():
    """Tokens more than 2W back are invisible (the baseline's limited context)."""
    _, _, m = build("sliding")
    x = x_input()
    y0, y1 = m(x), m(x.at[:, 0].add(5.0))
    assert jnp.allclose(y0[:, 2 * W:], y1[:, 2 * W:], atol=1e-6)
    assert not jnp.allclose(y0[:, W:2 * W], y1[:, W:2 * W], atol=1e-4)


@pytest.mark.parametrize("case", ["xl", "xl_m40"])
def test_xl_equals_dense_with_memory_band(case):
    from bstc.ops.xl_attention import t5_buckets

    _, _, m = build(case)
    m = eqx.tree_at(lambda m: m.rel_bias, m, jax.random.normal(jax.random.key(5), m.rel_bias.shape))
    x = x_input()
    M = m.memory
    q = (x @ m.w_q).reshape(B, L, H, -1)
    k, v = ((x @ m.w_kv[:, i]).reshape(B, L, H, -1) for i in range(2))
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    band = (s <= t) & (s >= (t // W) * W - M)  # the block so far + the M tokens before it
    bias = m.rel_bias[t5_buckets(t - s, 32, M + W - 1)]  # (L, L, H)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H) + jnp.transpose(bias, (2, 0, 1))
    p = jax.nn.softmax(jnp.where(band, logits, -jnp.inf), -1)
    ref = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, L, D) @ m.w_o
    np.testing.assert_allclose(m(x), ref, atol=2e-5, rtol=1e-4)


def test_xl_bias_starts_as_a_recency_prior():
    """The relative-position table starts as ALiBi's per-head slopes, not at zero (a zero table
    leaves the layer with no order beyond the causal mask): for every head the bias falls
    strictly with the bucket's distance, from 0 at distance 0, and head 0 falls fastest."""
    from bstc.ops.xl_attention import t5_buckets

    _, _, m = build("xl")
    table = np.asarray(m.rel_bias)  # (buckets, heads)
    used = sorted(set(np.asarray(t5_buckets(np.arange(2 * W), 32, 2 * W - 1)).tolist()))
    b = table[used]
    assert np.all(b[0] == 0) and np.all(np.diff(b, axis=0) < 0)
    assert np.all(b[-1, :-1] < b[-1, 1:])  # steeper slopes first


def test_xl_memory_carries_no_gradient():
    """Block k's outputs depend on block k−1's inputs only through the memory, and that path is
    stop-gradient: d out[block k] / d x[block k−1] is exactly zero, while the forward value does
    depend on it. Removing the stop-gradient (the contrast) makes the same gradient non-zero."""
    _, _, m = build("xl")  # memory = W: block k sees exactly block k−1 through the memory
    x = x_input()
    k = 2
    blk = slice(k * W, (k + 1) * W)
    prev = slice((k - 1) * W, k * W)

    def grad_prev(mod):
        g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(mod(x)[:, blk]))))(x)
        return g[:, prev]

    assert float(jnp.max(jnp.abs(grad_prev(m)))) == 0.0
    no_stop = dataclasses.replace(m, stop_memory_grad=False)
    assert np.allclose(no_stop(x), m(x))  # the same forward pass
    assert float(jnp.max(jnp.abs(grad_prev(no_stop)))) > 1e-3
    # the memory is used: perturbing block k−1 changes block k's output
    y1 = m(x.at[:, prev].add(1.0))
    assert float(jnp.max(jnp.abs(y1[:, blk] - m(x)[:, blk]))) > 1e-3
    # and the weights still learn through the memory path
    gw = jax.grad(lambda mod: jnp.sum(jnp.sin(mod(x)[:, blk])))(m)
    assert float(jnp.max(jnp.abs(gw.w_kv))) > 0.0


# ---- Block-Recurrent Transformer ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["brt_fixed_skip", "brt_fixed_mlp", "brt_lstm_mlp"])
def test_brt_scan_equals_unrolled_python_loop(case):
    _, _, m = build(case)
    x = x_input()
    scanned = jax.jit(lambda x: m(x))(x)
    unrolled = jax.jit(lambda x: m.call_unrolled(x))(x)  # a Python loop: block by block, each on its own
    np.testing.assert_allclose(scanned, unrolled, atol=2e-5, rtol=1e-4)
    mu = dataclasses.replace(m, unroll=True)
    np.testing.assert_allclose(jax.jit(lambda x: mu(x))(x), scanned, atol=2e-5, rtol=1e-4)


def test_brt_state_carries_information_beyond_the_window():
    """Unlike Slide, a token far back (more than 2W) still reaches later blocks via the state."""
    _, _, m = build("brt_fixed_skip")
    x = x_input()
    f = jax.jit(lambda x: m(x))
    y0, y1 = f(x), f(x.at[:, 0].add(5.0))
    assert float(jnp.max(jnp.abs(y0[:, 3 * W:] - y1[:, 3 * W:]))) > 1e-4


def test_brt_gradients_flow_through_the_scan():
    _, _, m = build("brt_lstm_mlp")
    x = x_input()
    g = eqx.filter_jit(eqx.filter_grad(lambda mod: jnp.sum(mod(x) ** 2)))(m)
    for leaf in (g.init_state, g.state_pos, g.gate.w_f, g.state_mlp.w1, g.s_qkvq):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_schema_errors():
    assert get("sliding_attention").check({"window": 24, "heads": 0}, DIMS, None)[0].arg == "window"
    assert get("full_attention").check({"heads": 3}, DIMS, None)
    assert get("brt").check(full_args("brt", {"window": 10}), DIMS, None)
    assert get("xl_attention").check(full_args("xl_attention", {"window": W, "memory": 1000}), DIMS, None)


# ---- Gated State Space ------------------------------------------------------------------------------


def test_gss_equals_direct_convolution_reference():
    from bstc.ops import _ssm

    _, _, m = build("gss")
    x = x_input()
    v = jax.nn.gelu(x @ m.w_v + m.b_v)
    u = jax.nn.gelu(x @ m.w_u + m.b_u)
    k = _ssm.s4d_kernel_vandermonde(m.log_dt, m.log_A_re, m.A_im, m.C, L)[0]
    y = _ssm.causal_direct_conv(u, k) + m.D * u
    ref = ((y @ m.w_uc + m.b_uc) * v) @ m.w_o + m.b_o
    np.testing.assert_allclose(jax.jit(lambda x: m(x))(x), ref, atol=1e-4, rtol=1e-3)


def test_gss_reaches_the_whole_prefix():
    _, _, m = build("gss")
    f = jax.jit(lambda x: m(x))
    x = x_input()
    assert float(jnp.max(jnp.abs(f(x)[:, -1] - f(x.at[:, 0].add(5.0))[:, -1]))) > 1e-5


@pytest.mark.parametrize("case", ["brt_fixed_mlp", "gss", "xl"])
def test_no_array_is_shared_between_leaves(case):
    """Every parameter leaf is its own buffer: a training step donates them all."""
    _, _, m = build(case)
    leaves = jax.tree.leaves(eqx.filter(m, eqx.is_array))
    assert len({id(x) for x in leaves}) == len(leaves)


@pytest.mark.parametrize("case", ["full", "xl", "brt_lstm_mlp", "gss"])
def test_logical_axes_by_name(case):
    """One logical name (or None) per array dimension; names from the parameter's role, not its size."""
    op, args, m = build(case)
    axes = jax.tree.leaves(op.logical_axes(args, DIMS, None, m), is_leaf=lambda t: isinstance(t, tuple))
    arrays = jax.tree.leaves(eqx.filter(m, eqx.is_array))
    assert len(axes) == len(arrays) and all(len(a) == x.ndim for a, x in zip(axes, arrays))
    named = {n for a in axes for n in a if n}
    assert named <= {"embed", "mlp", "heads", "ssm_state"} and "embed" in named
    by_field = dict(zip([jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_flatten_with_path(eqx.filter(m, eqx.is_array))[0]], axes))
    # Fused projections keep each part's heads on the last axis: tensor parallelism splits every
    # part by heads (a flat (D, 3D) layout would split q|k|v between devices).
    for field in (".w_qkv", ".w_kv", ".w_qkvq", ".s_qkvq"):
        if field in by_field:
            assert by_field[field] == ("embed", None, "heads"), by_field
    if case != "gss":
        assert by_field[".w_o"][-2:] == ("heads", "embed"), by_field


@pytest.mark.parametrize("case", ["full", "sliding", "xl", "brt_lstm_mlp"])
def test_fused_projection_shards_by_heads(case):
    """A fused projection is stored (in, part, out) and part i of its output is x @ w[:, i],
    heads in order along the last axis: the layout the `heads` rule splits."""
    op, args, m = build(case)
    field = next(f for f in ("w_qkv", "w_kv", "w_qkvq") if hasattr(m, f))
    w = getattr(m, field)
    assert w.ndim == 3 and w.shape[0] == D and w.shape[2] == D
    x = x_input()
    from bstc.ops._common import fused_heads

    parts = fused_heads(x, w, H)
    for i, t in enumerate(parts):  # part i is x @ w[:, i], heads on the last D axis in order
        np.testing.assert_allclose(t.reshape(*t.shape[:-2], D), x @ w[:, i], rtol=1e-5, atol=1e-5)
