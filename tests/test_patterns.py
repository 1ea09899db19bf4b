"""Layer patterns and placements: the same IR as the explicit stack, one scan for a periodic
pattern, YAML twins, round trips, and Jamba- and Meliad-style stacks in one line that train."""
from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest

import bstc
from bstc import ir
from bstc.lower import plan_stages

HEAD = """model m {
  vocab = 256; d_model = 32; heads = 2; window = 16; seq_len = 64
  block local { attn = block_attention(window: window); mlp = mlp(hidden: 64) }
  block bst { ssm = s4d(state: 8); attn = block_attention(window: window, context: ssm -> sh) }
  block rec { attn = full_attention(kv_heads: 1); mlp = mlp(hidden: 64) }
  layers { embed; %s; norm rms; head tied }
}
"""


def stack(body: str) -> ir.Model:
    return bstc.parse(HEAD % body)


@pytest.mark.parametrize("short, explicit", [
    ('repeat 3 { pattern "LLBL" { L = local; B = bst } }',
     "repeat 3 { local; local; bst; local }"),
    ('pattern "L B L" { L = local; B = bst }', "local; bst; local"),
    ("repeat 8 { local }; every 4 from 1 bst", "local; bst; local; local; local; bst; local; local"),
    ("repeat 6 { local }; at [0, -1] bst", "bst; local; local; local; local; bst"),
    ("repeat 4 { local }; at 2 bst", "local; local; bst; local"),
    ("repeat 4 { local }; at [-3] bst; bst.0 { ssm.state = 4 }", "local; bst; local; local; bst.0 { ssm.state = 4 }"),
])
def test_short_forms_give_the_explicit_stack_s_ir(short, explicit):
    assert stack(short) == stack(explicit)


def test_a_periodic_pattern_is_one_scan():
    m = stack('repeat 5 { pattern "LLBL" { L = local; B = bst } }')
    assert plan_stages(m.layers) == [("scan", 0, 4, 5)]


def test_yaml_has_the_same_forms():
    yml = """model: m
params: {vocab: 256, d_model: 32, heads: 2, window: 16, seq_len: 64}
blocks:
  local: {layers: {attn: {kind: block_attention, window: window}, mlp: {kind: mlp, hidden: 64}}}
  bst:
    layers:
      ssm: {kind: s4d, state: 8}
      attn: {kind: block_attention, window: window, context: ssm -> sh}
  rec: {layers: {attn: {kind: full_attention, kv_heads: 1}, mlp: {kind: mlp, hidden: 64}}}
layers:
  - embed
  - {repeat: 2, layers: [{pattern: "LLBL", blocks: {L: local, B: bst}}]}
  - {every: 4, from: 2, use: rec}
  - {at: [0], use: bst}
  - {norm: rms}
  - {head: tied}
"""
    short = stack('repeat 2 { pattern "LLBL" { L = local; B = bst } }; every 4 from 2 rec; at [0] bst')
    assert bstc.parse(yml) == short
    assert bstc.parse(ir.to_bst(short)) == short  # printing expands the pattern


JAMBA = "repeat 8 { local }; every 8 from 4 rec"        # one attention layer in eight, offset 4
MELIAD = "repeat 6 { local }; at [-3] bst"               # the recurrent layer at index -3


@pytest.mark.parametrize("body", [JAMBA, MELIAD], ids=["jamba-style", "meliad-style"])
def test_one_line_stacks_compile_and_train(body, tmp_path):
    from bstc.runtime import RunConfig, train
    from bstc.runtime.model import spec_from_file

    m = stack(body)
    kinds = [i.block for i in m.layers]
    assert kinds == (["local"] * 4 + ["rec"] + ["local"] * 3 if body == JAMBA else ["local"] * 3 + ["bst"] + ["local"] * 2)
    f = tmp_path / "m.bst"
    f.write_text(HEAD % body)
    # no validation (eval_batches=0): it would compile one more forward pass, and the jitted
    # forward below already runs one
    cfg = RunConfig(model=str(f), steps=3, batch=2, eval_every=0, ckpt_every=0, eval_batches=0)
    r = train(cfg, tmp_path / "run", spec_from_file(f, {}), progress=False, plot=False, tensorboard=False)
    assert len(r.losses) == 3 and all(np.isfinite(list(r.losses.values())))
    model = bstc.load(m, key=jax.random.key(0))
    # jitted: one compilation instead of one per eagerly dispatched op of eight layers
    forward = eqx.filter_jit(lambda mdl, t: mdl(t))
    assert forward(model, jax.numpy.zeros((1, 64), jax.numpy.int32)).shape == (1, 64, 256)


def test_reserved_words_still_name_parameters():
    text = (HEAD % "repeat 2 { local }").replace("seq_len = 64", "seq_len = 64; at = 2; every = 1; pattern = 3")
    assert bstc.parse(text).params["at"] == 2
