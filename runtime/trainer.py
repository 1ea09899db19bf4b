"""The training loop: one jitted step over an `eqx.Module` train state, optax, orbax, grain.

Exact resume: the state (params, optimizer, step, RNG key) and the grain iterator position
are checkpointed together; the dropout key of step s is fold_in(key, s), so a resumed run
computes bit-for-bit the losses of an uninterrupted one.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bstc import placement
from bstc.runtime import data as D
from bstc.runtime.checkpoint import Checkpointer
from bstc.runtime.config import RunConfig
from bstc.runtime.rundir import RunLock
from bstc.runtime.tokenizer import save_to_run
from bstc.runtime.errors import Interrupted, NonFiniteLossError, UsageError
from bstc.lower import count_params
from bstc.runtime.metrics import MetricsWriter, ProgressBar, bits_per_byte, check_tracker, measure_matmul_peak
from bstc.runtime.model import ModelSpec
from bstc.runtime.optim import lr_multipliers, make_optimizer, make_schedule  # noqa: F401 - re-exported


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


def make_train_step(tx, cfg: RunConfig, multipliers, nan_at_step: int | None = None):
    sched = make_schedule(cfg)
    scale = multipliers is not None and any(m != 1.0 for m in jax.tree.leaves(multipliers))

    @eqx.filter_jit
    def train_step(state: TrainState, batch):  # batch leaves: (accum, micro, L)
        denom = jnp.maximum(batch["mask"].sum(), 1.0)
        poison = jnp.float32(1.0)
        if nan_at_step is not None:  # a test hook: poison one step's loss and gradients
            poison = jnp.where(state.step + 1 == nan_at_step, jnp.float32(jnp.nan), poison)

        def loss_fn(model, mb, key):
            # The optimised loss adds the ops' auxiliary loss (averaged over micro-batches);
            # the reported loss is the next-token NLL alone, comparable across models.
            nll, correct, aux = token_losses(model, mb, key, with_aux=True)
            nll = (nll * mb["mask"]).sum() / denom * poison
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


def _compiled_step(spec: ModelSpec, cfg: RunConfig, nan_at_step: int | None):
    """The optimizer and jitted step for this model + optimizer config, reused across runs in
    one process (a resumed or repeated run in a notebook or a test compiles once)."""
    opt = {k: v for k, v in cfg.to_dict().items()
           if k in ("steps", "batch", "accum", "optimizer", "lr", "warmup", "min_lr_ratio",
                    "weight_decay", "b1", "b2", "clip")}
    key = (spec.fingerprint, repr(sorted(opt.items())), nan_at_step)
    if key not in _STEPS:
        if len(_STEPS) > 8:
            _STEPS.clear()
        tx = make_optimizer(cfg)
        shapes = eqx.filter_eval_shape(spec.build, jax.random.PRNGKey(0))
        _STEPS[key] = (tx, make_train_step(tx, cfg, lr_multipliers(shapes, cfg.lr), nan_at_step))
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


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)   # step -> train loss, this process
    val: dict[str, float] | None = None


class _Signals:
    """SIGINT/SIGTERM set a flag that the loop checks after each step. A second SIGINT stops at
    once (KeyboardInterrupt), except during a checkpoint save, which it lets finish first: an
    impatient double Ctrl-C never leaves only a half-written checkpoint."""

    def __init__(self):
        self.received: int | None = None
        self.saving = False
        self.abort_after_save = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            if self.saving:
                self.abort_after_save = True
                return
            raise KeyboardInterrupt
        self.received = signum

    def save(self, fn) -> None:
        self.saving = True
        try:
            fn()
        finally:
            self.saving = False
        if self.abort_after_save:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run_tokenizer_of(cfg: RunConfig, run_dir: Path, resume: bool):
    """The run's tokenizer: None for bytes (and tasks); on resume the run directory's own copy,
    else the file `cfg.tokenizer` names."""
    if not cfg.tokenizer or cfg.task:
        return None
    from bstc.runtime.tokenizer import load_tokenizer, run_tokenizer

    saved = run_tokenizer(run_dir) if resume else None
    return saved if saved is not None and saved.kind != "bytes" else load_tokenizer(cfg.tokenizer)


def write_run_files(run_dir: Path, cfg: RunConfig, spec: ModelSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    model_file = None
    if spec.file is not None:
        model_file = "model" + (spec.file.suffix or ".bst")
        if spec.file.resolve() != (run_dir / model_file).resolve():
            shutil.copyfile(spec.file, run_dir / model_file)
    info = dict(model=spec.name, model_file=model_file, overrides=spec.overrides,
                fingerprint=spec.fingerprint, vocab=spec.vocab, seq_len=spec.seq_len,
                window=spec.window, created=_dt.datetime.now().isoformat(timespec="seconds"))
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def train(cfg: RunConfig, run_dir: Path, spec: ModelSpec, **kwargs) -> RunResult:
    """Train `spec` as configured, writing everything into `run_dir`, which no other
    `bstc train` may use meanwhile (the lock is taken by process 0 of a multi-host run).
    Keyword arguments as `_train`."""
    if jax.process_index() > 0:
        return _train(cfg, Path(run_dir), spec, **kwargs)
    with RunLock(Path(run_dir)):
        return _train(cfg, Path(run_dir), spec, **kwargs)


def _train(cfg: RunConfig, run_dir: Path, spec: ModelSpec, *, resume: bool = False,
           progress: bool = True, nan_at_step: int | None = None, plot: bool = True,
           tensorboard: bool = True, stop_after: int | None = None,
           resume_step: int | None = None) -> RunResult:
    """`stop_after` saves a checkpoint and returns after that step as if the run were killed
    there (the schedule still spans `cfg.steps`); `nan_at_step` poisons one step's loss.
    Both are hooks for the tests."""
    seq_len = cfg.seq_len or spec.seq_len
    if not seq_len:
        raise UsageError("the sequence length is unknown: the model has no seq_len; pass --seq-len")
    ckpt_dir = run_dir / "checkpoints"
    if not resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise UsageError(f"{run_dir} already has checkpoints: pass --resume to continue that run, "
                         "or choose another -o")

    check_tracker(cfg.tracker)  # an unknown tracker or a missing extra: one line, before any work
    tok = run_tokenizer_of(cfg, run_dir, resume)
    src = dict(data=cfg.data, task=cfg.task, seq_len=seq_len, vocab=spec.vocab, seed=cfg.seed,
               task_args=cfg.task_args, text_field=cfg.text_field, tokenizer=tok)
    train_src = D.make_source(split="train", **src)
    if cfg.length_mix:  # validation stays at seq_len: it measures the in-length result
        train_src = D.LengthMix([D.make_source(split="train", **{**src, "seq_len": seq_len * m})
                                 for m in cfg.length_mix], cfg.batch)
    val_src = D.make_source(split="validation", **src)
    # Several devices or processes, a --mesh or a mesh section: place everything with bstc.placement.
    sh = placement.for_run(spec.file, spec.overrides, cfg.mesh, cfg.micro_batch)
    data_shard = sh.data_shard(cfg.micro_batch) if sh is not None else (0, 1)
    data_iter = D.train_iterator(train_src, cfg.batch, cfg.seed, shard=data_shard)
    val_batches = list(D.eval_batches(val_src, cfg.micro_batch, cfg.eval_batches))

    tx, step_fn = _compiled_step(spec, cfg, nan_at_step)
    state = init_state(spec, cfg, tx)
    if sh is not None:
        state = sh.place(state)  # params + optimizer state sharded by the rules; restore keeps it
        step_fn = sh.jit_step(step_fn, state, batch_ndim=3, batch_dim=1)
        val_batches = [sh.replicate(b) for b in val_batches]
    ckpt = Checkpointer(ckpt_dir, keep=cfg.keep)
    meta = dict(fingerprint=spec.fingerprint, seq_len=seq_len)

    start = 0
    say = lambda msg: print(f"bstc: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if resume and not ckpt.steps():
        say(f"{ckpt_dir} has no checkpoint yet: starting from step 0")
    elif resume:
        try:
            start, state = ckpt.restore_readable(state, data_iter, spec.fingerprint, step=resume_step, say=say)
            # Newer checkpoints (unreadable ones, or past the chosen step) are kept, not
            # deleted, but out of the way: this run saves those steps again.
            moved = ckpt.set_aside(start, run_dir / "checkpoints.set-aside")
        except BaseException:
            ckpt.close()
            raise
        if moved:
            say(f"moved checkpoints {moved} to {run_dir / 'checkpoints.set-aside'}; resuming at step {start}")
    write_run_files(run_dir, cfg, spec)  # only now: a refused resume leaves the run as it was
    if tok is not None:
        save_to_run(tok, run_dir)  # eval and sample decode through the run's own copy
    bpt_train = getattr(train_src, "bytes_per_token", 1.0)
    bpt_val = getattr(val_src, "bytes_per_token", 1.0)

    bar = ProgressBar(cfg.steps, start, enabled=progress, bytes_per_token=bpt_train)
    nparams = count_params(state.model)
    what = f"task {cfg.task}" if cfg.task else f"data {cfg.data or 'stdlib (embedded Python sources)'}"
    if tok is not None:
        what += f" · tokenizer {tok.describe()}"
    bar.print(f"[bold]{spec.name}[/] · {nparams / 1e6:.2f}M params · {what} · seq_len {seq_len} · "
              f"batch {cfg.batch} · {cfg.steps} steps → {run_dir}" +
              (f" (resuming at step {start})" if start else "") + (f" · {sh.describe()}" if sh else ""))
    peak = measure_matmul_peak(n=1024, seconds=0.3) if spec.flops_per_token and progress else None

    log_dir = run_dir  # multi-host: process 0 writes the run's metrics, the others their own
    if jax.process_index() > 0:
        log_dir = run_dir / f"process-{jax.process_index()}"
        log_dir.mkdir(parents=True, exist_ok=True)
    trackers = []
    if cfg.tracker and jax.process_index() == 0:
        from bstc.runtime.metrics import WandbTracker

        trackers.append(WandbTracker(run_dir, cfg.to_dict()))
    writer = MetricsWriter(log_dir, start_step=start, tensorboard=tensorboard, trackers=trackers)
    result = RunResult(run_dir=run_dir, step=start)
    tokens_per_step = cfg.batch * seq_len * (sum(cfg.length_mix) / len(cfg.length_mix) if cfg.length_mix else 1)
    tps, t_last = 0.0, None
    has_aux = bool(getattr(state.model, "has_aux", False))  # a router: log its balance loss too

    sig = _Signals()

    def save(step: int) -> None:
        sig.save(lambda: ckpt.save(step, state, data_iter, meta))

    def run_eval(step: int) -> None:
        if not val_batches:
            return
        r = evaluate_batches(state.model, val_batches, bpt_val)
        rec = dict(step=step, split="validation", **r)
        writer.write(rec)
        result.val = r
        acc = f" · accuracy {r['accuracy']:.3f}" if cfg.task else ""
        bar.print(f"step {step}: validation loss {r['loss']:.4f} · {r['bpb']:.3f} bits/byte{acc}")

    try:
        with sig, bar:
            for step in range(start + 1, cfg.steps + 1):
                batch = next(data_iter)
                if sh is not None:  # this process's rows → one global array per key
                    batch = sh.batch({k: np.asarray(v).reshape(cfg.accum, -1, *v.shape[1:])
                                      for k, v in batch.items()}, cfg.micro_batch, batch_dim=1)
                else:
                    batch = {k: jnp.asarray(v).reshape(cfg.accum, cfg.micro_batch, *v.shape[1:])
                             for k, v in batch.items()}
                new_state, stats = step_fn(state, batch)
                loss = float(stats["loss"])
                if not math.isfinite(loss):
                    last = ckpt.latest()
                    where = (f"the last good checkpoint is step {last} in {ckpt_dir}" if last is not None
                             else "no checkpoint was saved before it")
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {step}: stopping; {where}. Lower --lr or raise the "
                        "warmup, then --resume.")
                state = new_state
                now = time.perf_counter()
                if t_last is not None:
                    inst = tokens_per_step / max(now - t_last, 1e-9)
                    tps = inst if tps == 0 else 0.9 * tps + 0.1 * inst
                t_last = now
                result.losses[step] = loss
                result.step = step
                mfu = 3 * spec.flops_per_token * tps / peak if peak and tps else None
                if step % cfg.log_every == 0 or step == cfg.steps:
                    writer.write(dict(step=step, split="train", loss=loss, bpb=bits_per_byte(loss, bpt_train),
                                      lr=float(stats["lr"]), grad_norm=float(stats["grad_norm"]),
                                      accuracy=float(stats["accuracy"]), tokens_per_s=round(tps, 1),
                                      **({"aux_loss": float(stats["aux_loss"])} if has_aux else {})))
                bar.update(step, loss, tps, mfu)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    run_eval(step)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    save(step)
                if stop_after is not None and step >= stop_after:
                    save(step)
                    return result
                if sig.received is not None:
                    save(step)
                    name = signal.Signals(sig.received).name
                    raise Interrupted(f"{name} at step {step}: checkpoint saved; continue with "
                                      f"`bstc train --resume -o {run_dir}`", sig.received)
            run_eval(result.step)
            save(result.step)
    except KeyboardInterrupt:
        last = ckpt.latest()
        where = (f"the last checkpoint is step {last}; continue with `bstc train --resume -o {run_dir}`"
                 if last is not None else "no checkpoint was saved; --resume would start from step 0")
        raise Interrupted(f"interrupted twice: stopped at step {result.step}; {where}",
                          signal.SIGINT) from None
    finally:
        writer.close()
        ckpt.close()
        if plot:
            try:
                from bstc.runtime.plot import plot_losses

                plot_losses(run_dir)
            except Exception:  # noqa: BLE001 - a plot must never hide the run's real outcome
                pass
    bar.print(f"done: step {result.step} · checkpoints in {ckpt_dir} · loss curve {run_dir / 'loss.png'}\n"
              f"next: bstc eval {run_dir}")
    return result
