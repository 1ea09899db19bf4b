"""Sampling by recomputation (`--no-cache`): greedy decoding equals the argmax of the forward pass
over the last seq_len tokens at every step. Cached decoding is tested in test_decode.py."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import bstc
from conftest import SMALL_BST as TEXT
from bstc.runtime.sampling import generate



def test_greedy_generation_follows_full_forward_argmax():
    model = bstc.load(TEXT, key=jax.random.key(0))
    prompt = b"def f(x): return"  # 16 bytes: the history crosses the 32-token window while decoding
    out = generate(model, prompt, 20, seq_len=32, vocab=256, temperature=0.0, cache=False)
    assert len(out) == 20
    forward = eqx.filter_jit(model)
    hist = list(prompt)
    for tok in out:  # recompute each step independently: a forward pass over the history,
        window = hist[-32:]  # padded only to the next multiple of the window (not to seq_len)
        n = len(window)
        padded = window + [0] * (-n % 8)
        logits = forward(jnp.asarray([padded], jnp.int32))[0, n - 1]
        assert tok == int(jnp.argmax(logits))
        hist.append(tok)


@pytest.mark.parametrize("cache", [False, True])
def test_sampling_is_seeded(cache):
    model = bstc.load(TEXT, key=jax.random.key(1))
    a = generate(model, b"x", 10, seq_len=32, vocab=256, temperature=50.0, seed=3, cache=cache)
    b = generate(model, b"x", 10, seq_len=32, vocab=256, temperature=50.0, seed=3, cache=cache)
    c = generate(model, b"x", 10, seq_len=32, vocab=256, temperature=50.0, seed=4, cache=cache)
    assert a == b and a != c
