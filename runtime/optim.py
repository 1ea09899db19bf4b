"""The optimizer: a schedule, weight decay and learning rates by each parameter's role.

Every parameter of a compiled model has an `OptimRole` (bstc.ops.base.ROLES), declared by its
layer kind next to its parameters (`Op.optim`) and looked up by field name, so scanning a stack
(which adds a leading axis to every leaf) never changes a decision. A role says whether the
parameter is decayed and how its learning rate relates to the run's; a module's
`lr_multiplier` field (a long-convolution kernel's `lr_mult`) scales it further. A model that
was not compiled by bstc (a hand-written Equinox module handed to the trainer) falls back to
the shape rule: matrices are decayed, vectors are not.
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from bstc.ops.base import ROLES, OptimRole
from bstc.runtime.config import OptimizerConfig


def _trainable(a) -> bool:  # arrays, or their shapes from eqx.filter_eval_shape
    return eqx.is_inexact_array(a) or (isinstance(a, jax.ShapeDtypeStruct) and jnp.issubdtype(a.dtype, jnp.inexact))


def param_roles(model) -> Any:
    """A pytree like the model's trainable parameters whose leaves are `OptimRole`s."""
    from bstc.lower import LoweredModel
    from bstc.params import param_roles as compiled_roles

    if isinstance(model, LoweredModel):
        return compiled_roles(model)
    return jax.tree.map(lambda a: (ROLES["weight"] if a.ndim >= 2 else ROLES["bias"]) if _trainable(a) else None,
                        model)


def module_multipliers(model) -> Any:
    """Each trainable leaf's multiplier from the nearest enclosing module with an
    `lr_multiplier` field, else 1.0."""

    def scaled(x) -> bool:
        return isinstance(x, eqx.Module) and getattr(x, "lr_multiplier", None) is not None

    def label(x):
        if scaled(x):
            m = float(x.lr_multiplier)
            return jax.tree.map(lambda a: m if _trainable(a) else None, x)
        return 1.0 if _trainable(x) else None

    return jax.tree.map(label, model, is_leaf=scaled)


def lr_multipliers(model, base_lr: float = 1.0) -> Any:
    """Each trainable leaf's learning-rate multiplier: its role's (with the role's cap applied
    to `base_lr`) times its module's."""
    return jax.tree.map(lambda r, m: r.lr_multiplier(base_lr) * m, param_roles(model), module_multipliers(model),
                        is_leaf=lambda x: isinstance(x, OptimRole))


def decay_mask(params) -> Any:
    """True for the leaves that weight decay applies to."""
    return jax.tree.map(lambda r: r.decay, param_roles(params), is_leaf=lambda x: isinstance(x, OptimRole))


def make_schedule(opt: OptimizerConfig, steps: int):
    """Linear warmup to the peak, then cosine decay to `lr * min_lr_ratio` at step `steps`."""
    warmup = opt.warmup_steps(steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio)


def make_optimizer(opt: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW or Adafactor (the paper's), decaying by role, over a run
    of `steps` steps. The per-leaf learning-rate multipliers are applied to the updates by the
    train step."""
    sched = make_schedule(opt, steps)
    if opt.name == "adamw":
        tx = optax.adamw(sched, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    else:
        tx = optax.adafactor(sched, weight_decay_rate=opt.weight_decay or None, weight_decay_mask=decay_mask)
    parts = [optax.clip_by_global_norm(opt.clip)] if opt.clip > 0 else []
    return optax.chain(*parts, tx)
