"""`bstc sample RUN_DIR`: generate text from a trained run (bytes, or through the run's tokenizer)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from bstc.cli.errors import command
from bstc.cli.run import latest_run


def sample(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the latest under ./runs)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue."),
    tokens: int = typer.Option(200, "--tokens", "-n", min=1, help="How many tokens to generate (bytes, or the "
                               "run's tokenizer's tokens)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: the newest readable)."),
    no_cache: bool = typer.Option(False, "--no-cache",
                                  help="Recompute the forward pass over the last seq_len tokens for every token "
                                       "instead of decoding through per-layer caches."),
):
    """Generate text from a trained run, continuing --prompt (through the run's tokenizer, if it has one)."""
    from bstc import decode
    from bstc.runtime.evaluator import load_model
    from bstc.runtime.sampling import generate, generate_text
    from bstc.runtime.tokenizer import run_tokenizer

    @command
    def run():
        rd = run_dir or latest_run()
        model, at_step, _cfg, spec = load_model(rd, step=step)
        seq_len, vocab = int(spec.seq_len), int(spec.vocab)
        ok, missing = decode.decodable(model)
        cached = ok and not no_cache
        how = ("cached decoding" if cached else "recomputing the forward pass per token"
               + ("" if ok else f" ({missing} have no decode step)"))
        typer.echo(f"# {rd} (step {at_step}), temperature {temperature}, {how}", err=True)
        tok = run_tokenizer(rd, vocab) if _cfg.tokenizer else None
        if tok is not None and tok.kind != "bytes":
            text = generate_text(model, tok, prompt, tokens, seq_len=seq_len, vocab=vocab,
                                 temperature=temperature, seed=seed, cache=cached)
        else:
            text = generate(model, prompt.encode(), tokens, seq_len=seq_len, vocab=vocab, temperature=temperature,
                            seed=seed, cache=cached).decode("utf-8", errors="replace")
        sys.stdout.write(prompt + text + "\n")

    run()


def register(app: typer.Typer) -> None:
    app.command()(sample)

