"""`bstc eval RUN_DIR`: loss, perplexity and bits per byte at several sequence lengths, and the
loss at each position of the sequence (does the model use context beyond its window / beyond
the training length?). On a synthetic task: the accuracy on the scored answers.
"""
from __future__ import annotations

import json
import math
import time
import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from bstc.runtime import data as D
from bstc.runtime.checkpoint import Checkpointer
from bstc.runtime.config import RunConfig
from bstc.runtime.errors import CheckpointError, UsageError
from bstc.runtime.metrics import bits_per_byte
from bstc.runtime.model import ModelSpec, spec_from_file
from bstc.runtime.rundir import RunFiles


def load_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    return RunFiles(run_dir).read()


def spec_of_run(run_dir: Path, info: dict[str, Any]) -> ModelSpec:
    if not info.get("model_file"):
        raise UsageError(f"run '{run_dir}' has no saved model file; pass the ModelSpec directly")
    return spec_from_file(Path(run_dir) / info["model_file"], info.get("overrides") or {})


def load_model(run_dir: Path, spec: ModelSpec | None = None, step: int | None = None):
    """The trained model of a run (latest checkpoint, or `step`) and the step it is from."""
    from bstc.runtime.step import init_state, make_optimizer

    cfg, info = load_run(run_dir)
    spec = spec or spec_of_run(run_dir, info)
    ckpt = Checkpointer(RunFiles(run_dir).checkpoints, keep=cfg.keep)
    try:
        if not ckpt.steps():
            raise CheckpointError(f"run '{run_dir}' has no checkpoint yet")
        # Shapes only: nothing is built or initialised just to be overwritten by the restore.
        template = eqx.filter_eval_shape(init_state, spec, cfg, make_optimizer(cfg.optimizer, cfg.steps))
        # The fingerprint is not checked here: a newer compiler may print the same model
        # differently; the array paths and shapes still have to match exactly.
        step, state = ckpt.restore_readable(template, None, None, step=step,
                                            say=lambda m: print(f"bstc: {m}", file=sys.stderr, flush=True))
    finally:
        ckpt.close()
    return state.model, step, cfg, spec


def _bins(n: int, count: int = 48) -> list[tuple[int, int]]:
    """Log-spaced [start, end) position bins over 0..n."""
    edges = np.unique(np.round(np.geomspace(1, n + 1, count + 1)).astype(int) - 1)
    edges[0], edges[-1] = 0, n
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def evaluate(run_dir: Path, *, split: str = "validation", lengths: list[int] | None = None,
             max_tokens: int = 2**17, batch_tokens: int = 8192, step: int | None = None,
             spec: ModelSpec | None = None, console: Console | None = None,
             out_dir: Path | None = None, plot: bool = True, model=None) -> dict[str, Any]:
    """Evaluate a run's checkpoint; write eval-SPLIT.json, per_position-SPLIT.{json,png} (the
    picture only with `plot`). `model` (with the `step` it is from): that model instead of a
    restored checkpoint, e.g. the one `train` just returned (`RunResult.model`)."""
    from bstc.runtime.step import eval_step

    run_dir = Path(run_dir)
    if split not in D.SPLITS:
        raise UsageError(f"unknown split '{split}' (choose from {', '.join(D.SPLITS)})")
    if model is None:
        model, step, cfg, spec = load_model(run_dir, spec, step)
    else:
        if step is None:
            raise UsageError("evaluate(model=...) needs the step the model is from")
        cfg, info = load_run(run_dir)
        spec = spec or spec_of_run(run_dir, info)
    train_len = cfg.seq_len or spec.seq_len
    lengths = sorted(set(lengths or [train_len * m for m in (1, 2, 4, 8)]))
    console = console or Console()
    results: dict[str, Any] = dict(run=str(run_dir), step=step, split=split, train_seq_len=train_len,
                                   task=cfg.task, lengths={})
    curves: dict[int, dict[str, Any]] = {}
    tok = None
    if cfg.tokenizer and not cfg.task:
        from bstc.runtime.tokenizer import run_tokenizer

        tok = run_tokenizer(run_dir, spec.vocab)
        if tok.kind == "bytes":
            raise UsageError(f"run '{run_dir}' was trained with the tokenizer {cfg.tokenizer}, but its copy "
                             "(tokenizer.json / tokenizer.model) is missing from the run directory")
        results["tokenizer"] = tok.describe()
    for L in lengths:
        if spec.window and L % spec.window:
            results["lengths"][str(L)] = dict(skipped=f"not a multiple of the window ({spec.window})")
            continue
        src = D.make_source(data=cfg.data, task=cfg.task, split=split, seq_len=L, vocab=spec.vocab,
                            seed=cfg.seed, task_args=cfg.task_args, text_field=cfg.text_field,
                            tokenizer=tok)
        n_seq = min(len(src), max(1, max_tokens // L))
        if n_seq == 0:
            results["lengths"][str(L)] = dict(skipped=f"the {split} split is shorter than {L} tokens")
            continue
        B = max(1, min(n_seq, batch_tokens // L))
        t0 = time.perf_counter()
        tot = dict(nll=0.0, count=0.0, correct=0.0)
        pos_nll, pos_cnt = np.zeros(L), np.zeros(L)
        try:
            for b in D.eval_batches(src, B, math.ceil(n_seq / B)):
                out = eval_step(model, {k: jnp.asarray(v) for k, v in b.items()})
                for k in tot:
                    tot[k] += float(out[k])
                pos_nll += np.asarray(out["pos_nll"])
                pos_cnt += np.asarray(out["pos_count"])
        except Exception as e:  # noqa: BLE001 - a model that cannot run at L: say so, go on
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            results["lengths"][str(L)] = dict(skipped=f"the model does not run at length {L}: {msg}")
            continue
        loss = tot["nll"] / max(tot["count"], 1)
        bpt = getattr(src, "bytes_per_token", 1.0)
        r = dict(loss=loss, perplexity=math.exp(min(loss, 50)), bpb=bits_per_byte(loss, bpt),
                 bytes_per_token=round(bpt, 6),
                 tokens=int(tot["count"]), sequences=n_seq, seconds=round(time.perf_counter() - t0, 2))
        if cfg.task:
            r["accuracy"] = tot["correct"] / max(tot["count"], 1)
        results["lengths"][str(L)] = r
        if not cfg.task:
            per = pos_nll / np.maximum(pos_cnt, 1)
            bins = _bins(L)
            curves[L] = dict(positions=[float(np.sqrt(max(a, 1) * b)) for a, b in bins],
                             loss=[float(per[a:b].mean()) for a, b in bins],
                             per_position=[round(float(x), 5) for x in per])
    out_dir = Path(out_dir or RunFiles(run_dir).eval_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"eval-{split}.json").write_text(json.dumps(results, indent=2) + "\n")
    if curves:
        (out_dir / f"per_position-{split}.json").write_text(json.dumps(
            {str(k): v for k, v in curves.items()}) + "\n")
    if curves and plot:
        from bstc.runtime.plot import plot_per_position

        plot_per_position(curves, out_dir / f"per_position-{split}.png",
                          title=f"{spec.name}: per-position loss ({split}, step {step})", window=spec.window)
    results["files"] = sorted(str(p) for p in out_dir.iterdir())
    _print_table(console, results, spec, train_len)
    return results


def _print_table(console: Console, results: dict[str, Any], spec: ModelSpec, train_len: int) -> None:
    task = results.get("task")
    t = Table(title=f"{spec.name} · step {results['step']} · {results['split']}"
              + (f" · task {task}" if task else "")
              + (f" · tokenizer {results['tokenizer']}" if results.get("tokenizer") else ""), title_justify="left")
    for c in ("length", "tokens", "loss", "perplexity", "bits/byte") + (("accuracy",) if task else ()):
        t.add_column(c, justify="right")
    for L, r in results["lengths"].items():
        mark = " (train)" if int(L) == train_len else ""
        if "skipped" in r:
            t.add_row(L + mark, "-", f"[yellow]skipped: {r['skipped']}", "", "", *([""] if task else []))
            continue
        row = [L + mark, f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", f"{r['bpb']:.4f}"]
        if task:
            row.append(f"{r['accuracy']:.3f}")
        t.add_row(*row)
    console.print(t)
    for f in results.get("files", []):
        console.print(f"  wrote {f}")
