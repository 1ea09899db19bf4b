"""Weights out: `bstc export RUN -o model.safetensors` and `bstc.load(model_file, weights=...)`."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bstc
from bstc import weights as W
from bstc.runtime import RunConfig
from bstc.runtime.checkpoint import Checkpointer
from bstc.runtime.evaluator import load_model
from bstc.runtime.export import resolved_model_text
from bstc.runtime.model import spec_from_file
from bstc.runtime.step import init_state, make_optimizer
from bstc.runtime.rundir import RunFiles

ROOT = Path(__file__).resolve().parent.parent

# A scanned run of five BST layers (bstc.lower.SCAN_MIN_COUNT) and one single local layer, so both
# layouts are exported.
MODEL = """\
model tiny_export {
  vocab = 256              # bytes
  d_model = 32
  heads = 2
  window = 8
  seq_len = 32
  block bst {
    ssm = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh)
    mlp = mlp(hidden: 2 * d_model)
  }
  block local {
    attn = block_attention(window: window)
  }
  layers { embed; repeat 5 { bst }; local; norm rms; head untied }
}
"""
OVERRIDES = {"d_model": "24", "norm": "layer"}  # one declared parameter, one setting the file lacks


def cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), BSTC_JAX_CACHE=os.path.join(tempfile.gettempdir(),
                                                                             "bstc-test-jax-cache"))
    return subprocess.run([sys.executable, "-m", "bstc.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as `bstc train` leaves it, with a checkpoint at step 2 whose weights are
    the initial ones plus noise (so they are no initialisation's), without compiling a train step."""
    d = tmp_path_factory.mktemp("export")
    f = d / "tiny_export.bst"
    f.write_text(MODEL)
    spec = spec_from_file(f, OVERRIDES)
    cfg = RunConfig(model=str(f), steps=2, batch=2, set=OVERRIDES)
    state = init_state(spec, cfg, make_optimizer(cfg.optimizer, cfg.steps))
    leaves, treedef = jax.tree.flatten(eqx.filter(state.model, eqx.is_inexact_array))
    noisy = [x + 0.01 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    state = eqx.tree_at(lambda s: s.model, state,
                        eqx.combine(jax.tree.unflatten(treedef, noisy), eqx.filter(state.model, eqx.is_inexact_array,
                                                                                   inverse=True)))
    RunFiles(d / "run").write(cfg, spec)
    ck = Checkpointer(d / "run" / "checkpoints")
    ck.save(2, state, None, dict(fingerprint=spec.fingerprint, seq_len=32))
    ck.close()
    return d / "run"


@eqx.filter_jit
def logits(model, tokens):
    return model(tokens)


def test_resolved_model_file_writes_the_overrides_in(tmp_path):
    f = tmp_path / "m.bst"
    f.write_text(MODEL)
    text = resolved_model_text(f, OVERRIDES)
    assert "  d_model = 24\n" in text and "  vocab = 256              # bytes\n" in text
    assert "  norm = layer\n" in text
    g = tmp_path / "r.bst"
    g.write_text(text)
    assert W.fingerprint(bstc.parse(str(g))) == W.fingerprint(bstc.parse(str(f), overrides=OVERRIDES))
    assert W.fingerprint(bstc.parse(str(g))) != W.fingerprint(bstc.parse(str(f)))


def test_resolved_yaml_model_file(tmp_path):
    src = ROOT / "models" / "bst_sh_s4.yaml"
    over = {"d_model": 32, "heads": 2, "window": 16, "seq_len": 64, "groups": 1, "dtype": "bfloat16"}
    g = tmp_path / "r.yaml"
    g.write_text(resolved_model_text(src, over))
    assert W.fingerprint(bstc.parse(str(g))) == W.fingerprint(bstc.parse(str(src), overrides=over))


def test_export_then_load_gives_the_trained_model(run, tmp_path):
    r = cli("export", str(run), "-o", str(tmp_path / "model.safetensors"))
    assert r.returncode == 0, r.stderr
    assert "; 1 scanned stack stored stacked)" in r.stdout  # the repeat-5 run; the single block is not one
    weights, model_file = tmp_path / "model.safetensors", tmp_path / "model.bst"
    assert weights.is_file() and model_file.is_file()
    trained, step, _, _ = load_model(run)
    assert step == 2
    loaded = bstc.load(str(model_file), weights=str(weights))  # no overrides, no run directory
    tokens = (jnp.arange(2 * 32).reshape(2, 32) * 7) % 256
    want = np.asarray(logits(trained, tokens))
    np.testing.assert_array_equal(np.asarray(logits(loaded, tokens)), want)
    # keys are dotted parameter paths; the scanned run of `bst` blocks is stored stacked
    arrays, meta = W.read(weights)
    assert meta["format"] == "bstc" and meta["layout"] == "stacked" and meta["step"] == "2"
    assert "embed.weight" in arrays and "head.weight" in arrays
    stacked = [k for k in arrays if k.startswith("stages.0.unit.0.")]
    assert stacked and all(arrays[k].shape[0] == 5 for k in stacked)
    assert any(k.startswith("stages.1.block.") for k in arrays)
    np.testing.assert_array_equal(arrays["embed.weight"], np.asarray(trained.embed.weight))
    # and a fresh initialisation is not what was loaded
    fresh = bstc.load(str(model_file), key=jax.random.key(1))
    assert not np.allclose(np.asarray(logits(fresh, tokens)), want)
    # the same file with the original model file and the run's overrides
    again = bstc.load(str(run / "model.bst"), overrides=OVERRIDES, weights=str(weights))
    np.testing.assert_array_equal(np.asarray(logits(again, tokens)), want)


def test_weights_for_another_model_are_refused(run, tmp_path):
    out = tmp_path / "w.safetensors"
    assert cli("export", str(run), "-o", str(out)).returncode == 0
    with pytest.raises(W.WeightsError, match="written for another model.*exported with overrides"):
        bstc.load(str(run / "model.bst"), weights=str(out))  # without the overrides
    with pytest.raises(W.WeightsError, match="does not fit this model.*load with scan=True"):
        bstc.load(str(tmp_path / "w.bst"), weights=str(out), scan=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(W.WeightsError, match="cannot read weights file"):
        bstc.load(str(tmp_path / "w.bst"), weights=str(bad))
    with pytest.raises(W.WeightsError, match="does not exist"):
        bstc.load(str(tmp_path / "w.bst"), weights=str(tmp_path / "none.safetensors"))


@pytest.mark.parametrize("args, msg", [
    (["-o", "{tmp}/model.txt"], "must end in .safetensors"),
    (["-o", "{tmp}/no/such/dir/m.safetensors"], "does not exist"),
])
def test_export_misuse_is_one_line(run, tmp_path, args, msg):
    r = cli("export", str(run), *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bstc: error:") and msg in lines[0], r.stderr


def test_export_of_a_non_run_is_one_line(tmp_path):
    r = cli("export", str(tmp_path), "-o", str(tmp_path / "m.safetensors"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a bstc run directory" in r.stderr
