"""The `linear` layer kind: y = act(x W + b) against numpy, position-wise (causal, decodes like
the forward pass), exact parameter count, FLOPs vs XLA's cost analysis, axes and optimizer roles,
and the checker's located error for a residual linear whose width is not d_model."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc import decode
from bstc.errors import BstcError
from bstc.lower import count_params
from bstc.ops import Dims, get
from bstc.ops.base import named_roles

B, L, D = 2, 16, 24
DIMS = Dims(vocab=64, d_model=D, heads=2, window=8, seq_len=L)
OP = get("linear")
ACTS = ["none", "gelu", "silu", "relu", "tanh", "sigmoid"]


def args_of(**given):
    a = {p.name: p.default for p in OP.params if not p.required}
    a.update(given)
    return a


def numpy_act(name, y):
    if name == "gelu":  # the tanh form, as jax.nn.gelu computes it by default
        return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    return {"none": lambda y: y, "silu": lambda y: y / (1 + np.exp(-y)), "relu": lambda y: np.maximum(y, 0),
            "tanh": np.tanh, "sigmoid": lambda y: 1 / (1 + np.exp(-y))}[name](y)


@pytest.mark.parametrize("out", [0, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_equals_numpy(act, bias, out):
    a = args_of(act=act, bias=bias, out=out)
    m = OP.build(a, DIMS, None, key=jax.random.key(0))
    if bias:  # biases start at zero: make them matter
        m = eqx.tree_at(lambda m: m.b, m, jax.random.normal(jax.random.key(2), m.b.shape))
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    y = np.asarray(x, np.float64) @ np.asarray(m.w, np.float64)
    if bias:
        y = y + np.asarray(m.b, np.float64)
    O = out or D
    assert OP.out_shape(a, DIMS) == ("B", L, O) and m(x).shape == (B, L, O)
    np.testing.assert_allclose(np.asarray(m(x)), numpy_act(act, y), rtol=1e-5, atol=1e-5)
    assert count_params(m) == OP.param_count(a, DIMS, None) == D * O + (O if bias else 0)


def test_position_wise_hence_causal():
    m = OP.build(args_of(act="gelu", bias=True), DIMS, None, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, L, D))
    base = m(x)
    for t in (0, 7, L - 1):
        d = np.abs(np.asarray(m(x.at[0, t].add(1.0)) - base))[0].max(-1)
        assert d[t] > 1e-3 and np.all(np.delete(d, t) == 0.0), t


@pytest.mark.parametrize("act", ACTS)
def test_flops_match_xla_cost_analysis(act):
    a = args_of(act=act, bias=True, out=40)
    m = OP.build(a, DIMS, None, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    cost = jax.jit(lambda x: m(x)).lower(x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert OP.flops_per_token(a, DIMS, None) * B * L == pytest.approx(cost["flops"], rel=0.05)


def test_axes_and_optimizer_roles():
    m = OP.build(args_of(bias=True), DIMS, None, key=jax.random.key(0))
    axes = OP.logical_axes(args_of(bias=True), DIMS, None, m)
    assert axes.w == ("embed", "mlp") and axes.b == ("mlp",)
    roles = named_roles(m, OP.optim, "linear")
    assert roles.w.name == "weight" and roles.w.decay and roles.b.name == "bias" and not roles.b.decay


MODEL = """
model lin {
  vocab = 64; d_model = 24; heads = 2; window = 8; seq_len = 16
  block b {
    attn = block_attention(window: window)
    proj = linear(act: silu, bias: true)
    gate = linear(out: 40, residual: false)
  }
  layers { embed; repeat 2 { b }; norm rms; head tied }
}
"""


def test_in_a_model_decodes_like_the_forward_pass():
    model = bstc.load(MODEL, key=jax.random.key(0))
    assert decode.decodable(model) == (True, "")
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
    # jitted: one compilation each instead of one per eagerly dispatched op
    ref = np.asarray(eqx.filter_jit(lambda m, t: m(t))(model, tokens))
    got = np.asarray(eqx.filter_jit(decode.decode_logits)(model, tokens))
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    rep = bstc.explain(bstc.parse(MODEL))
    assert rep.params == count_params(model)


def test_residual_linear_of_another_width_is_a_located_error():
    text = MODEL.replace("gate = linear(out: 40, residual: false)", "gate = linear(out: 40)")
    with pytest.raises(BstcError) as e:
        bstc.parse(text)
    (d,) = e.value.diagnostics
    assert "sublayer 'gate' outputs (B, 16, 40), which cannot join the residual stream" in d.message
    assert d.hint == "only a d_model-wide output joins the residual stream: use `out: 0` (= d_model)"
    line = text.splitlines()[d.span.line - 1]
    assert line[d.span.col - 1:].startswith("out: 40")
    bstc.parse(text.replace("out: 40", "out: 24"))  # d_model itself is fine


def test_schema_errors():
    for bad, msg in (("act: swish", "'act' of linear must be one of none, gelu, silu, relu, tanh, sigmoid"),
                     ("out: -1", "'out' of linear must be ≥ 0")):
        with pytest.raises(BstcError) as e:
            bstc.parse(MODEL.replace("act: silu", bad))
        assert msg in e.value.diagnostics[0].message
