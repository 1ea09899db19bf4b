"""The mixture-of-experts layer against a per-token loop, its load-balancing loss, and the
auxiliary-loss channel from the layer through blocks, scanned stages and the trainer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc.ops import REGISTRY, Dims
from bstc.passes.report import op_args

DIMS = Dims(vocab=64, d_model=16, heads=2, window=8, seq_len=32)


def _layer(**kw):
    args = op_args("moe", {"hidden": 24, "experts": 4, "top_k": 2, **kw})
    return REGISTRY["moe"].build(args, DIMS, None, key=jax.random.key(0))


def _reference(m, x, act):
    """Every token through its top-k experts, one at a time, in numpy."""
    xt = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = xt @ np.asarray(m.router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(xt)
    k = m.top_k
    counts = np.zeros(probs.shape[1])
    for t in range(len(xt)):
        top = np.argsort(-probs[t], kind="stable")[:k]
        g = probs[t, top] / probs[t, top].sum()
        for e, ge in zip(top, g):
            counts[e] += 1
            h = xt[t] @ np.asarray(m.w_in[e], np.float64)
            if act == "swiglu":
                z = xt[t] @ np.asarray(m.w_gate[e], np.float64)
                h = z / (1 + np.exp(-z)) * h
            elif act == "relu":
                h = np.maximum(h, 0)
            else:
                h = np.asarray(jax.nn.gelu(jnp.asarray(h)), np.float64)
            out[t] += ge * (h @ np.asarray(m.w_out[e], np.float64))
    aux = m.aux_weight * probs.shape[1] * np.sum(counts / (len(xt) * k) * probs.mean(0))
    return out.reshape(x.shape), aux


@pytest.mark.parametrize("act, top_k", [("swiglu", 2), ("gelu", 1), ("relu", 4)])
def test_layer_equals_a_per_token_loop(act, top_k):
    m = _layer(act=act, top_k=top_k)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    y, aux = jax.jit(lambda x: m(x))(x)
    ref, ref_aux = _reference(m, x, act)
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-5, rtol=1e-4)
    assert float(aux) == pytest.approx(ref_aux, rel=1e-5)
    if top_k == 4:  # every expert for every token: balanced by construction, aux = aux_weight
        assert float(aux) == pytest.approx(m.aux_weight, rel=1e-5)


def test_the_balance_loss_trains_the_router():
    m = _layer()
    x = jax.random.normal(jax.random.key(2), (2, 16, 16))
    g = jax.grad(lambda r: m.__class__(r, m.w_in, m.w_gate, m.w_out, m.top_k, m.act, m.aux_weight)(x)[1])(m.router)
    assert float(jnp.abs(g).max()) > 0


MOE_MODEL = """model m {
  vocab = 64; d_model = 16; heads = 2; window = 8; seq_len = 32
  block b { attn = block_attention(window: window); moe = moe(hidden: 24, experts: 4, top_k: 2, aux_weight: 0.5) }
  layers { embed; repeat 2 { b }; b; norm rms; head tied }
}
"""


def test_aux_loss_is_summed_over_scanned_and_single_blocks():
    model = bstc.load(MOE_MODEL, key=jax.random.key(0))
    assert model.has_aux
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 64)
    logits, aux = model.with_aux(tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)))
    # the three blocks' own losses, one by one through the unrolled model
    unrolled = bstc.load(MOE_MODEL, key=jax.random.key(0), scan=False)
    x = unrolled.embed(tokens)
    want = 0.0
    for stage in unrolled.stages:
        x, a = stage.block.forward(x)
        want += float(a)
    assert float(aux) == pytest.approx(want, rel=1e-5) and want > 3 * 0.5 * 0.9


def test_the_trainer_optimises_and_logs_the_aux_loss(tmp_path):
    from bstc.runtime import RunConfig, train
    from bstc.runtime.metrics import read_metrics
    from bstc.runtime.model import spec_from_file

    f = tmp_path / "moe.bst"
    f.write_text(MOE_MODEL.replace("vocab = 64", "vocab = 256"))
    cfg = RunConfig(model=str(f), steps=4, batch=2, eval_every=0, ckpt_every=0, eval_batches=1)
    train(cfg, tmp_path / "run", spec_from_file(f, {}), progress=False, plot=False, tensorboard=False)
    recs = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "train"]
    assert len(recs) == 4 and all(r["aux_loss"] > 0 for r in recs)
    assert all(abs(r["loss"] - r["aux_loss"]) > 1e-3 for r in recs)  # the reported loss is the NLL


def test_a_moe_with_more_experts_than_top_k_is_checked():
    bad = MOE_MODEL.replace("top_k: 2", "top_k: 5")
    with pytest.raises(bstc.BstcError, match=r"top_k \(5\) is more than experts \(4\)"):
        bstc.parse(bad)
