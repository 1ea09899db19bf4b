"""The runtime on real zoo models, end to end through the `bstc` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bstc.runtime import OptimizerConfig, RunConfig, train
from bstc.runtime.metrics import read_metrics
from bstc.runtime.model import spec_from_file
from conftest import StopAfter

ROOT = Path(__file__).resolve().parent.parent
# A BST-SH small enough for seconds on a CPU: the zoo file with the conftest's TINY-like sizes.
SMALL = ["--set", "d_model=32", "--set", "heads=2", "--set", "seq_len=64", "--set", "window=16",
         "--set", "ssm_state=8"]


def bstc(*args, timeout=300, **kw):
    cache = os.path.join(tempfile.gettempdir(), "bstc-test-jax-cache")  # shared by the CLI runs
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", BSTC_JAX_CACHE=cache)
    return subprocess.run([sys.executable, "-m", "bstc.cli", *args], capture_output=True, text=True,
                          cwd=kw.pop("cwd", ROOT), env=env, timeout=timeout, **kw)


def bstc_in_process(*args, monkeypatch):
    """The same command through typer's CliRunner, in this process: no interpreter start and
    imports (seconds per command); for the steps where the process boundary is not the point."""
    from typer.testing import CliRunner

    from bstc.cli import app

    monkeypatch.setenv("BSTC_JAX_CACHE", "off")  # the CLI would point this process's JAX at a cache
    monkeypatch.setenv("COLUMNS", "120")
    r = CliRunner().invoke(app, list(args))
    # an exception the CLI did not turn into a message would have been a traceback on stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    r.returncode = r.exit_code
    return r


SMALL_BST = """
model small_bst {
  vocab = 256
  d_model = 32
  heads = 2
  window = 16
  seq_len = 64
  block local {
    attn = block_attention(window: window)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }
  block bst(context = sh) {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> context)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }
  layers {
    embed
    bst
    local
    norm rms
    head untied
  }
}
"""


def test_the_runtime_reads_the_model_file_once(tmp_path, monkeypatch):
    """A spec carries the checked model: building the module and planning the mesh lower that
    model, never the file again (a spec used to parse it once per step that needed it)."""
    import jax

    import bstc.frontend
    from bstc import placement

    f = tmp_path / "m.bst"
    f.write_text(SMALL_BST)
    spec = spec_from_file(f, {"d_model": "48"})
    f.write_text("this is not a model any more")

    def no_parse(*a, **k):
        raise AssertionError("the model file was parsed again")

    monkeypatch.setattr(bstc.frontend, "parse_ast", no_parse)
    model = spec.build(jax.random.key(0))
    assert model.embed.weight.shape == (256, 48)  # the override lives in the carried model
    assert placement.for_run(spec.model_ir, None, 8) is None  # one device, no mesh: nothing to plan


def test_a_set_value_means_the_same_in_every_command(tmp_path):
    """`--set` values are model-language expressions for train/eval (runtime.config) and for
    validate/explain/compile/bench (bstc.cli.compiler) alike, never YAML (`on` → True, `0x10` → 16)."""
    import bstc
    from bstc.cli.compiler import parse_sets as compiler_sets
    from bstc.errors import BstcError
    from bstc.runtime.config import parse_sets as runtime_sets

    items = ["d_model=2 * 24", "heads=0x10", "seq_len=on"]
    assert compiler_sets(items) == runtime_sets(items) == {"d_model": "2 * 24", "heads": "0x10", "seq_len": "on"}
    f = tmp_path / "m.bst"
    f.write_text(SMALL_BST)
    assert bstc.parse(str(f), overrides=compiler_sets(items[:1])).dims.d_model == 48
    with pytest.raises(BstcError, match="<--set>"):
        bstc.parse(str(f), overrides=runtime_sets(items[1:2]))


def test_loss_falls_on_the_default_corpus_with_a_tiny_bst(tmp_path):
    f = tmp_path / "small_bst.bst"
    f.write_text(SMALL_BST)
    spec = spec_from_file(f, {})
    r = train(RunConfig(steps=40, batch=8, optimizer=OptimizerConfig(lr=3e-3), eval_every=20, ckpt_every=40),
              tmp_path / "r", spec, progress=False, plot=False, tensorboard=False)
    losses = list(r.losses.values())
    assert np.mean(losses[:3]) > np.log(256) - 0.5           # starts near uniform over bytes
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.5  # learns the byte statistics of code
    val = [x["loss"] for x in read_metrics(tmp_path / "r") if x.get("split") == "validation"]
    assert len(val) == 2 and val[1] < val[0] and val[1] < np.log(256) - 1.5
    assert (tmp_path / "r" / "model.bst").read_text() == SMALL_BST


def test_cli_train_eval_plot_and_resume(tmp_path, monkeypatch):
    # Training and resuming run as `bstc` processes (a resumed run is a new process reading the
    # checkpoints); eval, sample, plot and the refused resume run in this process.
    here = lambda *a: bstc_in_process(*a, monkeypatch=monkeypatch)  # noqa: E731
    run = tmp_path / "run"
    model = tmp_path / "small_bst.bst"
    model.write_text(SMALL_BST)
    args = ["train", str(model), "--steps", "12", "--batch", "4", "--ckpt-every", "4",
            "--eval-every", "6", "-o", str(run)]
    r = bstc(*args)
    assert r.returncode == 0, r.stderr
    for f in ("config.yaml", "model.bst", "run.json", "metrics.jsonl", "loss.png"):
        assert (run / f).is_file(), f
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4, 8, 12]
    info = json.loads((run / "run.json").read_text())
    assert info["overrides"] == {} and info["seq_len"] == 64 and info["window"] == 16
    first = {x["step"]: x["loss"] for x in read_metrics(run) if x.get("split") == "train"}
    assert sorted(first) == list(range(1, 13))

    r = here("eval", str(run), "--lengths", "64,128,256", "--max-tokens", "2048")
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "256" in r.stdout
    res = json.loads((run / "eval" / "eval-validation.json").read_text())
    assert {"64", "128", "256"} <= set(res["lengths"]) and all("bpb" in v for v in res["lengths"].values())
    assert (run / "eval" / "per_position-validation.png").is_file()

    # sampling: through the caches by default, by recomputation with --no-cache; greedy, and
    # within seq_len (4 + 40 < 64 tokens), the two give the same text
    r = here("sample", str(run), "-p", "def ", "-n", "40", "-t", "0")
    assert r.returncode == 0 and "cached decoding" in r.stderr, r.stderr
    r2 = here("sample", str(run), "-p", "def ", "-n", "40", "-t", "0", "--no-cache")
    assert r2.returncode == 0 and "recomputing" in r2.stderr, r2.stderr
    assert r.stdout.startswith("def ") and r.stdout == r2.stdout

    (run / "loss.png").unlink()
    assert here("plot", str(run)).returncode == 0 and (run / "loss.png").is_file()

    # resuming with a different model is refused, and leaves the run as it was
    r = here("train", "--resume", "-o", str(run), "--set", "d_model=48", "--steps", "16")
    assert r.returncode == 2 and "--set d_model=48" in r.stderr and "would change the model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # continue the finished run for 4 more steps: the same config, only --steps changes
    r = bstc("train", "--resume", "-o", str(run), "--steps", "16", "-q")
    assert r.returncode == 0, r.stderr
    steps = [x["step"] for x in read_metrics(run) if x.get("split") == "train"]
    assert steps == list(range(1, 17))


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    # In this process (no interpreter start per command): each fails before any compilation,
    # and bstc_in_process fails on an exception the CLI let through.
    bstc = lambda *a: bstc_in_process(*a, monkeypatch=monkeypatch)  # noqa: E731
    r = bstc("train", "--set", "nonsense")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["bstc: error: --set expects NAME=VALUE, got 'nonsense'"]
    r = bstc("train", "no_such_model")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr
    r = bstc("eval", str(tmp_path))
    assert r.returncode == 2 and "not a bstc run directory" in r.stderr and "Traceback" not in r.stderr
    r = bstc("train", *SMALL, "--set", "d_modle=64", "--steps", "1", "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "d_modle" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_readme_first_command_on_the_zoo_default(tmp_path):
    """`bstc train` (the zoo's bst_sh_s4 with the tiny preset), shortened, then `bstc eval`."""
    r = bstc("train", "--steps", "3", "--batch", "2", "--eval-every", "0", timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = list((tmp_path / "runs").iterdir())
    assert run.name.startswith("bst_sh_s4-")
    info = json.loads((run / "run.json").read_text())
    assert info["overrides"]["d_model"] == 128 and info["seq_len"] == 512
    r = bstc("eval", "--lengths", "512,1024", "--max-tokens", "2048", timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "1024" in r.stdout


def test_resume_equals_uninterrupted_on_a_real_bst(tmp_path):
    f = tmp_path / "small_bst.bst"
    f.write_text(SMALL_BST)
    spec = spec_from_file(f, {})
    c = RunConfig(steps=8, batch=4, eval_every=0, ckpt_every=4)
    kw = dict(progress=False, plot=False, tensorboard=False)
    full = train(c, tmp_path / "a", spec, **kw)
    part = train(c, tmp_path / "b", spec, hooks=[StopAfter(3)], **kw)
    rest = train(c, tmp_path / "b", spec, resume=True, **kw)
    joined = {**part.losses, **rest.losses}
    assert sorted(joined) == list(range(1, 9))
    np.testing.assert_allclose([joined[s] for s in range(1, 9)], [full.losses[s] for s in range(1, 9)],
                               rtol=1e-6)
