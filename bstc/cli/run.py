"""The runtime's commands: train (and sweeps), eval, plot, export, tokenizer, data.
Errors and exit codes: bstc.cli.errors."""
from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bstc.cli.errors import command
from bstc.runtime.errors import UsageError


def enable_compilation_cache() -> None:
    """Persist XLA executables across runs (~/.cache/bstc/jax): a resumed run, `bstc eval` and
    the next `bstc train` of the same model skip most compilation. BSTC_JAX_CACHE=off disables it,
    BSTC_JAX_CACHE=DIR moves it."""
    import os

    where = os.environ.get("BSTC_JAX_CACHE", "")
    if where.lower() in ("0", "off", "no", "false"):
        return
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "bstc", "jax")
    try:
        import jax

        os.makedirs(where, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception:  # noqa: BLE001 - a cache is an optimisation, never a failure
        pass


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recent run directory under ./runs (for `bstc eval` / `--resume` without a path)."""
    from bstc.runtime.rundir import RunFiles

    runs = [RunFiles(p) for p in root.glob("*")] if root.is_dir() else []
    runs = [r for r in runs if r.config.is_file()]
    if not runs:
        raise UsageError("no run directory given and none found under ./runs")

    def touched(r) -> float:
        return max(f.stat().st_mtime for f in (r.config, r.metrics) if f.exists())

    return max(runs, key=touched).root


@command
def train(
    model: Optional[str] = typer.Argument(
        None, help="Model file (.bst/.yaml) or zoo name. Default: bst_sh_s4 (tiny overrides)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Text to train on: files, directories, globs (comma-separated). "
        "Default: the embedded corpus (this Python's standard-library sources). JSON Lines (.jsonl), "
        "Parquet (.parquet) and ArrayRecord (.arrayrecord) files hold one document per record."),
    text_field: Optional[str] = typer.Option(
        None, "--text-field", help="The field of a JSON Lines / Parquet / ArrayRecord record that holds its text "
        "(default: text)."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="A tokenizer file: Hugging Face tokenizers JSON (e.g. from `bstc tokenizer "
        "train`) or a SentencePiece model. Sets the model's vocab. Default: bytes."),
    task: Optional[str] = typer.Option(
        None, "--task", help="Train on a synthetic long-range task instead: recall, copy, induction."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 300)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Sequences per step (default 8)."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Gradient-accumulation micro-batches per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-3)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw (default) or adafactor."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (default 10% of steps)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Training sequence length (default: the model's seq_len)."),
    length_mix: Optional[str] = typer.Option(
        None, "--length-mix", help="Tasks only: train at several lengths, e.g. 1,2: the steps cycle through "
        "seq_len × each factor (validation stays at seq_len)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Override a model parameter, e.g. --set d_model=256 (repeatable)."),
    sweep_: Optional[List[str]] = typer.Option(
        None, "--sweep", help="Train a grid: one run per combination, e.g. --sweep d_model=64,128 --sweep "
        "window=16,32 (repeatable), each in its own directory under -o, then a summary table."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="auto (tiny overrides for zoo models), tiny, or none (the file as written)."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Run directory (default runs/MODEL-TIMESTAMP)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its latest checkpoint "
                                "(the newest readable one; a corrupt one is set aside)."),
    step: Optional[int] = typer.Option(None, "--step", help="With --resume: continue from this checkpoint step; "
                                       "newer checkpoints are moved to checkpoints.set-aside/."),
    config: Optional[Path] = typer.Option(None, "--config", help="A run config YAML; flags override it."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validation every N steps (default 100)."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps (default 100)."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Keep the last N checkpoints (default 3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, shuffling and dropout (default 0)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    tracker: Optional[str] = typer.Option(
        None, "--tracker", help="Also log to wandb (offline by default; the optional extra bstc[wandb]). "
        "metrics.jsonl and TensorBoard are always written."),
    remat: Optional[str] = typer.Option(
        None, "--remat", help="Recompute each block in the backward pass: none (default), full or dots "
        "(keep matmul outputs). Less activation memory for long sequences, and quicker compiles of deep "
        "stacks, for a second forward pass; the losses are the same."),
    mesh: Optional[str] = typer.Option(
        None, "--mesh", help="Device mesh, e.g. data=2,tensor=4 (default: the model's mesh section, "
        "else data parallel over every device). See docs/scaling.md."),
    coordinator: Optional[str] = typer.Option(
        None, "--coordinator", help="Multi-host: host:port of process 0 (jax.distributed), or 'auto' "
        "to let JAX detect the cluster (Cloud TPU, SLURM). Default: JAX_COORDINATOR_ADDRESS."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="Multi-host: number of processes."),
    process_id: Optional[int] = typer.Option(None, "--process-id", help="Multi-host: this process's index."),
):
    """Train a model; writes checkpoints, metrics.jsonl, TensorBoard logs and loss.png to the run directory."""
    from bstc import placement

    # Multi-host (flags, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): join
    # the other processes with jax.distributed before any JAX work. A no-op otherwise.
    placement.initialize_distributed(coordinator, num_processes, process_id)
    from bstc.runtime.config import RunConfig, parse_sets
    from bstc.runtime.model import effective_overrides, resolve_model, spec_from_file

    enable_compilation_cache()
    sets = parse_sets(set_)
    flags = dict(model=model, data=data, text_field=text_field, tokenizer=tokenizer, task=task, steps=steps, batch=batch, accum=accum, lr=lr,
                 optimizer=optimizer, warmup=warmup, seq_len=seq_len, preset=preset,
                 length_mix=_factors(length_mix),
                 eval_every=eval_every, ckpt_every=ckpt_every, keep=keep, seed=seed, mesh=mesh,
                 tracker=tracker, remat=remat)
    if step is not None and not resume:
        raise UsageError("--step picks the checkpoint to resume from: use it with --resume")
    if output is not None and not resume:  # an unusable -o is reported before any work
        from bstc.runtime.rundir import check_run_dir

        check_run_dir(output)
    if resume:
        from bstc.runtime.rundir import RunFiles

        run_dir = output or latest_run()
        files = RunFiles(run_dir)
        if not files.is_run():
            raise UsageError(f"--resume: '{run_dir}' is not a bstc run directory (no config.yaml / run.json)")
        cfg, info = files.read()  # the run's config and run.json, read once
        if config is not None:
            raise UsageError("--resume uses the run's own config.yaml; drop --config")
        if not info.get("model_file"):
            raise UsageError(f"--resume: run '{run_dir}' has no saved model file")
        model_path = run_dir / info["model_file"]
        saved_overrides = info.get("overrides") or {}
        _refuse_changes_on_resume(cfg, saved_overrides, flags, sets)
    else:
        cfg = RunConfig.load(config) if config is not None else RunConfig()
        model_path = None
    cfg = _with_flags(cfg, flags)
    if sets:
        cfg = cfg.replace(set={**cfg.set, **sets})
    cfg.validate()
    if cfg.data:  # a bad --data is reported before the model is even parsed
        from bstc.runtime.data import user_files

        user_files(cfg.data)
    if sweep_ or cfg.sweep:  # a grid of runs (bstc.runtime.sweep)
        from bstc.runtime.sweep import parse_sweep_items, sweep_from_config, train_sweep

        if resume:
            raise UsageError("--resume continues one run: resume a sweep's runs one by one (-o RUN_DIR --resume)")
        try:
            grid = {**sweep_from_config(cfg.sweep), **parse_sweep_items(sweep_)}
        except ValueError as e:
            raise UsageError(str(e)) from None
        rows = train_sweep(cfg.replace(sweep={}), grid, output, progress=not quiet, echo=typer.echo)
        if any(r.status != "ok" for r in rows):
            raise typer.Exit(1)
        return
    if model_path is None:
        model_path = resolve_model(cfg.model)
        run_dir = output or Path("runs") / f"{model_path.stem}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        overrides = effective_overrides(model_path, cfg)
        if cfg.tokenizer and not cfg.task:
            from bstc.runtime.tokenizer import load_tokenizer, tokenizer_vocab

            overrides = tokenizer_vocab(overrides, cfg.set, load_tokenizer(cfg.tokenizer))
    else:
        overrides = {**saved_overrides, **sets}
    spec = spec_from_file(model_path, overrides)
    import jax

    from bstc.runtime.trainer import train as run

    lead = jax.process_index() == 0  # multi-host: one progress bar and one loss plot (process 0's)
    run(cfg, run_dir, spec, resume=resume, progress=not quiet and lead, plot=lead, resume_step=step)


# The flags that set a field of the run's optimizer group (RunConfig.optimizer), by that field.
_OPTIMIZER_FLAGS = {"optimizer": "name", "lr": "lr", "warmup": "warmup"}


def _with_flags(cfg, flags: dict):
    """The run config with the flags given (not None) applied, the optimizer's into its group."""
    group = {field: flags[flag] for flag, field in _OPTIMIZER_FLAGS.items() if flag in flags}
    rest = {k: v for k, v in flags.items() if k not in _OPTIMIZER_FLAGS}
    return cfg.replace(**rest, optimizer=cfg.optimizer.replace(**group))


def _setting(cfg, flag: str):
    """The run's value of the setting a flag names."""
    return getattr(cfg.optimizer, _OPTIMIZER_FLAGS[flag]) if flag in _OPTIMIZER_FLAGS else getattr(cfg, flag)


# What a resumed run must keep: its model, data stream and optimizer state depend on these.
# Steps, evaluation and checkpoint cadence, the learning rate and the mesh may change.
_FIXED_ON_RESUME = ("model", "data", "text_field", "tokenizer", "task", "seq_len", "length_mix", "batch", "accum", "optimizer",
                    "preset", "seed")


def _refuse_changes_on_resume(cfg, saved: dict, flags: dict, sets: dict) -> None:
    """A resumed run keeps its model and data: flags and --set values that would change them
    are refused by name. `saved`: the run's overrides (run.json)."""
    for name in _FIXED_ON_RESUME:
        given = flags.get(name)
        if given is not None and given != _setting(cfg, name):
            flag = "the model" if name == "model" else f"--{name.replace('_', '-')}"
            raise UsageError(f"--resume: {flag} {given} differs from the run's {_setting(cfg, name)}; a resumed run "
                             "keeps it: drop the flag, or start a new run with another -o")
    changed = [f"{k}={v} (the run has {saved[k] if k in saved else 'the file value'})"
               for k, v in sets.items() if str(saved.get(k)) != str(v)]
    if changed:
        raise UsageError(f"--resume: --set {', '.join(changed)} would change the model; drop it, "
                         "or start a new run with another -o")


def _factors(text: Optional[str]) -> list[int] | None:
    """`--length-mix 1,2` -> [1, 2]."""
    if text is None:
        return None
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--length-mix expects comma-separated integers, got '{text}'") from None
    if not out or min(out) < 1:
        raise UsageError(f"--length-mix expects integers >= 1, got '{text}'")
    return out


def _lengths(text: Optional[str]) -> list[int] | None:
    if not text:
        return None
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--lengths expects comma-separated integers, got '{text}'") from None
    if not out or any(n < 2 for n in out):
        raise UsageError(f"--lengths expects integers >= 2, got '{text}'")
    return out


@command
def eval_cmd(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory written by `bstc train` (default: the latest under ./runs)."),
    lengths: Optional[str] = typer.Option(
        None, "--lengths", help="Sequence lengths, e.g. 512,1024,2048,4096 (default: 1, 2, 4, 8 × the training length)."),
    split: str = typer.Option("validation", "--split", help="validation, test, or train (to compare with the training loss)."),
    max_tokens: int = typer.Option(2**17, "--max-tokens", help="Tokens evaluated per length (the same prefix of the split)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the latest)."),
):
    """Loss, perplexity and bits per byte at several lengths, plus a per-position loss curve (PNG + JSON)."""
    from bstc.runtime.evaluator import evaluate

    enable_compilation_cache()
    evaluate(run_dir or latest_run(), split=split, lengths=_lengths(lengths), max_tokens=max_tokens, step=step)


@command
def plot(run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory written by `bstc train` (default: the latest under ./runs).")):
    """Write RUN_DIR/loss.png: train and validation loss against step."""
    from bstc.runtime.plot import plot_losses

    run_dir = run_dir or latest_run()
    if not run_dir.is_dir():
        raise UsageError(f"'{run_dir}' is not a directory")
    typer.echo(f"wrote {plot_losses(run_dir)}")


@command
def export(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory written by `bstc train` (default: the latest under ./runs)."),
    output: Path = typer.Option(..., "-o", "--output", help="The weights file to write (NAME.safetensors); "
                                "the resolved model file is written beside it (NAME.bst)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest readable)."),
):
    """Write a run's trained weights as safetensors, with the resolved model file beside them."""
    from bstc.runtime.export import export_run

    export_run(run_dir or latest_run(), output, step=step, say=typer.echo)


tokenizer_app = typer.Typer(help="Tokenizers: train a BPE tokenizer on your corpus.", no_args_is_help=True)


@tokenizer_app.command("train")
@command
def tokenizer_train(
    data: Optional[str] = typer.Option(None, "--data", help="The corpus: files, directories, globs (comma-separated), "
                                       "as for `bstc train --data` (default: the embedded corpus); only its training "
                                       "split is read."),
    vocab: int = typer.Option(8192, "--vocab", help="Vocabulary size, the end-of-document token included."),
    output: Path = typer.Option(..., "-o", "--output", help="The tokenizer file to write (JSON), e.g. tok.json."),
    text_field: str = typer.Option("text", "--text-field", help="The text field of JSON Lines / Parquet / "
                                   "ArrayRecord records."),
):
    """Train a byte-level BPE tokenizer (Hugging Face tokenizers) on a corpus; use it with --tokenizer."""
    from bstc.runtime.data import user_files
    from bstc.runtime.tokenizer import train_bpe

    if data:
        user_files(data)
    tok = train_bpe(data, vocab, output, text_field=text_field, progress=sys.stderr.isatty())
    typer.echo(f"wrote {output}: {tok.n_ids:,} ids (byte-level BPE, EOS <|endoftext|> = {tok.eos_id}); "
               f"train with: bstc train{f' --data {data}' if data else ''} --tokenizer {output}")


data_app = typer.Typer(help="Corpora: encode them into token shards ahead of training.", no_args_is_help=True)


@data_app.command("prepare")
@command
def data_prepare(
    data: Optional[str] = typer.Option(None, "--data", help="The corpus, as for `bstc train --data` "
                                       "(default: the embedded corpus)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="A tokenizer file (default: bytes)."),
    text_field: str = typer.Option("text", "--text-field", help="The text field of record files."),
    vocab: int = typer.Option(256, "--vocab", help="Bytes only: the model's vocab (above 256, documents are "
                              "separated by token 256, else by NUL)."),
    measure: bool = typer.Option(False, "--measure", help="Then time the training data loader on the shards."),
    batch: int = typer.Option(8, "--batch", help="With --measure: sequences per batch."),
    seq_len: int = typer.Option(512, "--seq-len", help="With --measure: tokens per sequence."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Encode a corpus into memory-mapped token shards in the data cache, so training runs read it directly."""
    from bstc.runtime.shards import measure_loader, prepare
    from bstc.runtime.tokenizer import Tokenizer, load_tokenizer

    if data:
        from bstc.runtime.data import user_files

        user_files(data)
    tok = load_tokenizer(tokenizer) if tokenizer else Tokenizer(vocab)
    r = prepare(data, text_field, tok, progress=not quiet and sys.stderr.isatty())
    toks = " / ".join(f"{r['tokens'][s]:,}" for s in ("train", "validation", "test"))
    typer.echo(f"{'found' if r['cached'] else 'wrote'} {r['path']} in {r['seconds']:.1f} s: {r['files']} files, "
               f"{toks} tokens (train / validation / test), {r['bytes_per_token']['train']:.3f} bytes/token, "
               f"tokenizer {tok.describe()}")
    if measure:
        m = measure_loader(r["corpus"], batch=batch, seq_len=seq_len)
        typer.echo(f"loader: {m['ms_per_batch']:.2f} ms per batch of {batch} x {seq_len} tokens "
                   f"({m['tokens_per_s']:,.0f} tokens/s)")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
    app.command("plot")(plot)
    app.command("export")(export)
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(data_app, name="data")
