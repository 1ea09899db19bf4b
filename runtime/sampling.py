"""`bstc sample RUN_DIR`: generate bytes from a trained run.

Decoding recomputes the causal forward pass over a fixed window of the last `seq_len` tokens
for every new token (one compiled function, reused): every model in the zoo decodes this way
with no per-layer cache code, and because each model is causal the logits at the newest
position equal those of the full forward pass over the same tokens. The cost is O(seq_len)
per token instead of O(1); fine for inspecting a model, not for serving one.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import typer


def make_sampler(model, seq_len: int, vocab: int):
    """step(tokens (seq_len,), n_valid, key, temperature) → next token; tokens after n_valid are padding."""

    @eqx.filter_jit
    def step(model, tokens, n_valid, key, temperature):
        logits = model(tokens[None])[0, n_valid - 1, :256 if vocab >= 256 else vocab]
        greedy = jnp.argmax(logits)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, greedy)

    return lambda tokens, n, key, t: step(model, tokens, n, key, t)


def generate(model, prompt: bytes, n_tokens: int, *, seq_len: int, vocab: int, temperature: float = 0.8,
             seed: int = 0) -> bytes:
    """Sample `n_tokens` bytes after `prompt` (the prompt may be empty)."""
    step = make_sampler(model, seq_len, vocab)
    hist = list(prompt) or [ord("\n")]
    key = jax.random.key(seed)
    out = []
    for i in range(n_tokens):
        window = hist[-seq_len:]
        buf = np.zeros((seq_len,), np.int32)
        buf[:len(window)] = window
        tok = int(step(jnp.asarray(buf), len(window), jax.random.fold_in(key, i), jnp.float32(temperature)))
        hist.append(tok)
        out.append(tok)
    return bytes(t % 256 for t in out)


def sample(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the latest under ./runs)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue."),
    tokens: int = typer.Option(200, "--tokens", "-n", min=1, help="How many bytes to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
):
    """Generate text from a trained run (byte-level), continuing --prompt."""
    from bstc.runtime.commands import _errors, _latest_run
    from bstc.runtime.evaluator import load_model

    @_errors
    def run():
        rd = run_dir or _latest_run()
        model, step, _cfg, spec = load_model(rd)
        seq_len, vocab = int(spec.seq_len), int(spec.vocab)
        typer.echo(f"# {rd} (step {step}), temperature {temperature}", err=True)
        text = generate(model, prompt.encode(), tokens, seq_len=seq_len, vocab=vocab, temperature=temperature, seed=seed)
        sys.stdout.write(prompt + text.decode("utf-8", errors="replace") + "\n")

    run()


def register(app: typer.Typer) -> None:
    app.command()(sample)
