"""Optimizer settings by role: every parameter of every registered layer kind has a declared
role, weight decay and learning rates follow it leaf by leaf, and scanning changes nothing."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc.lower import Sub
from bstc.ops import REGISTRY
from bstc.ops.base import Op, OptimRole, register
from bstc.runtime.config import OptimizerConfig
from bstc.runtime.optim import decay_mask, lr_multipliers, make_optimizer
from conftest import STRUCTURAL_KINDS as STRUCTURAL, kind_case_id, kind_cases, kind_model_text

CASES = kind_cases()
model_text = kind_model_text


# The expectations, written independently of the ops' tables: names of the parameters that
# must not be decayed, and those whose learning rate is min(base, 1e-3) (S4's A and dt).
DYNAMICS = {"log_dt", "log_A_re", "A_im", "A_log", "dt_bias"}  # S4D; Mamba-2 (A, step bias)
NO_DECAY = DYNAMICS | {"D", "bias", "b_i", "b_f", "b1", "b2", "mlp_b1", "mlp_b2", "b_in", "b_out", "b_v", "b_u",
                       "b_uc", "b_o", "rel_bias", "norm", "norm1", "norm2", "norm_s", "init_state", "state_pos",
                       "ctx_first", "ctx_ids", "conv_x_bias", "conv_bc_bias", "gate_norm"}


def expected(owner: str, field: str, lr: float, kernel_mult: float) -> tuple[bool, float]:
    if owner in ("norm", "final_norm"):
        return False, 1.0
    if owner == "embed":
        return False, 1.0
    if owner == "long_conv" and field == "weight":
        return False, kernel_mult  # the kernel: no decay, its own learning rate (Fu et al.)
    if field in DYNAMICS:
        return False, min(1.0, 1e-3 / lr)
    return field not in NO_DECAY, 1.0


def leaf_table(model, lr: float) -> list[tuple]:
    """(owner kind, field, decay, lr multiplier) for every trainable leaf, in model order."""
    mask = decay_mask(eqx.filter(model, eqx.is_inexact_array))
    mults = lr_multipliers(model, lr)
    rows = []
    for (path, d), m in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(mults)):
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        field = names[-1]
        owner = names[0] if names[0] in ("embed", "head", "final_norm") else None
        if owner is None:  # .stages[i].unit[j].subs[k].(op|norm)....: find the Sub's kind
            node = model
            for k in path:
                node = getattr(node, k.name) if isinstance(k, jax.tree_util.GetAttrKey) else node[k.idx if hasattr(k, "idx") else k.key]
                if isinstance(node, Sub):
                    sub = node
            owner = "norm" if "norm" in names[names.index("subs") + 1:][:1] else sub.kind
        rows.append((owner, field, bool(d), float(m)))
    return rows


@pytest.mark.parametrize("subs", CASES, ids=kind_case_id)
def test_decay_and_learning_rate_leaf_by_leaf(subs):
    text = model_text(subs)
    lr = 4e-3
    scanned = bstc.load(text, key=jax.random.key(0))
    unrolled = bstc.load(text, key=jax.random.key(0), scan=False)
    rows_s, rows_u = leaf_table(scanned, lr), leaf_table(unrolled, lr)
    kernel_mult = REGISTRY["long_conv"].params[[p.name for p in REGISTRY["long_conv"].params].index("lr_mult")].default
    for owner, field, decay, mult in rows_s + rows_u:
        want = expected(owner, field, lr, kernel_mult)
        assert (decay, pytest.approx(mult)) == want, (owner, field)
    # Scanning stacks every leaf (a leading axis of 3) but decides nothing differently: the
    # unrolled model has the same rows, three times over for the repeated block.
    assert sorted(set(rows_s)) == sorted(set(rows_u))
    assert any(np.ndim(x) >= 2 for x in jax.tree.leaves(eqx.filter(scanned, eqx.is_inexact_array)))


def test_every_registered_kind_is_covered():
    seen = {k for case in CASES for s in case for k in REGISTRY if f"= {k}(" in s} | STRUCTURAL
    assert seen == set(REGISTRY)
    for kind, op in REGISTRY.items():
        assert op.optim is not None, kind


def test_tied_head_and_layer_norm_roles():
    m = bstc.load(model_text(["x = mlp(hidden: 32)"], norm="layer", tied=True), key=jax.random.key(0))
    rows = leaf_table(m, 1e-3)
    assert ("embed", "weight", False, 1.0) in rows and not any(r[0] == "head" for r in rows)
    assert ("final_norm", "bias", False, 1.0) in rows


def test_dynamics_learning_rate_is_capped_not_raised():
    m = bstc.load(model_text(["x = s4d()"]), key=jax.random.key(0))
    for lr, want in ((2e-3, 0.5), (5e-4, 1.0)):
        roles = {r[1]: r[3] for r in leaf_table(m, lr)}
        assert roles["log_dt"] == pytest.approx(want) and roles["w_out"] == 1.0


def test_optimizer_decays_exactly_the_decayed_leaves():
    """Zero gradients: AdamW's update is −lr·wd·p on decayed leaves and 0 on the others."""
    m = bstc.load(model_text(["x = s4d()", "y = mlp(hidden: 32)"]), key=jax.random.key(0))
    params = eqx.filter(m, eqx.is_inexact_array)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.5, warmup=0, clip=0.0), steps=10)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    upd = eqx.filter(upd, eqx.is_array)  # first step: lr = peak
    mask = decay_mask(params)
    for u, p, d in zip(jax.tree.leaves(upd), jax.tree.leaves(params), jax.tree.leaves(mask)):
        np.testing.assert_allclose(u, -1e-2 * 0.5 * p if d else 0.0, rtol=1e-5, atol=1e-9)
    assert 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))


def test_registration_needs_roles_for_every_parameter():
    with pytest.raises(TypeError, match="no optimizer roles"):
        @register
        class NoRoles(Op):  # noqa: F841
            kind = "test_no_roles"
            axes = {}

    assert "test_no_roles" not in REGISTRY
    with pytest.raises(TypeError, match="unknown optimizer role"):
        @register
        class BadRole(Op):  # noqa: F841
            kind = "test_bad_role"
            axes = {}
            optim = {"w": "weights"}

    class Half(eqx.Module):
        w: jax.Array
        b: jax.Array

    from bstc.ops.base import named_roles

    with pytest.raises(TypeError, match="parameter 'b' has no optimizer role"):
        named_roles(Half(jnp.ones((2, 2)), jnp.ones(2)), {"w": "weight"}, "half")
    assert isinstance(named_roles(Half(jnp.ones((2, 2)), jnp.ones(2)), {"w": "weight", "b": "bias"}).b, OptimRole)
