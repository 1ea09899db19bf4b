"""Grouped-query / multi-query attention (`kv_heads`) in block, full, sliding and Transformer-XL
attention: every kind against a dense oracle written here, whose keys and values are computed
with kv_heads heads and repeated to the query heads with jnp.repeat (the layers never repeat
them: they attend per group); decoding through caches of kv_heads heads equals the forward
pass; parameter counts and FLOPs (vs XLA's cost analysis); checker errors; sharding plans in
which a tensor axis larger than kv_heads is fine."""
from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_sharded_equals_single_device

import bstc
from bstc import decode, shard_plan
from bstc.errors import BstcError
from bstc.lower import count_params
from bstc.ops import ContextSpec, Dims, get
from bstc.ops.xl_attention import t5_buckets

B, L, D, H, W = 2, 32, 32, 4, 8
DH, NB = D // H, L // W
DIMS = Dims(vocab=64, d_model=D, heads=H, window=W, seq_len=L)
KV = [1, 2, H]


def args_of(kind, **given):
    a = {p.name: p.default for p in get(kind).params if not p.required}
    a.update(given)
    return a


def rnd(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


# ---- the oracle: dense attention over explicit masks, K/V heads repeated ------------------------
def naive_attention(q, k, v, mask, bias=None):
    """q (B, Tq, H, dh); k, v (B, Tk, G, dh) repeated to H heads (head h reads K/V head h // (H/G));
    mask (Tq, Tk); bias (H, Tq, Tk) or None."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(jnp.asarray(mask), logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def naive_rope(x, pos):
    half = x.shape[-1] // 2
    ang = np.asarray(pos)[:, None] * 10000.0 ** (-np.arange(half) / half)[None]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def heads(t, n):
    return t.reshape(*t.shape[:-1], n, t.shape[-1] // n)


def qkv_of(m, x):
    """q with H heads, k and v with G heads, from either stored layout."""
    if getattr(m, "w_qkv", None) is not None:
        return heads(x @ m.w_qkv[:, 0], H), heads(x @ m.w_qkv[:, 1], H), heads(x @ m.w_qkv[:, 2], H)
    G = m.w_kv.shape[-1] // DH
    return heads(x @ m.w_q, H), heads(x @ m.w_kv[:, 0], G), heads(x @ m.w_kv[:, 1], G)


def build(kind, kv, ctx=None, seed=0, **given):
    extra = {"window": W} if kind != "full_attention" else {}
    a = args_of(kind, kv_heads=kv, **extra, **given)
    op = get(kind)
    assert op.check(a, DIMS, ctx) == []
    return op, a, op.build(a, DIMS, ctx, key=jax.random.key(seed))


@pytest.mark.parametrize("kv", KV)
def test_full_attention_equals_repeated_kv_oracle(kv):
    _, _, m = build("full_attention", kv)
    x = rnd(1, B, L, D)
    q, k, v = qkv_of(m, x)
    assert k.shape[2] == kv
    pos = np.arange(L)
    ref = naive_attention(naive_rope(q, pos), naive_rope(k, pos), v, np.tril(np.ones((L, L), bool)))
    np.testing.assert_allclose(m(x), ref.reshape(B, L, D) @ m.w_o, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv", KV)
def test_sliding_attention_equals_repeated_kv_oracle(kv):
    _, _, m = build("sliding_attention", kv)
    x = rnd(2, B, L, D)
    q, k, v = qkv_of(m, x)
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    band = (s <= t) & (s >= (t // W - 1) * W)
    pos = np.arange(L)
    ref = naive_attention(naive_rope(q, pos), naive_rope(k, pos), v, band)
    np.testing.assert_allclose(m(x), ref.reshape(B, L, D) @ m.w_o, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv", KV)
def test_xl_attention_equals_repeated_kv_oracle(kv):
    _, _, m = build("xl_attention", kv, memory=12)
    m = eqx.tree_at(lambda m: m.rel_bias, m, rnd(5, *m.rel_bias.shape))
    x = rnd(3, B, L, D)
    q, k, v = qkv_of(m, x)
    M = m.memory
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    band = (s <= t) & (s >= (t // W) * W - M)
    bias = jnp.transpose(m.rel_bias[t5_buckets(t - s, 32, M + W - 1)], (2, 0, 1))  # (H, L, L)
    ref = naive_attention(q, k, v, band, bias)
    np.testing.assert_allclose(m(x), ref.reshape(B, L, D) @ m.w_o, atol=2e-5, rtol=1e-4)


def block_oracle(m, x, y, variant, own):
    """Block attention from the definition: one dense problem whose keys are [every block's
    context; all tokens]; query t sees its own block's context (causally for an own-window
    context) and the earlier tokens of its block. RoPE within the block; contexts unrotated."""
    G = m.wk.shape[1] // DH
    q, k, v = heads(x @ m.wq, H), heads(x @ m.wk, G), heads(x @ m.wv, G)
    pos = np.arange(L) % W
    q, k = naive_rope(q, pos), naive_rope(k, pos)
    t, s = np.arange(L)[:, None], np.arange(L)[None, :]
    local = (s <= t) & (s // W == t // W)
    if variant is None:
        return naive_attention(q, k, v, local).reshape(B, L, D) @ m.wo
    if own:  # slot s holds the source output at s
        c, cmask = y, local
    elif variant == "sh":  # block k: the source over block k−1; block 0: the learned vectors
        c = jnp.concatenate([jnp.broadcast_to(m.ctx_first, (B, W, D)), y[:, :L - W]], axis=1)
        cmask = s // W == t // W
    else:  # mf: each filter's last output before the block (learned for block 0) + the IDs
        S = y.shape[2]
        last = [m.ctx_first[None].repeat(B, 0)] + [y[:, kb * W - 1] for kb in range(1, NB)]
        c = (jnp.stack(last, 1) + m.ctx_ids).reshape(B, NB * S, D)
        cmask = np.arange(NB * S)[None, :] // S == t // W
    ck, cv = heads(c @ m.wk, G), heads(c @ m.wv, G)
    mask = np.concatenate([np.broadcast_to(cmask, (L, ck.shape[1])), local], axis=1)
    o = naive_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask)
    return o.reshape(B, L, D) @ m.wo


BLOCK_CASES = [(None, 1, False), ("sh", 1, False), ("mf", 3, False), ("sh", 1, True)]


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("variant,filters,own", BLOCK_CASES, ids=["none", "sh", "mf", "sh-own"])
def test_block_attention_equals_repeated_kv_oracle(variant, filters, own, kv):
    ctx = ContextSpec(variant, filters) if variant else None
    extra = {"context_block": "own"} if own else {}
    _, _, m = build("block_attention", kv, ctx, seed=1, **extra)
    assert m.wk.shape == m.wv.shape == (D, kv * DH)
    x = rnd(4, B, L, D)
    y = None if variant is None else rnd(6, B, L, D) if filters == 1 else rnd(6, B, L, filters, D)
    got = jax.jit(lambda x, y: m(x, context=y))(x, y)
    ref = block_oracle(m, x, y, variant, own)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


# ---- layouts, default behaviour, costs -----------------------------------------------------------
KINDS = ["block_attention", "full_attention", "sliding_attention", "xl_attention"]


@pytest.mark.parametrize("kind", KINDS)
def test_default_and_kv_equal_heads_keep_the_layout(kind):
    """kv_heads: 0 and kv_heads = heads build the very same module as before (fused q|k|v where
    the kind had it); with fewer K/V heads only the K/V projections shrink."""
    _, _, a = build(kind, 0)
    _, _, b = build(kind, H)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, _, g = build(kind, 1)
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(g)}
    if kind == "block_attention":
        assert shapes[".wk"] == shapes[".wv"] == (D, DH) and shapes[".wq"] == (D, D)
    else:
        assert shapes[".w_kv"] == (D, 2, DH) and shapes[".w_q"] == (D, D) and ".w_qkv" not in shapes


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("kind", KINDS)
def test_param_count_is_exact(kind, kv):
    ctx = ContextSpec("sh", 1) if kind == "block_attention" else None
    op, a, m = build(kind, kv, ctx)
    assert count_params(m) == op.param_count(a, DIMS, ctx)
    base = get(kind).param_count(args_of(kind, window=W), DIMS, ctx)
    assert base - op.param_count(a, DIMS, ctx) == 2 * D * (D - kv * DH)  # K and V shrink, nothing else


@pytest.mark.parametrize("kind,ctx", [("block_attention", None), ("block_attention", ContextSpec("sh", 1)),
                                      ("full_attention", None), ("sliding_attention", None), ("xl_attention", None)])
def test_flops_match_xla_cost_analysis(kind, ctx):
    op, a, m = build(kind, 1, ctx, memory=12) if kind == "xl_attention" else build(kind, 1, ctx)
    x = rnd(7, B, L, D)
    y = rnd(8, B, L, D) if ctx else None
    cost = jax.jit(lambda x, y: m(x, context=y)).lower(x, y).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert op.flops_per_token(a, DIMS, ctx) * B * L == pytest.approx(cost["flops"], rel=0.05)


# ---- checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kv_heads_must_divide_heads(kind):
    op = get(kind)
    for kv in (3, 8):
        p = op.check(args_of(kind, window=W, kv_heads=kv), DIMS, None)
        assert [x.arg for x in p] == ["kv_heads"], p
        assert f"kv_heads ({kv}) does not divide heads ({H})" in p[0].message and "1, 2, 4" in p[0].hint


def test_kv_heads_errors_are_located():
    text = """model m {
  vocab = 64; d_model = 32; heads = 4; window = 8; seq_len = 32
  block b {
    ssm  = s4d(state: 8, filters: heads)
    attn = block_attention(window: window, context: ssm -> mh, kv_heads: 2)
    full = full_attention(kv_heads: 3)
  }
  layers { embed; b; head tied }
}
"""
    with pytest.raises(BstcError) as e:
        bstc.parse(text)
    d1, d2 = e.value.diagnostics
    lines = text.splitlines()
    assert "context variant 'mh'" in d1.message and "kv_heads (2) < heads (4)" in d1.message and "-> sh" in d1.hint
    assert d1.span.line == 5 and lines[4][d1.span.col - 1:].startswith("kv_heads: 2")
    assert "kv_heads (3) does not divide heads (4)" in d2.message
    assert d2.span.line == 6 and lines[5][d2.span.col - 1:].startswith("kv_heads: 3")
    # mh with one K/V head per head is still fine
    bstc.parse(text.replace(", kv_heads: 2)", ", kv_heads: 4)").replace("kv_heads: 3", "kv_heads: 1"))


# ---- decoding ------------------------------------------------------------------------------------
GQA_MODEL = """
model gqa {
  vocab = 64; d_model = 32; heads = 4; window = 8; seq_len = 32
  block local { attn = block_attention(window: window, kv_heads: 1); mlp = mlp(hidden: 48) }
  block bst {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh, kv_heads: 2)
  }
  block mf {
    ssm  = s4d(state: 8, filters: 3)
    attn = block_attention(window: window, context: ssm -> mf, kv_heads: 2, rope: false)
  }
  block own {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh, context_block: own, kv_heads: 1)
  }
  block full  { attn = full_attention(kv_heads: 1) }
  block slide { attn = sliding_attention(window: window, kv_heads: 2) }
  block xl    { attn = xl_attention(window: window, memory: 12, kv_heads: 2) }
  layers { embed; local; bst; mf; own; full; slide; xl; norm rms; head untied }
}
"""


def _random_relative_bias(model):
    from bstc.ops.xl_attention import XLAttention

    is_xl = lambda m: isinstance(m, XLAttention)  # noqa: E731
    return jax.tree.map(lambda m: eqx.tree_at(lambda x: x.rel_bias, m, rnd(9, *m.rel_bias.shape))
                        if is_xl(m) else m, model, is_leaf=is_xl)


@pytest.mark.slow
def test_decode_equals_forward_with_grouped_kv():
    """Every kind with kv_heads < heads decodes like the forward pass, past seq_len, and its
    caches hold kv_heads key/value heads (the memory saving)."""
    model = _random_relative_bias(bstc.load(GQA_MODEL, key=jax.random.key(0)))
    assert decode.decodable(model) == (True, "")
    caches = decode.init_caches(model, 2, 48)
    want = [1, 2, 2, 1, 1, 2, 2]  # kv_heads of local, bst, mf, own, full, slide, xl
    got = []
    for stage_cache in caches:
        (_, attn_cache), = [c for c in stage_cache if isinstance(c[1], dict) and "k" in c[1]]
        got.append(attn_cache["k"].shape[-2])
        assert attn_cache["k"].shape[-1] == DH
        for name in ("ck", "cv"):
            if name in attn_cache:
                assert attn_cache[name].shape[-2] == attn_cache["k"].shape[-2]
    assert got == want
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, 64)
    ref = np.asarray(model(tokens))
    out = np.asarray(decode.decode_logits(model, tokens))
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


# ---- sharding ------------------------------------------------------------------------------------
def test_tensor_axis_larger_than_kv_heads_is_planned():
    """heads 4 over tensor=4 with one K/V head: the K/V projections are replicated over the
    tensor axis (their width kv_heads·dh is not split), q and the output map split by heads."""
    m = bstc.parse(GQA_MODEL)
    p = shard_plan.plan(m, "data=2,tensor=4", n_devices=8, batch=8)
    rows = {r.name: r for r in p.rows}
    for name, r in rows.items():
        field = name.rsplit(".", 1)[-1]
        if ".attn." not in name:
            continue
        if field in ("wk", "wv", "w_kv"):
            assert "tensor" not in str(r.spec) and r.logical[-1] is None, r
        if field in ("wq", "w_q"):
            assert r.logical[-1] == "heads" and "tensor" in str(r.spec), r
        if field in ("wo", "w_o"):
            assert r.logical[-2] == "heads" and "tensor" in str(r.spec), r
    # without grouping, K/V split by heads as before
    plain = bstc.parse(re.sub(r"(, )?kv_heads: \d", "", GQA_MODEL))
    rows = {r.name: r for r in shard_plan.plan(plain, "data=2,tensor=4", n_devices=8, batch=8).rows}
    assert all("tensor" in str(r.spec) for n, r in rows.items() if n.rsplit(".", 1)[-1] in ("wk", "wv", "w_qkv", "w_kv"))


def test_grouped_attention_sharded_equals_single_device(tmp_path):
    """Tensor parallelism over more devices than K/V heads (block, full and Transformer-XL
    attention; the context path is the same projection): loss, gradients and 3 steps equal one
    device's."""
    from test_shard import SHARDED, _subprocess

    text = """model g {
  vocab = 64; d_model = 32; heads = 4; window = 8; seq_len = 32
  block local { attn = block_attention(window: window, kv_heads: 1) }
  block full  { attn = full_attention(kv_heads: 2) }
  block xl    { attn = xl_attention(window: window, memory: 8, kv_heads: 1) }
  layers { embed; local; full; xl; norm rms; head untied }
}
"""
    path = tmp_path / "g.bst"
    path.write_text(text)
    mesh_txt = "data=2,tensor=4"
    res = _subprocess(SHARDED, tmp_path, path, mesh_txt)
    assert_sharded_equals_single_device(res, mesh_txt)
