"""Block attention fed by several context sources (`context: [ssm -> mf, mam -> sh]`).

The attention's context keys and values are every edge's projected set side by side, each set
with its own variant rules: checked against a dense oracle built here in plain jax, for causality
by perturbation, decoding == the forward pass, explain == the built parameters, cost == XLA's,
sharded == one device, a YAML twin with the same logits, and the IR of one edge unchanged."""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_causal, assert_sharded_equals_single_device

import bstc
from bstc import decode, ir, params
from bstc.errors import BstcError
from bstc.lower import count_params
from bstc.ops import REGISTRY
from bstc.ops._attention import apply_rope
from bstc.ops.base import ROLES, ContextSpec, Dims

B, D, H, W, L, V = 2, 32, 2, 8, 32, 64
DH = D // H

# An S4D read at block ends (mf, S = 4) and a Mamba-2 layer read at every position (sh): neither
# has an FFT, so XLA's cost analysis can check the cost rule.
TWO = """model two {
  vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
  block bst(c1 = mf, c2 = sh) {
    ssm  = s4d(state: 8, filters: 4)
    mam  = mamba(state: 8, head_dim: 16)
    attn = block_attention(window: window, context: [ssm -> c1, mam -> c2])
    mlp  = mlp(hidden: 64)
  }
  layers { embed; bst; bst; norm rms; head untied }
}
"""

TWO_YAML = """model: two
params: {vocab: 64, d_model: 32, heads: 2, window: 8, seq_len: 32}
blocks:
  bst:
    params: {c1: mf, c2: sh}
    layers:
      ssm: {kind: s4d, state: 8, filters: 4}
      mam: {kind: mamba, state: 8, head_dim: 16}
      attn: {kind: block_attention, window: window, context: [ssm -> c1, mam -> c2]}
      mlp: {kind: mlp, hidden: 64}
layers: [embed, bst, bst, {norm: rms}, {head: untied}]
"""

# Both sets own-window (sh and mh): the causal mask on both sets' slots.
OWN = """model own {
  vocab = 64; d_model = 32; heads = 2; window = 8; seq_len = 32
  block bst {
    ssm  = s4d(state: 8)
    conv = long_conv(filters: 2)
    attn = block_attention(window: window, context_block: own, context: [ssm -> sh, conv -> mh])
  }
  layers { embed; bst; bst; head tied }
}
"""


@pytest.fixture(scope="module")
def two():
    return bstc.parse(TWO), bstc.load(TWO, key=jax.random.key(0))


# ---- the language ------------------------------------------------------------------------------
def test_list_of_edges_reaches_the_ir_in_order():
    m = bstc.parse(TWO)
    attn = m.layers[0].sublayers[2]
    assert [(e.source, e.variant, e.filters) for e in attn.edges] == [("ssm", "mf", 4), ("mam", "sh", 1)]
    assert "context: [ssm -> mf, mam -> sh]" in ir.dump(m)


def test_one_edge_in_a_list_is_the_edge_alone():
    one = (TWO.replace("[ssm -> c1, mam -> c2]", "ssm -> c1").replace("    mam  = mamba(state: 8, head_dim: 16)\n", "")
           .replace("(c1 = mf, c2 = sh)", "(c1 = mf)"))
    listed = one.replace("ssm -> c1", "[ssm -> c1]")
    dropped = TWO.replace("bst; bst;", "bst(c2 = none); bst(c2 = none);")  # mam -> none: dropped
    a = bstc.parse(one)
    assert isinstance(a.layers[0].sublayers[1].context, ir.Edge)
    assert bstc.parse(listed) == a
    assert bstc.parse(dropped) == a


@pytest.mark.parametrize("text", [TWO, OWN, TWO.replace("bst; bst;", "bst; bst(c2 = none);")])
def test_to_bst_round_trips(text):
    m = bstc.parse(text)
    assert bstc.parse(ir.to_bst(m)) == m


def test_yaml_twin_gives_equal_ir_and_logits(tmp_path, two):
    m, model = two
    (tmp_path / "two.yaml").write_text(TWO_YAML)
    assert bstc.parse(str(tmp_path / "two.yaml")) == m
    twin = bstc.load(str(tmp_path / "two.yaml"), key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V)
    forward = eqx.filter_jit(lambda mod, t: mod(t))  # one compilation serves both: same structure
    np.testing.assert_array_equal(np.asarray(forward(twin, tokens)), np.asarray(forward(model, tokens)))


def _errors(text: str) -> list[str]:
    with pytest.raises(BstcError) as e:
        bstc.parse(text)
    return [f"{d.span.line}:{d.span.col} {d.message}" for d in e.value.diagnostics]


def test_every_edge_is_checked_and_all_errors_are_reported():
    text = TWO.replace("[ssm -> c1, mam -> c2]", "[mam -> mh, ssm -> c2, mlp -> c1]")
    assert _errors(text) == [
        "6:54 context variant 'mh' needs one source filter per head (2), but the source has 1",
        "6:65 context variant 'sh' needs a source with 1 filter, but it has 4",
        "6:76 context source 'mlp' is defined after 'attn' in block 'bst'",
    ]


def test_a_source_in_another_block_is_refused_with_what_to_write():
    text = TWO.replace("[ssm -> c1, mam -> c2]", "[ssm -> c1, other.mam -> c2]")
    with pytest.raises(BstcError) as e:
        bstc.parse(text)
    (d,) = e.value.diagnostics
    assert (d.span.line, d.span.col, d.message) == (6, 70, "a context source must be a sublayer of this block, not 'block.sublayer'")
    assert "a block's sublayers are local to it" in d.hint
    assert "define the SSM in this block" in d.hint and "`residual: true`" in d.hint


# ---- the op against a dense oracle -------------------------------------------------------------
def _layer(specs, context_block="previous"):
    dims = Dims(vocab=V, d_model=D, heads=H, window=W, seq_len=L)
    op = REGISTRY["block_attention"]
    args = {p.name: p.default for p in op.params if not p.required} | {"window": W, "context_block": context_block}
    return op.build(args, dims, specs, key=jax.random.key(3))


def _oracle(layer, x, sets, ys):
    """Dense attention of every query over [its block's tokens; each set's slots], each set's
    slots and mask written out here: sh (block k−1, or the learned first context), mf (each
    filter's output at kW − 1, plus IDs) and sh own-window (the block's own outputs, causal)."""
    wq, wk, wv, wo = (np.asarray(w, np.float64) for w in (layer.wq, layer.wk, layer.wv, layer.wo))
    x = np.asarray(x, np.float64)
    pos = jnp.arange(L) % W
    q = np.asarray(apply_rope(jnp.asarray((x @ wq).reshape(B, L, H, DH), jnp.float32), pos), np.float64)
    k = np.asarray(apply_rope(jnp.asarray((x @ wk).reshape(B, L, H, DH), jnp.float32), pos), np.float64)
    v = (x @ wv).reshape(B, L, H, DH)
    out = np.zeros((B, L, H, DH))
    for b in range(B):
        for t in range(L):
            kb, i = divmod(t, W)
            keys, vals = [], []
            for cs, y in zip(sets, ys):
                y = np.asarray(y, np.float64)
                if cs.context_block == "own":  # slots kW … t: the block's own outputs so far
                    c = y[b, kb * W:t + 1]
                elif cs.variant == "sh":
                    c = np.asarray(cs.ctx_first) if kb == 0 else y[b, (kb - 1) * W:kb * W]
                else:  # mf
                    c = (np.asarray(cs.ctx_first) if kb == 0 else y[b, kb * W - 1]) + np.asarray(cs.ctx_ids)
                keys.append((c @ wk).reshape(-1, H, DH))
                vals.append((c @ wv).reshape(-1, H, DH))
            keys.append(k[b, kb * W:t + 1])
            vals.append(v[b, kb * W:t + 1])
            kk, vv = np.concatenate(keys), np.concatenate(vals)
            logits = np.einsum("hd,khd->hk", q[b, t], kk) / np.sqrt(DH)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, t] = np.einsum("hk,khd->hd", p / p.sum(-1, keepdims=True), vv)
    return out.reshape(B, L, D) @ wo


def test_two_sets_equal_the_dense_oracle():
    layer = _layer((ContextSpec("mf", 4), ContextSpec("sh", 1)))
    ks = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(ks[0], (B, L, D))
    ys = (jax.random.normal(ks[1], (B, L, 4, D)), jax.random.normal(ks[2], (B, L, D)))
    got = np.asarray(layer(x, context=ys))
    np.testing.assert_allclose(got, _oracle(layer, x, layer.context_sets(), ys), atol=2e-5, rtol=1e-4)


def test_the_own_window_mask_covers_only_the_sets_that_need_it():
    """One set own-window (sh), one not (mf): the causal mask on the first set's slots only.
    (The language gives one `context_block` to every edge; the layer holds one per set.)"""
    layer = _layer((ContextSpec("sh", 1), ContextSpec("mf", 4)))
    layer = dataclasses.replace(layer, context_block="own", ctx_first=None)
    assert [cs.own for cs in layer.context_sets()] == [True, False]
    ks = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(ks[0], (B, L, D))
    ys = (jax.random.normal(ks[1], (B, L, D)), jax.random.normal(ks[2], (B, L, 4, D)))
    got = np.asarray(layer(x, context=ys))
    np.testing.assert_allclose(got, _oracle(layer, x, layer.context_sets(), ys), atol=2e-5, rtol=1e-4)
    # decoding the same layer token by token, each set with its own cache
    cache = layer.init_cache(B, jnp.float32, L)
    assert len(cache["ctx"]) == 2 and "src" not in cache["ctx"][0] and "src" in cache["ctx"][1]
    step = jax.jit(lambda c, xt, t, y0, y1: layer.decode(c, xt, t, context=(y0, y1)))
    rows = []
    for t in range(L):
        cache, o = step(cache, x[:, t], jnp.int32(t), ys[0][:, t], ys[1][:, t])
        rows.append(np.asarray(o))
    np.testing.assert_allclose(np.stack(rows, 1), got, atol=1e-4 * np.abs(got).max(), rtol=0)


def test_a_one_edge_layer_keeps_its_fields_and_cache():
    layer = _layer(ContextSpec("sh", 1))
    assert layer.more_context is None and layer.ctx_first.shape == (W, D)
    assert set(layer.init_cache(B, jnp.float32)) == {"k", "v", "ck", "cv", "src"}


# ---- the model -------------------------------------------------------------------------------
def test_explain_counts_every_set(two):
    m, model = two
    assert count_params(model) == bstc.explain(m).params
    attn = model.stages[0].blocks(model.shared)[0].subs[2].op
    (more,) = attn.more_context  # the second edge's set: a learned (W, D) first context
    assert attn.ctx_first.shape[-2:] == (4, D) and attn.ctx_ids.shape[-2:] == (4, D)
    assert more.ctx_first.shape[-2:] == (W, D) and more.ctx_ids is None


def test_axes_and_roles_name_every_new_parameter(two):
    m, model = two
    names = jax.tree.leaves(params.param_names(m, model))
    axes = jax.tree.leaves(params.param_axes(m, model), is_leaf=params.is_names)
    roles = jax.tree.leaves(params.param_roles(eqx.filter(model, eqx.is_inexact_array)))
    assert len(names) == len(axes) == len(roles)
    more = [(a, r) for n, a, r in zip(names, axes, roles) if ".attn.more_context" in n]
    # the sh set's learned first context, once per layer (two single blocks: no layers axis)
    assert more == [((None, "embed"), ROLES["embedding"])] * 2


def test_causal_by_perturbation(two):
    _, model = two
    assert_causal(jax.jit(lambda t: model(t)), jax.random.randint(jax.random.key(1), (B, L), 0, V), V)


@pytest.mark.parametrize("text", [TWO, OWN], ids=["mf+sh", "own-sh+mh"])
def test_decode_equals_forward_past_seq_len(text):
    model = bstc.load(text, key=jax.random.key(0))
    assert decode.decodable(model) == (True, "")
    tokens = jax.random.randint(jax.random.key(2), (B, 2 * L), 0, V)
    ref = np.asarray(jax.jit(lambda t: model(t))(tokens))
    got = np.asarray(decode.decode_logits(model, tokens))
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_flops_within_ten_percent_of_xla(two):
    m, _ = two
    model = bstc.load(TWO, key=jax.random.key(0), scan=False)
    tokens = jnp.zeros((1, L), jnp.int32)
    arrays, static = eqx.partition(model, eqx.is_array)
    cost = jax.jit(lambda p, t: eqx.combine(p, static)(t)).lower(arrays, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert bstc.explain(m).flops_per_token * L == pytest.approx(cost["flops"], rel=0.10)


def test_cost_rule_adds_each_set():
    """Params and FLOPs of two sets = one layer's base cost plus each set's share."""
    op = REGISTRY["block_attention"]
    dims = Dims(vocab=V, d_model=D, heads=H, window=W, seq_len=L)
    args = {p.name: p.default for p in op.params if not p.required} | {"window": W}
    mf, sh = ContextSpec("mf", 4), ContextSpec("sh", 1)
    base_p, base_f = op.param_count(args, dims, None), op.flops_per_token(args, dims, None)
    both_p, both_f = op.param_count(args, dims, (mf, sh)), op.flops_per_token(args, dims, (mf, sh))
    assert both_p - base_p == (op.param_count(args, dims, mf) - base_p) + (op.param_count(args, dims, sh) - base_p)
    assert both_f - base_f == pytest.approx((op.flops_per_token(args, dims, mf) - base_f)
                                            + (op.flops_per_token(args, dims, sh) - base_f))


@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path):
    """Data and tensor parallel: loss, gradients and 3 steps equal one device's."""
    from test_shard import SHARDED, _subprocess

    path = tmp_path / "two.bst"
    path.write_text(TWO.replace("heads = 2", "heads = 4").replace("head_dim: 16", "head_dim: 8"))
    mesh_txt = "data=2,tensor=4"
    res = _subprocess(SHARDED, tmp_path, path, mesh_txt)
    assert_sharded_equals_single_device(res, mesh_txt)
