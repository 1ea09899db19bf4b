"""Metrics: one JSON object per line in RUN_DIR/metrics.jsonl, the same scalars in TensorBoard
(RUN_DIR/tb), and a rich progress bar on the terminal."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from bstc.runtime.rundir import RunFiles

LN2 = math.log(2.0)


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
    """bits/byte = nats/token / (ln 2 · bytes/token): byte-level tokens are one byte each; a
    tokenizer's tokens stand for the split's UTF-8 bytes divided by its tokens."""
    return loss_nats / (LN2 * bytes_per_token)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunFiles(run_dir).metrics
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


TRACKERS = ("wandb",)  # besides metrics.jsonl (always) and TensorBoard (tb/)


def check_tracker(name: str | None) -> None:
    """A one-line error, before the run starts, for an unknown tracker or a missing extra."""
    from bstc.runtime.errors import UsageError

    if name is None:
        return
    if name not in TRACKERS:
        raise UsageError(f"unknown tracker '{name}' (choose from {', '.join(TRACKERS)}; metrics.jsonl and "
                         "TensorBoard are always written)")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise UsageError("the wandb tracker needs the optional dependency wandb: pip install 'bstc[wandb]'")


class WandbTracker:
    """Weights & Biases, **offline by default** (WANDB_MODE=online to upload; the run is kept in
    RUN_DIR/wandb/ for `wandb sync`). The run id is derived from the run directory, so a resumed
    run continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None = None):
        import hashlib
        import os

        import wandb

        run_dir = Path(run_dir).resolve()
        run_id = "bstc-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bstc"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=config or {}, resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items()
                   if k not in ("step", "time", "split") and isinstance(v, (int, float)) and math.isfinite(v)}
        self.run.log(scalars, step=int(record["step"]))

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # finish() returns before the offline file is complete; teardown waits for it


class MetricsWriter:
    """Appends to metrics.jsonl (and TensorBoard's tb/); on resume drops the records past the
    restored step, so the file (and the plot) read as one uninterrupted run. If metrics.jsonl or
    tb/ disappears mid-run, both are rewritten from the records kept in memory, with a warning."""

    def __init__(self, run_dir: Path, start_step: int = 0, tensorboard: bool = True, warn=None,
                 trackers: list | None = None):
        self.trackers = list(trackers or [])  # e.g. WandbTracker: .log(record), .close()
        self.path = RunFiles(run_dir).metrics
        self.tb_dir = RunFiles(run_dir).tensorboard
        self._records: list[dict[str, Any]] = []
        if self.path.exists():
            self._records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self._records))
        self._f = open(self.path, "a")
        self._warn = warn or (lambda msg: print(f"bstc: warning: {msg}", file=sys.stderr, flush=True))
        self._tensorboard = tensorboard
        self._tb = None
        if tensorboard:
            self._tb = self._tb_writer(purge_step=start_step + 1 if start_step else None)

    def _tb_writer(self, purge_step=None):
        from tensorboardX import SummaryWriter

        return SummaryWriter(str(self.tb_dir), purge_step=purge_step)

    def _tb_add(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        for k, v in record.items():
            if k not in ("step", "time", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, record["step"])

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._records.append(record)
        if not self.path.exists():  # deleted under a running job: the open handle writes nowhere
            self._warn(f"{self.path} disappeared at step {record.get('step')}: rewriting it")
            self._f.close()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self._records[:-1]))
            self._f = open(self.path, "a")
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            if not self.tb_dir.is_dir():
                self._warn(f"{self.tb_dir} disappeared at step {record.get('step')}: rewriting it")
                self._tb.close()
                self._tb = self._tb_writer()
                for r in self._records[:-1]:
                    self._tb_add(r)
            self._tb_add(record)
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self._f.close()
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """step · loss · bits/byte · tokens/s · MFU · ETA. Off a terminal it prints a line every
    ~10% of the run instead (CI logs, pipes)."""

    def __init__(self, total: int, start: int, enabled: bool = True, console: Console | None = None,
                 bytes_per_token: float = 1.0):
        self.console = console or Console(stderr=True)
        self.bytes_per_token = bytes_per_token
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total, self.start = total, start
        self._every = max(1, (total - start) // 10)
        self.progress = Progress(
            TextColumn("[bold blue]train"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("loss [bold]{task.fields[loss]}[/] · {task.fields[bpb]} bits/byte · "
                       "{task.fields[tps]} tok/s{task.fields[mfu]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, disable=not self.live, transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start,
                                           loss="-", bpb="-", tps="-", mfu="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, tps: float, mfu: float | None = None) -> None:
        fields = dict(loss=f"{loss:.4f}", bpb=f"{bits_per_byte(loss, self.bytes_per_token):.3f}", tps=f"{tps:,.0f}",
                      mfu=f" · MFU {100 * mfu:.1f}%" if mfu is not None else "")
        self.progress.update(self.task, completed=step, **fields)
        if self.enabled and not self.live and ((step - self.start) % self._every == 0 or step == self.total):
            self.console.print(f"step {step}/{self.total}  loss {fields['loss']}  "
                               f"{fields['bpb']} bits/byte  {fields['tps']} tok/s{fields['mfu']}")

    def print(self, *args, **kw) -> None:
        if self.enabled:
            self.console.print(*args, **kw)


def measure_matmul_peak(n: int | None = None, seconds: float = 1.0) -> float:
    """The best FLOP/s of a jitted f32 n×n matmul on this machine: the denominator of MFU (the
    trainer's progress bar and `bstc bench model`). n defaults to `peak_matmul_size()`."""
    import jax
    import jax.numpy as jnp

    n = n or peak_matmul_size(jax.default_backend())
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == math.inf:
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_matmul_size(backend: str, quick: bool = False) -> int:
    """The matmul side that shows a backend's peak: 2048 saturates a CPU's cores (1024 for a
    `quick` estimate, as the trainer's start-up wants); an accelerator finishes a 2048² matmul in
    tens of microseconds, where the launch and the wait for the result would count as much as
    the arithmetic, so it gets 8192² (a TFLOP, milliseconds) either way."""
    if backend == "cpu":
        return 1024 if quick else 2048
    return 8192
