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


@eqx.filter_jit
def next_token(model, tokens, n_valid, key, temperature, n_bytes: int):
    """The token after tokens[:n_valid] (tokens (seq_len,) int32; entries after n_valid are padding
    that a causal model never reads). temperature 0 = greedy; only byte tokens are sampled."""
    params, static = eqx.partition(model, eqx.is_array)
    logits = eqx.combine(params, static)(tokens[None])[0]
    logits = jax.lax.dynamic_index_in_dim(logits, n_valid - 1, keepdims=False)[:n_bytes]
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


def generate(model, prompt: bytes, n_tokens: int, *, seq_len: int, vocab: int, temperature: float = 0.8,
             seed: int = 0) -> bytes:
    """Sample `n_tokens` bytes after `prompt` (the prompt may be empty)."""
    n_bytes = min(vocab, 256)
    hist = list(prompt) or [ord("\n")]
    key = jax.random.key(seed)
    out = []
    for i in range(n_tokens):
        window = hist[-seq_len:]
        buf = np.zeros((seq_len,), np.int32)
        buf[:len(window)] = window
        tok = int(next_token(model, jnp.asarray(buf), jnp.int32(len(window)), jax.random.fold_in(key, i),
                             jnp.float32(temperature), n_bytes))
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
