"""Cached decoding (bstc/decode.py): token-by-token logits through the per-layer caches equal
the parallel forward pass, for every zoo model past seq_len, for every baseline layer kind, and
for the sublayer arrangements the language allows (post-norm, shared weights, dropout,
long_conv, MF/MH context)."""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc import decode
from bstc.runtime.sampling import generate
from conftest import SMALL_BST as SMALL, tiny_overrides, zoo_params

# Both sides jitted: one XLA compilation each instead of one per eagerly dispatched op (several
# times faster to compile for these tiny models; the computation is the same, and training and
# sampling run it jitted too). test_the_python_example_in_docs_runtime_runs decodes eagerly.
_forward = eqx.filter_jit(lambda model, tokens: model(tokens))
_decode_logits = eqx.filter_jit(decode.decode_logits)


def assert_decode_equals_forward(model, length: int, batch: int = 2, seed: int = 1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)
    ref = np.asarray(_forward(model, tokens))
    got = np.asarray(_decode_logits(model, tokens))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("path", zoo_params(("bst_sh_s4.bst", "brt.bst")))
def test_zoo_decodes_like_the_forward_pass_past_seq_len(path):
    """Every zoo model decodes through caches, twice as far as it was built for (full
    attention's cache holds the whole history; the others keep a fixed-size state)."""
    o = tiny_overrides(path)
    model = bstc.load(path, key=jax.random.key(0), overrides=o)
    assert decode.decodable(model) == (True, "")
    assert_decode_equals_forward(model, 2 * o["seq_len"])


BASELINES = """
model baselines {
  vocab = 256; d_model = 32; heads = 4; window = 8; seq_len = 32
  block full  { attn = full_attention(rope: false) }
  block slide { attn = sliding_attention(window: window) }
  block xl    { attn = xl_attention(window: window, memory: 12) }
  block rec   { rec = brt(window: window, state: 4, gate: lstm, skip: false, hidden: 48, norm: none) }
  block gated { ssm = gss(state: 8, expand: 2) }
  layers { embed; full; slide; xl; rec; gated; norm rms; head untied }
}
"""


def _with_random_relative_bias(model):
    """Transformer-XL's relative position biases start at zero: make them matter."""
    from bstc.ops.xl_attention import XLAttention

    is_xl = lambda m: isinstance(m, XLAttention)  # noqa: E731
    return jax.tree.map(lambda m: eqx.tree_at(lambda x: x.rel_bias, m, jax.random.normal(
        jax.random.key(9), m.rel_bias.shape)) if is_xl(m) else m, model, is_leaf=is_xl)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_baseline_layers_decode_like_the_forward_pass(dtype):
    """Full attention without positions, sliding, Transformer-XL with a memory longer than a
    block (and non-zero relative biases), an LSTM-gated BRT with its state MLP, and GSS."""
    text = BASELINES.replace("seq_len = 32", f"seq_len = 32; dtype = {dtype}")
    model = _with_random_relative_bias(bstc.load(text, key=jax.random.key(2)))
    if dtype == "float32":
        assert_decode_equals_forward(model, 64)
    else:
        assert_close_in_bf16(model, 64)


ARRANGEMENTS = """
model arrangements {
  vocab = 256; d_model = 32; heads = 4; window = 8; seq_len = 32
  placement = post
  block conv {
    ssm  = long_conv(filters: 1, kernel_len: 12, smooth: 3)
    attn = block_attention(window: window, context: ssm -> sh, norm: layer)
    drop = dropout(rate: 0.1, norm: none)
    mlp  = mlp(hidden: 48, act: swiglu, placement: pre)
  }
  block mh {
    ssm  = s4d(state: 8, filters: heads)
    attn = block_attention(window: window, context: ssm -> mh)
  }
  block mf {
    ssm  = s4d(state: 8, filters: 3, init: inv)
    attn = block_attention(window: window, context: ssm -> mf, rope: false)
    mlp  = mlp(hidden: 48, act: gelu, bias: true)
  }
  layers {
    embed
    conv share tied
    mh
    conv share tied
    repeat 2 { mf }
    norm rms
    head tied
  }
}
"""


def test_post_norm_shared_scanned_and_every_context_variant_decode_like_the_forward_pass():
    """A kernel shorter than the sequence, post-norm, a shared block used twice (one cache per
    use), a scanned stack, and SH/MH/MF context, at three times seq_len."""
    model = bstc.load(ARRANGEMENTS, key=jax.random.key(3))
    assert decode.decodable(model) == (True, "")
    assert_decode_equals_forward(model, 96, batch=3)


OWN_CONTEXT = """
model own {
  vocab = 256; d_model = 32; heads = 4; window = 8; seq_len = 32
  block sh {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh, context_block: own)
    mlp  = mlp(hidden: 48)
  }
  block mh {
    ssm  = long_conv(filters: heads, kernel_len: 12)
    attn = block_attention(window: window, context: ssm -> mh, context_block: own, rope: false)
  }
  layers { embed; sh; mh; repeat 2 { sh }; norm rms; head tied }
}
"""


def test_own_window_context_decodes_like_the_forward_pass():
    """`context_block: own`: the source's output at t joins the current block's context as it
    arrives (SH and MH, a scanned stack), at three times seq_len."""
    model = bstc.load(OWN_CONTEXT, key=jax.random.key(6))
    assert decode.decodable(model) == (True, "")
    assert_decode_equals_forward(model, 96)


MAMBA_CONTEXT = """
model mamba_ctx {
  vocab = 256; d_model = 32; heads = 4; window = 8; seq_len = 32
  block sh {
    ssm  = mamba(state: 8, head_dim: 16, chunk: 16)
    attn = block_attention(window: window, context: ssm -> sh)
    mlp  = mlp(hidden: 48)
  }
  block mh {
    ssm  = mamba(state: 8, head_dim: 16, chunk: 16, filters: heads, conv: 2)
    attn = block_attention(window: window, context: ssm -> mh)
  }
  block mf {
    ssm  = mamba(state: 8, head_dim: 16, chunk: 16, filters: 3, gate_norm: false)
    attn = block_attention(window: window, context: ssm -> mf, rope: false)
  }
  block own {
    ssm  = mamba(state: 8, head_dim: 16, chunk: 16)
    attn = block_attention(window: window, context: ssm -> sh, context_block: own)
  }
  layers { embed; sh; mh; mf; repeat 2 { own }; norm rms; head tied }
}
"""


@pytest.mark.slow  # the contract test covers each context variant's decode; this adds the zoo sizes
def test_mamba_context_source_decodes_like_the_forward_pass():
    """A selective SSM (conv window + state) as the SH, MH, MF and own-window context source,
    at three times seq_len (the forward pass pads to a whole number of chunks)."""
    model = bstc.load(MAMBA_CONTEXT, key=jax.random.key(7))
    assert decode.decodable(model) == (True, "")
    assert_decode_equals_forward(model, 96)


def assert_close_in_bf16(model, length: int):
    tokens = jax.random.randint(jax.random.key(2), (2, length), 0, 256)
    ref, got = np.asarray(_forward(model, tokens)), np.asarray(_decode_logits(model, tokens))
    # bf16 rounds differently token by token than in the batched forward: compare predictions
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) > 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_bfloat16_compute_decodes_close_to_the_forward_pass():
    assert_close_in_bf16(bstc.load(ARRANGEMENTS.replace("seq_len = 32", "seq_len = 32; dtype = bfloat16"),
                                   key=jax.random.key(3)), 32)


def test_decoding_is_causal_state_carries_the_past():
    """The caches carry information across blocks: changing the first token changes a logit
    several blocks later (the SSM state and the context), and never an earlier one."""
    model = bstc.load(ARRANGEMENTS, key=jax.random.key(3))
    a = jax.random.randint(jax.random.key(4), (1, 64), 0, 256)
    b = a.at[0, 20].set((a[0, 20] + 1) % 256)
    la, lb = np.asarray(_decode_logits(model, a)), np.asarray(_decode_logits(model, b))
    assert np.array_equal(la[:, :20], lb[:, :20])
    assert np.abs(la[:, 40:] - lb[:, 40:]).max() > 1e-3


def test_cached_greedy_generation_follows_the_forward_pass_over_the_whole_history():
    """Past seq_len the cached path keeps the whole history (the forward pass over all of it is
    its oracle), where the recompute path sees a window of seq_len tokens."""
    model = bstc.load(SMALL, key=jax.random.key(0))
    prompt = b"def f(x): return"
    out = generate(model, prompt, 30, seq_len=32, vocab=256, temperature=0.0, cache=True)
    hist = list(prompt)
    forward = eqx.filter_jit(model)
    # every query padded to one length (a causal forward pass: the padding after position n - 1
    # does not reach it), so the oracle compiles once rather than once per length
    full = len(prompt) + len(out) + (-(len(prompt) + len(out)) % 8)
    for tok in out:
        n = len(hist)
        padded = hist + [0] * (full - n)
        assert tok == int(jnp.argmax(forward(jnp.asarray([padded], jnp.int32))[0, n - 1]))
        hist.append(tok)


def test_cached_and_recomputed_sampling_agree_within_seq_len():
    model = bstc.load(SMALL, key=jax.random.key(5))
    for temperature in (0.0, 1.0):
        a = generate(model, b"import ", 20, seq_len=32, vocab=256, temperature=temperature, seed=2, cache=True)
        b = generate(model, b"import ", 20, seq_len=32, vocab=256, temperature=temperature, seed=2, cache=False)
        assert a == b


class NoDecode(eqx.Module):
    """A layer written without a decode step (as a new layer kind may be)."""

    inner: eqx.Module

    def __call__(self, x, *, context=None, key=None):
        return self.inner(x, context=context, key=key)


def test_a_model_without_decode_steps_falls_back_to_recomputation():
    model = bstc.load(SMALL, key=jax.random.key(0))
    model = eqx.tree_at(lambda m: m.stages[0].block.subs[2].op, model, replace_fn=NoDecode)
    assert decode.decodable(model) == (False, "NoDecode")
    with pytest.raises(ValueError, match="NoDecode"):
        generate(model, b"x", 3, seq_len=32, vocab=256, cache=True)
    assert len(generate(model, b"x", 3, seq_len=32, vocab=256)) == 3


def test_the_python_example_in_docs_runtime_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "runtime.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "decode_logits" in b]
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], "docs/runtime.md", "exec"), scope)
    assert decode.decodable(scope["model"]) == (True, "")
    assert scope["logits"].shape == (1, 512, 256) and len(scope["text"]) == 50
