"""The layer-kind contract, checked for every registered kind by itself: a new kind added to
bstc/ops/ is covered here without editing this file (the cases come from the registry).

For a small model built around each kind (each context source in each context variant):
parameter count == `bstc explain`; logical axes name every array dimension; FLOPs within 10%
of XLA's cost analysis of the unrolled model; causality by perturbation; and, for kinds with a
decode step, cached decoding == the forward pass past seq_len."""
from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc import decode, params
from bstc.lower import SCAN_MIN_COUNT, Scanned, count_params
from bstc.passes.report import block_end_window
from bstc.passes.mesh import LOGICAL_AXES
from conftest import kind_case_id, kind_cases, kind_model_text, assert_causal

B, L, V = 2, 32, 64
CASES = kind_cases()


def _unrolled_loops(model):
    """Ops that loop internally (a BRT's scan over blocks) run unrolled, so that XLA's cost
    analysis, which counts a loop body once, sees every iteration."""
    def fix(x):
        if isinstance(x, eqx.Module) and "unroll" in getattr(x, "__dataclass_fields__", {}):
            return dataclasses.replace(x, unroll=True)
        return x

    return jax.tree.map(fix, model, is_leaf=lambda x: isinstance(x, eqx.Module) and hasattr(x, "unroll"))


@pytest.fixture(scope="module", params=CASES, ids=kind_case_id)
def case(request):
    text = kind_model_text(request.param, repeat=2)
    return text, bstc.parse(text), bstc.load(text, key=jax.random.key(0))


def test_param_count_equals_explain(case):
    text, m_ir, model = case
    assert count_params(model) == bstc.explain(m_ir).params


def test_logical_axes_name_every_dimension(case):
    text, m_ir, model = case
    axes = params.param_axes(m_ir, model)
    arrays = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    names = jax.tree.leaves(axes, is_leaf=lambda t: isinstance(t, tuple) and all(
        isinstance(x, (str, type(None))) for x in t))
    assert len(arrays) == len(names)
    for a, n in zip(arrays, names):
        assert len(n) == a.ndim and all(x is None or x in LOGICAL_AXES for x in n), (a.shape, n)


# Known gaps, to be closed by the SSM cost rules' rework: the FFT-convolution SSMs count an FFT
# as 2.5·n·log2 n and a complex multiply-add as 8 real FLOPs, where XLA's cost analysis counts
# an rfft as 8·n·log2 n, an irfft as 4·n·log2 n and a complex multiply as 1; at the small widths
# of these cases the two disagree by up to 40%. An s4d read only at block ends (an `mf`
# context) runs no FFT and is checked.
# `moe` counts the chosen experts only (the algorithm's work, what a grouped GEMM costs on an
# accelerator), where XLA's CPU backend computes `ragged_dot` densely over every expert.
FLOP_GAPS = {"s4d", "long_conv", "moe"}


def test_flops_within_ten_percent_of_xla(case):
    text, m_ir, model = case
    kinds = {s.kind for inst in m_ir.layers for s in inst.sublayers
             if not (s.kind == "s4d" and block_end_window(inst, s, m_ir.dims))}
    if kinds & FLOP_GAPS:
        pytest.xfail(f"known cost-rule gap for {', '.join(sorted(kinds & FLOP_GAPS))}")
    # The case's model, not one lowered again with scan=False: its unit repeats fewer than
    # SCAN_MIN_COUNT times, so it is planned as single blocks, not as a lax.scan whose body XLA's
    # cost analysis would count once.
    assert 2 < SCAN_MIN_COUNT and not any(isinstance(s, Scanned) for s in model.stages)
    model = _unrolled_loops(model)
    # One sequence: explain counts per-sequence work (an SSM kernel) once per sequence. The
    # parameters are arguments, as in training: closed over, they are constants and XLA folds
    # what depends on them alone (an SSM's kernel or powers) out of the count.
    tokens = jnp.zeros((1, L), jnp.int32)
    params, static = eqx.partition(model, eqx.is_array)
    cost = jax.jit(lambda p, t: eqx.combine(p, static)(t)).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mine = bstc.explain(m_ir).flops_per_token * L
    assert mine == pytest.approx(cost["flops"], rel=0.10)


def test_causal_by_perturbation(case):
    _, _, model = case
    assert_causal(jax.jit(lambda t: model(t)), jax.random.randint(jax.random.key(1), (B, L), 0, V), V)


def test_decode_equals_forward_past_seq_len(case):
    _, _, model = case
    ok, missing = decode.decodable(model)
    if not ok:
        pytest.skip(f"no decode step: {missing}")  # sampling then recomputes (bstc.runtime.sampling)
    tokens = jax.random.randint(jax.random.key(2), (B, 2 * L), 0, V)
    ref = np.asarray(jax.jit(lambda t: model(t))(tokens))
    got = np.asarray(eqx.filter_jit(decode.decode_logits)(model, tokens))
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_a_new_kind_in_one_file_is_covered(tmp_path):
    """Registering a kind is all it takes: the cases above come from the registry."""
    from bstc.ops import REGISTRY
    from bstc.ops.base import Op, Param, register
    from bstc.ops._common import Positionwise
    from conftest import kind_cases as cases_now

    class ScaleLayer(eqx.Module, Positionwise):
        gain: jax.Array

        def __call__(self, x, *, context=None, key=None):
            return x * self.gain.astype(x.dtype)

    @register
    class Scale(Op):
        kind = "test_scale"
        axes = {"gain": ("embed",)}
        optim = {"gain": "gain"}
        params = (Param("init", float, 1.0),)

        def param_count(self, args, dims, context):
            return dims.d_model

        def flops_per_token(self, args, dims, context):
            return float(dims.d_model)

        def build(self, args, dims, context, *, key):
            return ScaleLayer(jnp.full((dims.d_model,), args["init"]))

    try:
        assert ["x = test_scale()"] in cases_now()
        text = kind_model_text(["x = test_scale(init: 0.5)"], repeat=2)
        m_ir, model = bstc.parse(text), bstc.load(text, key=jax.random.key(0))
        test_param_count_equals_explain((text, m_ir, model))
        test_logical_axes_name_every_dimension((text, m_ir, model))
        test_decode_equals_forward_past_seq_len((text, m_ir, model))
    finally:
        del REGISTRY["test_scale"]
