"""Block attention and the attention numerics in bstc/ops/_attention.py, against oracles written
from the definitions: dense attention over an explicit L×L (or L×(contexts + L)) mask, context
sets for sh/mh/mf built independently, RoPE as a complex rotation, causality by perturbation."""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.lower import count_params
from bstc.ops import REGISTRY, ContextSpec, Dims
from bstc.ops import _attention as att

B, L, D, H, W = 2, 32, 16, 2, 8
DH, NB = D // H, L // W
DIMS = Dims(vocab=32, d_model=D, heads=H, window=W, seq_len=L)
OP = REGISTRY["block_attention"]


def args_of(**given):
    a = {p.name: p.default for p in OP.params if not p.required}
    a.update(window=W)
    a.update(given)
    return a


def rnd(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


# ---- attend / rope ------------------------------------------------------------------------------
def test_attend_equals_numpy_softmax():
    q, k, v = rnd(0, 3, 5, H, 4), rnd(1, 3, 7, H, 4), rnd(2, 3, 7, H, 4)
    mask = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.6, (H, 5, 7))) | np.eye(5, 7, dtype=bool)
    got = np.asarray(att.attend(q, k, v, jnp.asarray(mask)))
    qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(4)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", p, vn), rtol=1e-5, atol=1e-5)


def test_attend_softmax_runs_in_float32_for_bf16():
    q, k, v = (rnd(s, 1, 6, H, 4).astype(jnp.bfloat16) for s in range(3))
    jaxpr = jax.make_jaxpr(lambda q, k, v: att.attend(q, k, v, jnp.tril(jnp.ones((6, 6), bool))))(q, k, v)
    exps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "exp"]
    assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)
    assert att.attend(q, k, v, jnp.ones((6, 6), bool)).dtype == jnp.bfloat16


def test_rope_is_a_complex_rotation_and_relative():
    x = rnd(4, 1, 5, H, 6)
    pos = jnp.array([0, 1, 2, 7, 100])
    got = np.asarray(att.apply_rope(x, pos))
    xn = np.asarray(x)
    theta = 10000.0 ** (-np.arange(3) / 3)
    z = (xn[..., :3] + 1j * xn[..., 3:]) * np.exp(1j * np.asarray(pos)[:, None, None] * theta)
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
    q, k = rnd(5, 1, 4, H, 6), rnd(6, 1, 4, H, 6)
    s = lambda o: jnp.einsum("bqhd,bkhd->bhqk", att.apply_rope(q, jnp.arange(4) + o), att.apply_rope(k, jnp.arange(4) + o))  # noqa: E731
    np.testing.assert_allclose(np.asarray(s(0)), np.asarray(s(13)), rtol=1e-4, atol=1e-4)


# ---- blockwise == dense -----------------------------------------------------------------------
def block_causal_mask(L, W):
    """From the definition: t sees s iff s ≤ t and both are in the same block."""
    return np.array([[s <= t and s // W == t // W for s in range(L)] for t in range(L)])


@pytest.mark.parametrize("window", [4, 8, 32])
def test_blockwise_equals_dense_without_context(window):
    q, k, v = rnd(7, B, L, H, DH), rnd(8, B, L, H, DH), rnd(9, B, L, H, DH)
    got = np.asarray(att.blockwise_attention(q, k, v, window))
    ref = np.asarray(att.dense_attention(q, k, v, jnp.asarray(block_causal_mask(L, window))))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def dense_with_contexts(q, k, v, ck, cv, window):
    """One dense problem: keys = [every block's S context vectors; all L tokens]; query t sees
    the context of its own block and the block-causal tokens."""
    Bq, Lq = q.shape[:2]
    nb, S = ck.shape[1], ck.shape[2]
    keys = jnp.concatenate([ck.reshape(Bq, nb * S, *ck.shape[3:]), k], axis=1)
    vals = jnp.concatenate([cv.reshape(Bq, nb * S, *cv.shape[3:]), v], axis=1)
    ctx_mask = np.array([[j // S == t // window for j in range(nb * S)] for t in range(Lq)])
    mask = np.concatenate([ctx_mask, block_causal_mask(Lq, window)], axis=1)
    return att.dense_attention(q, keys, vals, jnp.asarray(mask))


@pytest.mark.parametrize("S", [1, 3, 8])
def test_blockwise_equals_dense_with_context(S):
    q, k, v = rnd(10, B, L, H, DH), rnd(11, B, L, H, DH), rnd(12, B, L, H, DH)
    ck, cv = rnd(13, B, NB, S, H, DH), rnd(14, B, NB, S, H, DH)
    got = np.asarray(att.blockwise_attention(q, k, v, W, ck, cv))
    np.testing.assert_allclose(got, np.asarray(dense_with_contexts(q, k, v, ck, cv, W)), rtol=1e-5, atol=1e-5)


def dense_with_causal_contexts(q, k, v, ck, cv, window):
    """One dense problem for a context aligned with the positions (ck: (B, L, H, dh), one vector
    per position): keys = [the L context vectors; the L tokens]; query t sees context vector s
    and token s alike, iff s ≤ t and both are in the same block."""
    mask = block_causal_mask(q.shape[1], window)
    return att.dense_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1),
                               jnp.asarray(np.concatenate([mask, mask], axis=1)))


@pytest.mark.parametrize("window", [1, 4, 8])
def test_blockwise_with_causal_context_equals_dense(window):
    q, k, v = rnd(30, B, L, H, DH), rnd(31, B, L, H, DH), rnd(32, B, L, H, DH)
    ck, cv = rnd(33, B, L, H, DH), rnd(34, B, L, H, DH)
    nb = L // window
    got = att.blockwise_attention(q, k, v, window, ck.reshape(B, nb, window, H, DH), cv.reshape(B, nb, window, H, DH),
                                  causal_context=True)
    ref = dense_with_causal_contexts(q, k, v, ck, cv, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_causal_context_needs_one_slot_per_position():
    assert np.array_equal(np.asarray(att.block_mask(3, 3, causal_context=True)),
                          np.array([[1, 0, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool))
    with pytest.raises(ValueError, match="one slot per position"):
        att.block_mask(4, 3, causal_context=True)


# ---- the block_attention layer, every context variant --------------------------------------------
def expected_contexts(variant, y, layer):
    """Context vectors per block, from the definitions; returns (B, NB, S, [H,] D) in numpy."""
    y = np.asarray(y)
    first = np.zeros_like(y[:, :W, 0] if variant == "mf" else y[:, :W]) if layer.ctx_first is None else None
    out = []
    for kb in range(NB):
        if variant in ("sh", "mh"):  # block k−1's outputs (all filters for mh: head h takes filter h)
            if kb > 0:
                c = y[:, (kb - 1) * W:kb * W]
            elif first is not None:
                c = first
            else:
                f = np.asarray(layer.ctx_first)  # (W, D): for mh the same vectors for every head
                c = np.broadcast_to(f if variant == "sh" else f[:, None], y[:, :W].shape)
        else:  # mf: each filter's output at the last position before the block, plus context IDs
            S = y.shape[2]
            if kb > 0:
                c = y[:, kb * W - 1]
            elif layer.ctx_first is None:
                c = np.zeros((y.shape[0], S, D), np.float32)
            else:
                c = np.broadcast_to(np.asarray(layer.ctx_first), (y.shape[0], S, D))
            c = c + np.asarray(layer.ctx_ids)
        out.append(c)
    return np.stack(out, axis=1)


def reference_layer(layer, x, y, variant, rope):
    proj = lambda t, w: (t @ w).reshape(*t.shape[:-1], H, DH)  # noqa: E731
    q, k, v = proj(x, layer.wq), proj(x, layer.wk), proj(x, layer.wv)
    if rope:  # positions within the block
        pos = jnp.asarray(np.arange(L) % W)
        q, k = att.apply_rope(q, pos), att.apply_rope(k, pos)
    if variant is None:
        o = att.dense_attention(q, k, v, jnp.asarray(block_causal_mask(L, W)))
    else:
        c = jnp.asarray(expected_contexts(variant, y, layer))
        if variant == "mh":  # head h: filter h's states through the K/V projections, head h's slice
            ck = jnp.stack([proj(c[:, :, :, h], layer.wk)[..., h, :] for h in range(H)], axis=3)
            cv = jnp.stack([proj(c[:, :, :, h], layer.wv)[..., h, :] for h in range(H)], axis=3)
        else:
            ck, cv = proj(c, layer.wk), proj(c, layer.wv)
        o = dense_with_contexts(q, k, v, ck, cv, W)
    return o.reshape(B, L, D) @ layer.wo


VARIANTS = [(None, 1), ("sh", 1), ("mh", H), ("mf", 3), ("mf", 5)]


def context_input(variant, filters, seed=20):
    if variant is None:
        return None
    return rnd(seed, B, L, D) if filters == 1 else rnd(seed, B, L, filters, D)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("first", ["learned", "zero"])
@pytest.mark.parametrize("variant,filters", VARIANTS)
def test_block_attention_equals_dense_reference(variant, filters, first, rope):
    if variant is None and first == "zero":
        pytest.skip("no context: first_context does not apply")
    ctx = ContextSpec(variant, filters) if variant else None
    layer = OP.build(args_of(rope=rope, first_context=first), DIMS, ctx, key=jax.random.key(1))
    x, y = rnd(19, B, L, D), context_input(variant, filters)
    got = np.asarray(jax.jit(lambda x, y: layer(x, context=y))(x, y))
    ref = np.asarray(reference_layer(layer, x, y, variant, rope))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("variant,filters", VARIANTS)
def test_block_attention_is_causal(variant, filters):
    ctx = ContextSpec(variant, filters) if variant else None
    layer = OP.build(args_of(), DIMS, ctx, key=jax.random.key(2))
    f = jax.jit(lambda x, y: layer(x, context=y))
    x, y = rnd(21, 1, L, D), context_input(variant, filters)
    y = None if y is None else y[:1]
    base = f(x, y)
    scale = float(jnp.abs(base).max())
    for t in (0, 5, W - 1, W, L - 1):
        out = f(x.at[0, t].add(1.0), None if y is None else y.at[0, t].add(1.0))
        assert float(jnp.abs(out[0, :t] - base[0, :t]).max(initial=0.0)) <= 1e-4 * scale, t
        assert float(jnp.abs(out[0, t:] - base[0, t:]).max()) > 1e-3 * scale, t
        if y is not None and t < L - W:  # the context only reaches later blocks
            only_ctx = f(x, y.at[0, t].add(1.0))
            end = (t // W + 1) * W
            assert float(jnp.abs(only_ctx[0, :end] - base[0, :end]).max()) <= 1e-4 * scale, t
            seen = variant != "mf" or t % W == W - 1  # mf reads only the last position of each block
            assert (float(jnp.abs(only_ctx[0, end:] - base[0, end:]).max()) > 0) == seen, t


def test_learned_first_context_reaches_block_zero_only():
    layer = OP.build(args_of(), DIMS, ContextSpec("sh", 1), key=jax.random.key(3))
    x, y = rnd(22, 1, L, D), rnd(23, 1, L, D)
    other = eqx.tree_at(lambda m: m.ctx_first, layer, layer.ctx_first + 1.0)
    a, b = layer(x, context=y), other(x, context=y)
    assert float(jnp.abs(a[0, :W] - b[0, :W]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(a[0, W:]), np.asarray(b[0, W:]))


# ---- `context_block: own`: block k's context is the source over block k itself, seen causally ------
OWN_VARIANTS = [("sh", 1), ("mh", H)]


def reference_own_layer(layer, x, y, variant, rope):
    """From the definition: the context vector of position s is the source output at s (for mh,
    head h: filter h through K/V, head h's slice); query t sees context vectors and tokens at
    positions s ≤ t of its own block. Contexts are not rotated."""
    proj = lambda t, w: (t @ w).reshape(*t.shape[:-1], H, DH)  # noqa: E731
    q, k, v = proj(x, layer.wq), proj(x, layer.wk), proj(x, layer.wv)
    if rope:
        pos = jnp.asarray(np.arange(L) % W)
        q, k = att.apply_rope(q, pos), att.apply_rope(k, pos)
    if variant == "mh":
        ck = jnp.stack([proj(y[:, :, h], layer.wk)[..., h, :] for h in range(H)], axis=2)
        cv = jnp.stack([proj(y[:, :, h], layer.wv)[..., h, :] for h in range(H)], axis=2)
    else:
        ck, cv = proj(y, layer.wk), proj(y, layer.wv)
    return dense_with_causal_contexts(q, k, v, ck, cv, W).reshape(B, L, D) @ layer.wo


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("first", ["learned", "zero"])
@pytest.mark.parametrize("variant,filters", OWN_VARIANTS)
def test_own_context_equals_dense_reference(variant, filters, first, rope):
    ctx = ContextSpec(variant, filters)
    layer = OP.build(args_of(rope=rope, first_context=first, context_block="own"), DIMS, ctx, key=jax.random.key(1))
    assert layer.ctx_first is None  # block 0 has its own window: first_context does not apply
    x, y = rnd(19, B, L, D), context_input(variant, filters)
    got = np.asarray(jax.jit(lambda x, y: layer(x, context=y))(x, y))
    ref = np.asarray(reference_own_layer(layer, x, y, variant, rope))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # ...and it is not the previous-block layer with the same weights
    prev = dataclasses.replace(layer, context_block="previous", ctx_first=jnp.zeros((W, D)))
    assert np.abs(np.asarray(prev(x, context=y)) - got).max() > 1e-3 * np.abs(got).max()


@pytest.mark.parametrize("variant,filters", OWN_VARIANTS)
def test_own_context_is_causal_and_stays_in_its_block(variant, filters):
    layer = OP.build(args_of(context_block="own"), DIMS, ContextSpec(variant, filters), key=jax.random.key(2))
    f = jax.jit(lambda x, y: layer(x, context=y))
    x, y = rnd(21, 1, L, D), context_input(variant, filters)[:1]
    base = f(x, y)
    scale = float(jnp.abs(base).max())
    diff = lambda a, lo, hi: float(jnp.abs(a[0, lo:hi] - base[0, lo:hi]).max(initial=0.0))  # noqa: E731
    for t in (0, 5, W - 1, W, W + 3, L - 1):
        end = (t // W + 1) * W
        both = f(x.at[0, t].add(1.0), y.at[0, t].add(1.0))
        assert diff(both, 0, t) <= 1e-4 * scale and diff(both, t, L) > 1e-3 * scale, t
        # the source output at t is the context of position t: it reaches queries t..end of its
        # own block and nothing else (later blocks have their own windows)
        only_ctx = f(x, y.at[0, t].add(1.0))
        assert diff(only_ctx, 0, t) <= 1e-4 * scale, t
        assert float(jnp.abs(only_ctx[0, t] - base[0, t]).max()) > 1e-3 * scale, t
        assert diff(only_ctx, end, L) == 0.0, t


def test_own_context_needs_an_sh_or_mh_edge():
    own = args_of(context_block="own")
    assert OP.check(own, DIMS, ContextSpec("sh", 1)) == [] and OP.check(own, DIMS, ContextSpec("mh", H)) == []
    p = OP.check(own, DIMS, None)
    assert [x.arg for x in p] == ["context_block"] and "context edge" in p[0].message and "-> sh" in p[0].hint
    p = OP.check(own, DIMS, ContextSpec("mf", 3))
    assert [x.arg for x in p] == ["context_block"] and "'mf'" in p[0].message and "-> sh" in p[0].hint


def test_own_context_with_mf_is_a_located_error():
    import bstc
    from bstc.errors import BstcError

    text = """model m {
  vocab = 256; d_model = 32; heads = 2; window = 8; seq_len = 32
  block b {
    ssm  = s4d(state: 8, filters: 3)
    attn = block_attention(window: window, context: ssm -> mf, context_block: own)
  }
  layers { embed; b; head tied }
}
"""
    with pytest.raises(BstcError) as e:
        bstc.parse(text)
    (d,) = e.value.diagnostics
    assert "'mf'" in d.message and d.span is not None and d.span.line == 5
    assert text.splitlines()[4][d.span.col - 1:].startswith("context_block")


# ---- checks, counts, dtypes, determinism ------------------------------------------------------------
def test_checks_name_the_offending_argument():
    assert OP.check(args_of(), DIMS, None) == []
    p = OP.check(args_of(window=5), DIMS, None)
    assert [x.arg for x in p] == ["window"] and "not divisible by window (5)" in p[0].message
    p = OP.check(args_of(heads=3), DIMS, None)
    assert [x.arg for x in p] == ["heads"] and "heads (3)" in p[0].message
    for variant, filters, hint in (("sh", 4, "filters: 1"), ("mh", 3, f"filters: {H}"), ("mf", 1, "filters:")):
        p = OP.check(args_of(), DIMS, ContextSpec(variant, filters))
        assert len(p) == 1 and p[0].arg in (None, "context"), (variant, p)
        assert f"'{variant}'" in p[0].message and str(filters) in p[0].message and hint in p[0].hint
    assert OP.check(args_of(), DIMS, ContextSpec("mh", H)) == []
    assert OP.check(args_of(heads=4), DIMS, ContextSpec("mh", 4)) == []


@pytest.mark.parametrize("given,ctx", [({}, None), ({"heads": 4}, ContextSpec("sh", 1)),
                                       ({"first_context": "zero"}, ContextSpec("sh", 1)), ({}, ContextSpec("mh", H)),
                                       ({}, ContextSpec("mf", 6)), ({"first_context": "zero"}, ContextSpec("mf", 6)),
                                       ({"context_block": "own"}, ContextSpec("sh", 1)),
                                       ({"context_block": "own"}, ContextSpec("mh", H))])
def test_param_count_is_exact(given, ctx):
    a = args_of(**given)
    for dims in (DIMS, Dims(vocab=8, d_model=24, heads=2, window=4, seq_len=16)):
        a2 = dict(a, window=dims.window)
        layer = OP.build(a2, dims, ctx, key=jax.random.key(0))
        assert count_params(layer) == OP.param_count(a2, dims, ctx)
        assert OP.flops_per_token(a2, dims, ctx) > 0
    if given.get("first_context") == "zero" or given.get("context_block") == "own":
        assert layer.ctx_first is None


def test_bf16_params_and_input_run():
    layer = OP.build(args_of(), DIMS, ContextSpec("mf", 3), key=jax.random.key(0))
    layer = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, layer)
    out = layer(rnd(0, 1, L, D).astype(jnp.bfloat16), context=rnd(1, 1, L, 3, D).astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_same_key_same_params_and_dropout_needs_a_key():
    a = OP.build(args_of(dropout=0.5), DIMS, ContextSpec("sh", 1), key=jax.random.key(7))
    b = OP.build(args_of(dropout=0.5), DIMS, ContextSpec("sh", 1), key=jax.random.key(7))
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    x, y = rnd(0, 1, L, D), rnd(1, 1, L, D)
    np.testing.assert_array_equal(np.asarray(a(x, context=y)), np.asarray(b(x, context=y)))
    assert not np.array_equal(np.asarray(a(x, context=y, key=jax.random.key(0))), np.asarray(a(x, context=y)))
