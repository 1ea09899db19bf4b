"""`bstc experiment`: the reproducible experiments of docs/results.md — the language-modelling
table, associative recall, and the recall table across context sources. Errors and exit codes:
bstc.cli.errors."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bstc.cli.errors import command
from bstc.cli.run import enable_compilation_cache
from bstc.runtime.errors import UsageError


def _csv(text: Optional[str], what: str, cast=str) -> list | None:
    if not text:
        return None
    try:
        return [cast(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{what} expects a comma-separated list, got '{text}'") from None


experiment_app = typer.Typer(help="Reproducible experiments: the language-modelling table, associative recall.",
                             no_args_is_help=True)


@experiment_app.command("lm")
@command
def experiment_lm(
    out: Path = typer.Option(Path("runs/lm-table"), "-o", "--out", help="Output directory (resumable)."),
    scale: str = typer.Option("small", "--scale", help="smoke (seconds, for tests) or small (the documented table)."),
    models: Optional[str] = typer.Option(None, "--models",
                                         help="Comma-separated zoo models or model files (default: every zoo row)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds (default 0)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the scale's training steps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-run progress bar."),
):
    """Train every zoo model at matched size on the embedded corpus; table of bits/byte at 1x, 2x, 4x length."""
    from bstc.runtime.lm_table import run_table

    enable_compilation_cache()
    run_table(out, scale, _csv(models, "--models"), _csv(seeds, "--seeds", int), steps, progress=not quiet)


@experiment_app.command("recall")
@command
def experiment_recall(
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output directory (default: a temporary one)."),
    steps: int = typer.Option(600, "--steps", help="Training steps per model."),
    pairs: int = typer.Option(4, "--pairs", help="Key-value pairs per sequence."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
):
    """Associative recall across blocks: a BST-SH against the same network without context injection."""
    import json as _json

    from bstc.runtime.experiments import RecallSetup, run_recall

    enable_compilation_cache()
    typer.echo(_json.dumps(run_recall(RecallSetup(steps=steps, pairs=pairs, seed=seed), out, progress=True), indent=2))


@experiment_app.command("recall-table")
@command
def experiment_recall_table(
    out: Path = typer.Option(Path("runs/recall-table"), "-o", "--out", help="Output directory (resumable)."),
    variants: Optional[str] = typer.Option(None, "--variants",
                                           help="Comma-separated variants (default: every one; see docs/results.md)."),
    steps: int = typer.Option(3000, "--steps", help="Training steps per variant."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-run progress bar."),
):
    """Associative recall with shuffled queries: every context source, block-local attention and today's
    hybrids on one task; accuracy at 1x, 2x, 4x, 8x the training length."""
    from bstc.runtime.recall_table import Setup, run_table

    enable_compilation_cache()
    run_table(out, _csv(variants, "--variants"), Setup(steps=steps, seed=seed), progress=not quiet)


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")
