"""The training loop: the jitted step (bstc.runtime.step) over a grain iterator, with its
concerns — metrics and the progress bar, evaluation, checkpoints, signals — as hooks.

Exact resume: the state (params, optimizer, step, RNG key) and the grain iterator position
are checkpointed together, so a resumed run computes bit-for-bit the losses of an
uninterrupted one. Tests inject hooks of their own (stop as if killed after a step, poison
a step's loss) through `train(..., hooks=[...])`; the production signature has no test
switches.
"""
from __future__ import annotations

import dataclasses

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bstc import placement
from bstc.lower import count_params
from bstc.runtime import data as D
from bstc.runtime.checkpoint import Checkpointer
from bstc.runtime.config import RunConfig
from bstc.runtime.errors import Interrupted, NonFiniteLossError, UsageError
from bstc.runtime.metrics import (MetricsWriter, ProgressBar, bits_per_byte, check_tracker, measure_matmul_peak,
                                  peak_matmul_size)
from bstc.runtime.model import ModelSpec
from bstc.runtime.rundir import RunFiles, RunLock
from bstc.runtime.step import compiled_step, evaluate_batches, init_state
from bstc.runtime.tokenizer import save_to_run


@dataclass
class RunResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)   # step -> train loss, this process
    val: dict[str, float] | None = None
    # The model after the last step this call ran (None if it ran none): what the final
    # checkpoint holds, for evaluating without restoring it (`evaluate(..., model=, step=)`).
    model: Any = None


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


class StopRun(Exception):
    """Raised by a hook to end the run after the current step: a checkpoint of that step is
    saved and `train` returns (the schedule still spans `cfg.steps`; --resume continues)."""


class Hook:
    """One concern of the training loop. `wrap_step` may wrap the step function once, before
    the first step; `after_step` runs after every successful step, in the order the hooks
    are given; `at_end` after the last step, before the final checkpoint."""

    def wrap_step(self, step_fn: Callable) -> Callable:
        return step_fn

    def after_step(self, run: "Run", step: int, stats: dict) -> None:
        pass

    def at_end(self, run: "Run") -> None:
        pass


@dataclass
class Run:
    """What the hooks see: the configuration, the current state and the run's outputs."""

    cfg: RunConfig
    run_dir: Path
    state: Any
    ckpt: Checkpointer
    save: Callable[[int], None]   # a checkpoint of `state` at a step (signal-safe)
    bar: ProgressBar
    writer: MetricsWriter
    result: RunResult


class Metrics(Hook):
    """Training metrics to metrics.jsonl / TensorBoard / trackers, and the progress bar."""

    def __init__(self, tokens_per_step: float, bytes_per_token: float, flops_per_token, peak, has_aux: bool):
        self.tokens_per_step, self.bpt, self.flops, self.peak, self.has_aux = (
            tokens_per_step, bytes_per_token, flops_per_token, peak, has_aux)
        self.tps, self.t_last = 0.0, None

    def after_step(self, run: Run, step: int, stats: dict) -> None:
        now = time.perf_counter()
        if self.t_last is not None:
            inst = self.tokens_per_step / max(now - self.t_last, 1e-9)
            self.tps = inst if self.tps == 0 else 0.9 * self.tps + 0.1 * inst
        self.t_last = now
        loss = stats["loss"]
        if step % run.cfg.log_every == 0 or step == run.cfg.steps:
            run.writer.write(dict(step=step, split="train", loss=loss, bpb=bits_per_byte(loss, self.bpt),
                                  lr=float(stats["lr"]), grad_norm=float(stats["grad_norm"]),
                                  accuracy=float(stats["accuracy"]), tokens_per_s=round(self.tps, 1),
                                  **({"aux_loss": float(stats["aux_loss"])} if self.has_aux else {})))
        mfu = 3 * self.flops * self.tps / self.peak if self.peak and self.tps else None
        run.bar.update(step, loss, self.tps, mfu)


class Evaluation(Hook):
    """Validation every `eval_every` steps and once at the end."""

    def __init__(self, batches: list, bytes_per_token: float):
        self.batches, self.bpt = batches, bytes_per_token

    def evaluate(self, run: Run, step: int) -> None:
        if not self.batches:
            return
        r = evaluate_batches(run.state.model, self.batches, self.bpt)
        run.writer.write(dict(step=step, split="validation", **r))
        run.result.val = r
        acc = f" · accuracy {r['accuracy']:.3f}" if run.cfg.task else ""
        run.bar.print(f"step {step}: validation loss {r['loss']:.4f} · {r['bpb']:.3f} bits/byte{acc}")

    def after_step(self, run: Run, step: int, stats: dict) -> None:
        if run.cfg.eval_every and step % run.cfg.eval_every == 0 and step != run.cfg.steps:
            self.evaluate(run, step)

    def at_end(self, run: Run) -> None:
        self.evaluate(run, run.result.step)


class Checkpoints(Hook):
    """A checkpoint every `ckpt_every` steps (the last step's is saved by the loop)."""

    def after_step(self, run: Run, step: int, stats: dict) -> None:
        if run.cfg.ckpt_every and step % run.cfg.ckpt_every == 0:
            run.save(step)


class SignalStop(Hook):
    """SIGINT/SIGTERM: finish the step, save a checkpoint, stop with a message that says how
    to continue."""

    def __init__(self, signals: _Signals):
        self.signals = signals

    def after_step(self, run: Run, step: int, stats: dict) -> None:
        if self.signals.received is not None:
            run.save(step)
            name = signal.Signals(self.signals.received).name
            raise Interrupted(f"{name} at step {step}: checkpoint saved; continue with "
                              f"`bstc train --resume -o {run.run_dir}`", self.signals.received)


def with_remat(spec: ModelSpec, policy: str) -> ModelSpec:
    """The same model, lowered with every block rematerialised by `policy` (bstc.lower): the
    parameters, and so checkpoints, are the same arrays; only the backward pass differs."""
    if spec.model_ir is None:
        raise UsageError("remat needs a model from a model file (its blocks are lowered by bstc)")
    from bstc.lower import lower

    return dataclasses.replace(spec, build=lambda key: lower(spec.model_ir, key=key, remat=policy))


def train(cfg: RunConfig, run_dir: Path, spec: ModelSpec, **kwargs) -> RunResult:
    """Train `spec` as configured, writing everything into `run_dir`, which no other
    `bstc train` may use meanwhile (the lock is taken by process 0 of a multi-host run).
    Keyword arguments as `_train`."""
    if jax.process_index() > 0:
        return _train(cfg, Path(run_dir), spec, **kwargs)
    with RunLock(Path(run_dir)):
        return _train(cfg, Path(run_dir), spec, **kwargs)


def _train(cfg: RunConfig, run_dir: Path, spec: ModelSpec, *, resume: bool = False,
           progress: bool = True, plot: bool = True, tensorboard: bool = True,
           resume_step: int | None = None, hooks: list[Hook] | tuple = ()) -> RunResult:
    """`hooks`: extra hooks, run after the built-in ones (metrics, evaluation, checkpoints)
    and before the signal check."""
    seq_len = cfg.seq_len or spec.seq_len
    if cfg.remat != "none":
        spec = with_remat(spec, cfg.remat)
    if not seq_len:
        raise UsageError("the sequence length is unknown: the model has no seq_len; pass --seq-len")
    files = RunFiles(run_dir)
    ckpt_dir = files.checkpoints
    if not resume and files.has_checkpoints():
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
    sh = placement.for_run(spec.model_ir, cfg.mesh, cfg.micro_batch)
    data_shard = sh.data_shard(cfg.micro_batch) if sh is not None else (0, 1)
    data_iter = D.train_iterator(train_src, cfg.batch, cfg.seed, shard=data_shard)
    val_batches = list(D.eval_batches(val_src, cfg.micro_batch, cfg.eval_batches))

    tx, step_fn = compiled_step(spec, cfg)
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
            moved = ckpt.set_aside(start, files.set_aside)
        except BaseException:
            ckpt.close()
            raise
        if moved:
            say(f"moved checkpoints {moved} to {files.set_aside}; resuming at step {start}")
    files.write(cfg, spec)  # only now: a refused resume leaves the run as it was
    if tok is not None:
        save_to_run(tok, run_dir)  # eval and sample decode through the run's own copy
    bpt_train = getattr(train_src, "bytes_per_token", 1.0)

    bar = ProgressBar(cfg.steps, start, enabled=progress, bytes_per_token=bpt_train)
    nparams = count_params(state.model)
    what = f"task {cfg.task}" if cfg.task else f"data {cfg.data or 'stdlib (embedded Python sources)'}"
    if tok is not None:
        what += f" · tokenizer {tok.describe()}"
    bar.print(f"[bold]{spec.name}[/] · {nparams / 1e6:.2f}M params · {what} · seq_len {seq_len} · "
              f"batch {cfg.batch} · {cfg.steps} steps → {run_dir}" +
              (f" (resuming at step {start})" if start else "") + (f" · {sh.describe()}" if sh else ""))
    quick = peak_matmul_size(jax.default_backend(), quick=True)  # the progress bar's MFU, at start-up
    peak = measure_matmul_peak(n=quick, seconds=0.3) if spec.flops_per_token and progress else None

    log_dir = run_dir  # multi-host: process 0 writes the run's metrics, the others their own
    if jax.process_index() > 0:
        log_dir = run_dir / f"process-{jax.process_index()}"
        log_dir.mkdir(parents=True, exist_ok=True)
    trackers = []
    if cfg.tracker and jax.process_index() == 0:
        from bstc.runtime.metrics import WandbTracker

        trackers.append(WandbTracker(run_dir, cfg.to_dict()))
    writer = MetricsWriter(log_dir, start_step=start, tensorboard=tensorboard, trackers=trackers)
    sig = _Signals()

    def save(step: int) -> None:
        sig.save(lambda: ckpt.save(step, run.state, data_iter, meta))

    run = Run(cfg, run_dir, state, ckpt, save, bar, writer, RunResult(run_dir=run_dir, step=start))
    tokens_per_step = cfg.batch * seq_len * (sum(cfg.length_mix) / len(cfg.length_mix) if cfg.length_mix else 1)
    all_hooks = [Metrics(tokens_per_step, bpt_train, spec.flops_per_token, peak,
                         bool(getattr(state.model, "has_aux", False))),
                 Evaluation(val_batches, getattr(val_src, "bytes_per_token", 1.0)), Checkpoints(),
                 *hooks, SignalStop(sig)]
    for h in all_hooks:
        step_fn = h.wrap_step(step_fn)

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
                new_state, stats = step_fn(run.state, batch)
                stats = {**stats, "loss": float(stats["loss"])}
                if not math.isfinite(stats["loss"]):  # the new state is dropped, never saved
                    last = ckpt.latest()
                    where = (f"the last good checkpoint is step {last} in {ckpt_dir}" if last is not None
                             else "no checkpoint was saved before it")
                    raise NonFiniteLossError(
                        f"loss is {stats['loss']} at step {step}: stopping; {where}. Lower --lr or raise "
                        "the warmup, then --resume.")
                run.state = new_state
                run.result.model = new_state.model
                run.result.losses[step] = stats["loss"]
                run.result.step = step
                try:
                    for h in all_hooks:
                        h.after_step(run, step, stats)
                except StopRun:
                    if ckpt.latest() != step:
                        save(step)
                    return run.result
            for h in all_hooks:
                h.at_end(run)
            save(run.result.step)
    except KeyboardInterrupt:
        last = ckpt.latest()
        where = (f"the last checkpoint is step {last}; continue with `bstc train --resume -o {run_dir}`"
                 if last is not None else "no checkpoint was saved; --resume would start from step 0")
        raise Interrupted(f"interrupted twice: stopped at step {run.result.step}; {where}",
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
    bar.print(f"done: step {run.result.step} · checkpoints in {ckpt_dir} · loss curve {files.loss_plot}\n"
              f"next: bstc eval {run_dir}")
    return run.result
