"""One training step and the evaluation step, jitted: the train state, the loss, gradient
accumulation, learning rates by role. The loop that runs them is bstc.runtime.trainer.

The dropout key of step s is fold_in(key, s), so a resumed run computes bit-for-bit the
losses of an uninterrupted one.
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from bstc.runtime.config import RunConfig
from bstc.runtime.metrics import bits_per_byte
from bstc.runtime.model import ModelSpec
from bstc.runtime.optim import lr_multipliers, make_optimizer, make_schedule


class TrainState(eqx.Module):
    model: eqx.Module
    opt_state: Any
    step: jax.Array      # () int32: optimizer updates applied so far
    key: jax.Array       # (2,) uint32: the run's base key; step s uses fold_in(key, s)


def init_state(spec: ModelSpec, cfg: RunConfig, tx: optax.GradientTransformation) -> TrainState:
    key = jax.random.PRNGKey(cfg.seed)
    model = spec.build(jax.random.fold_in(key, 0x5EED))
    # f32 master params whatever the compute dtype: the model casts to it itself.
    model = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) and
                         jnp.issubdtype(x.dtype, jnp.floating) else x, model)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    return TrainState(model=model, opt_state=opt_state, step=jnp.array(0, jnp.int32), key=key)


# ---- loss and steps ------------------------------------------------------------------------------


def token_losses(model, batch, key=None, with_aux: bool = False):
    """(B, L) next-token NLL in f32 and (B, L) correctness of the argmax prediction; with
    `with_aux`, also the model's auxiliary loss (a router's load balance; 0 without one)."""
    aux = jnp.float32(0)
    if hasattr(model, "with_aux"):
        logits, aux = model.with_aux(batch["inputs"], key=key)
    else:
        logits = model(batch["inputs"], key=key)
    logits = logits.astype(jnp.float32)  # (B, L, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return (nll, correct, aux) if with_aux else (nll, correct)


def make_train_step(tx, cfg: RunConfig, multipliers):
    sched = make_schedule(cfg.optimizer, cfg.steps)
    scale = multipliers is not None and any(m != 1.0 for m in jax.tree.leaves(multipliers))

    @eqx.filter_jit
    def train_step(state: TrainState, batch):  # batch leaves: (accum, micro, L)
        denom = jnp.maximum(batch["mask"].sum(), 1.0)

        def loss_fn(model, mb, key):
            # The optimised loss adds the ops' auxiliary loss (averaged over micro-batches);
            # the reported loss is the next-token NLL alone, comparable across models.
            nll, correct, aux = token_losses(model, mb, key, with_aux=True)
            nll = (nll * mb["mask"]).sum() / denom
            return nll + aux / cfg.accum, (nll, aux, (correct * mb["mask"]).sum())

        def micro(carry, xs):
            g_acc, l_acc, a_acc, c_acc = carry
            mb, key = xs
            (_, (l, a, c)), g = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.model, mb, key)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, a_acc + a / cfg.accum, c_acc + c), None

        params = eqx.filter(state.model, eqx.is_inexact_array)
        keys = jax.random.split(jax.random.fold_in(state.key, state.step), cfg.accum)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, aux_loss, correct), _ = jax.lax.scan(
            micro, (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0)), (batch, keys))
        updates, opt_state = tx.update(grads, state.opt_state, params)
        if scale:
            updates = jax.tree.map(lambda u, m: u * m, updates, multipliers)
        model = eqx.apply_updates(state.model, updates)
        new = TrainState(model=model, opt_state=opt_state, step=state.step + 1, key=state.key)
        stats = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=sched(state.step),
                     accuracy=correct / denom, aux_loss=aux_loss)
        return new, stats

    return train_step


_STEPS: dict = {}


def compiled_step(spec: ModelSpec, cfg: RunConfig):
    """The optimizer and jitted step for this model + optimizer config, reused across runs in
    one process (a resumed or repeated run in a notebook or a test compiles once)."""
    # OptimizerConfig: frozen, hashable. The remat policy is a static field of the lowered
    # stages, so the learning-rate multipliers' tree (built from the model) depends on it.
    key = (spec.fingerprint, cfg.remat, cfg.steps, cfg.batch, cfg.accum, cfg.optimizer)
    if key not in _STEPS:
        if len(_STEPS) > 8:
            _STEPS.clear()
        tx = make_optimizer(cfg.optimizer, cfg.steps)
        shapes = eqx.filter_eval_shape(spec.build, jax.random.PRNGKey(0))
        _STEPS[key] = (tx, make_train_step(tx, cfg, lr_multipliers(shapes, cfg.optimizer.lr)))
    return _STEPS[key]


@eqx.filter_jit
def eval_step(model, batch):
    """Sums over a batch: NLL, scored tokens, correct tokens; per position NLL and count."""
    nll, correct = token_losses(model, batch)
    m = batch["mask"]
    return dict(nll=(nll * m).sum(), count=m.sum(), correct=(correct * m).sum(),
                pos_nll=(nll * m).sum(0), pos_count=m.sum(0))


def evaluate_batches(model, batches, bytes_per_token: float = 1.0) -> dict[str, float]:
    tot = dict(nll=0.0, count=0.0, correct=0.0)
    for b in batches:
        out = eval_step(model, {k: jnp.asarray(v) for k, v in b.items()})
        for k in tot:
            tot[k] += float(out[k])
    n = max(tot["count"], 1.0)
    loss = tot["nll"] / n
    return dict(loss=loss, bpb=bits_per_byte(loss, bytes_per_token), accuracy=tot["correct"] / n,
                tokens=int(tot["count"]))
