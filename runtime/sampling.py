"""Generate text from a trained model (bytes, or through a tokenizer); `bstc sample` is bstc.cli.sample.

Two ways to decode, with the same sampling:

* **cached** (the default where the model allows it; `bstc.decode`): the prompt is fed token by
  token through per-layer caches (the SSM's recurrent state, the current block's keys, values
  and context), then each new token costs O(1) in the length of the history. A Block-State
  Transformer decodes this way with no length limit: the history stays in the SSM's state,
  past `seq_len`.
* **recompute** (any model; `--no-cache`): the causal forward pass over a window of the last
  `seq_len` tokens for every new token (one compiled function, reused). Because the model is
  causal, the logits at the newest position equal the full forward pass over the same tokens.
  O(seq_len) per token: fine for inspecting a model, not for serving one.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def choose(logits, key, temperature, n_bytes: int):
    """The next token from one position's logits: temperature 0 = greedy; only the first n_bytes
    ids are sampled (the bytes, or a tokenizer's ids)."""
    logits = logits[..., :n_bytes]
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@eqx.filter_jit
def next_token(model, tokens, n_valid, key, temperature, n_bytes: int):
    """The token after tokens[:n_valid] (tokens (seq_len,) int32; entries after n_valid are padding
    that a causal model never reads)."""
    params, static = eqx.partition(model, eqx.is_array)
    logits = eqx.combine(params, static)(tokens[None])[0]
    return choose(jax.lax.dynamic_index_in_dim(logits, n_valid - 1, keepdims=False), key, temperature, n_bytes)


@eqx.filter_jit
def generate_cached(model, prompt, n_tokens: int, key, temperature, n_bytes: int):
    """Feed `prompt` (P,) through the caches, then sample n_tokens, in one compiled program (two
    `lax.scan`s). Token i is drawn with fold_in(key, i), as the recompute path draws it."""
    from bstc import decode

    def feed(carry, tok):
        caches, t, _ = carry
        caches, logits = decode.step(model, caches, tok[None], t)
        return (caches, t + 1, logits[0]), None

    caches = decode.init_caches(model, 1, prompt.shape[0] + n_tokens)
    no_logits = jnp.zeros((model.embed.weight.shape[0],), jnp.float32)  # (vocab,): replaced by the prompt's
    carry, _ = jax.lax.scan(feed, (caches, jnp.int32(0), no_logits), prompt)

    def sample_one(carry, i):
        tok = choose(carry[2], jax.random.fold_in(key, i), temperature, n_bytes)
        carry, _ = feed(carry, tok)
        return carry, tok

    _, out = jax.lax.scan(sample_one, carry, jnp.arange(n_tokens))
    return out


def generate_ids(model, prompt: list[int], n_tokens: int, *, seq_len: int, vocab: int, n_choices: int,
                 temperature: float = 0.8, seed: int = 0, cache: bool | None = None) -> list[int]:
    """Sample `n_tokens` ids after `prompt` (ids < vocab), each among the first `n_choices` ids
    (256 for bytes; a tokenizer's ids). cache=True decodes through per-layer caches, False
    recomputes the forward pass over the last seq_len tokens, None takes the first where the
    model supports it."""
    from bstc import decode

    hist = list(prompt)
    key = jax.random.key(seed)
    ok, missing = decode.decodable(model) if cache is not False else (False, "")
    if cache is None:
        cache = ok
    if cache:
        if not ok:
            raise ValueError(f"this model cannot decode through caches: {missing} have no decode step")
        out = generate_cached(model, jnp.asarray(hist, jnp.int32), n_tokens, key, jnp.float32(temperature),
                              n_choices)
        return [int(t) for t in np.asarray(out)]
    out = []
    for i in range(n_tokens):
        window = hist[-seq_len:]
        buf = np.zeros((seq_len,), np.int32)
        buf[:len(window)] = window
        tok = int(next_token(model, jnp.asarray(buf), jnp.int32(len(window)), jax.random.fold_in(key, i),
                             jnp.float32(temperature), n_choices))
        hist.append(tok)
        out.append(tok)
    return out


def generate(model, prompt: bytes, n_tokens: int, *, seq_len: int, vocab: int, temperature: float = 0.8,
             seed: int = 0, cache: bool | None = None) -> bytes:
    """Sample `n_tokens` bytes after `prompt` (the prompt may be empty). cache=True decodes through
    per-layer caches, False recomputes the forward pass over the last seq_len tokens, None takes
    the first where the model supports it."""
    hist = list(prompt) or [ord("\n")]
    outside = sorted({b for b in hist if b >= vocab})
    if outside:
        from bstc.runtime.errors import UsageError

        raise UsageError(f"the prompt has bytes outside the model's vocab of {vocab} "
                         f"(e.g. {outside[0]}); this model reads only bytes < {vocab}")
    out = generate_ids(model, hist, n_tokens, seq_len=seq_len, vocab=vocab, n_choices=min(vocab, 256),
                       temperature=temperature, seed=seed, cache=cache)
    return bytes(t % 256 for t in out)


def generate_text(model, tokenizer, prompt: str, n_tokens: int, *, seq_len: int, vocab: int,
                  temperature: float = 0.8, seed: int = 0, cache: bool | None = None) -> str:
    """Sample `n_tokens` tokens after `prompt` through a tokenizer (`bstc.runtime.tokenizer`): the
    prompt is encoded, the ids drawn among the tokenizer's, and the continuation decoded. An empty
    prompt starts from the end-of-document token."""
    hist = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    if not hist:
        hist = [tokenizer.eos_id]
    out = generate_ids(model, hist, n_tokens, seq_len=seq_len, vocab=vocab, n_choices=min(vocab, tokenizer.n_ids),
                       temperature=temperature, seed=seed, cache=cache)
    return tokenizer.decode(out)
