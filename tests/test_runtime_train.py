"""The training runtime: loss falls, exact resume, NaN stop, signals, checkpoint errors,
gradient accumulation, per-group learning rates, eval and plots.

Most tests use a small stand-in Equinox model (embedding -> causal conv -> MLP -> head) so they
test the runtime alone and take seconds; the zoo-model tests are in test_runtime_zoo.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bstc.runtime import OptimizerConfig, RunConfig, train
from bstc.runtime.checkpoint import Checkpointer
from bstc.runtime.errors import CheckpointError, NonFiniteLossError, UsageError
from bstc.runtime.evaluator import evaluate, load_model
from bstc.runtime.metrics import read_metrics
from bstc.runtime.model import ModelSpec
from bstc.runtime.optim import lr_multipliers
from conftest import PoisonLoss, StopAfter

ROOT = Path(__file__).resolve().parent.parent


class Scaled(eqx.Module):
    """A sub-module with its own learning-rate multiplier (like the long-conv kernel)."""

    w: jax.Array
    lr_multiplier: float = eqx.field(static=True, default=1.0)


class StandIn(eqx.Module):
    emb: jax.Array
    conv: Scaled
    w1: eqx.nn.Linear
    w2: eqx.nn.Linear
    head: eqx.nn.Linear
    dropout: float = eqx.field(static=True)

    def __init__(self, vocab=256, d=32, k=4, dropout=0.1, conv_lr=1.0, *, key):
        ks = jax.random.split(key, 5)
        self.emb = jax.random.normal(ks[0], (vocab, d)) * 0.1
        self.conv = Scaled(jax.random.normal(ks[1], (k, d)) * 0.3, conv_lr)
        self.w1 = eqx.nn.Linear(d, 4 * d, key=ks[2])
        self.w2 = eqx.nn.Linear(4 * d, d, key=ks[3])
        self.head = eqx.nn.Linear(d, vocab, key=ks[4])
        self.dropout = dropout

    def __call__(self, tokens, *, key=None):
        x = self.emb[tokens]                                   # (B, L, D)
        k = self.conv.w.shape[0]
        xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
        y = sum(xp[:, i:i + x.shape[1]] * self.conv.w[i] for i in range(k))
        h = jax.nn.gelu(jax.vmap(jax.vmap(self.w1))(y))
        if key is not None and self.dropout:
            h = eqx.nn.Dropout(self.dropout)(h, key=key)
        y = y + jax.vmap(jax.vmap(self.w2))(h)
        return jax.vmap(jax.vmap(self.head))(y)


def standin(d=32, seq_len=64, **kw) -> ModelSpec:
    return ModelSpec(name="standin", build=lambda key: StandIn(d=d, key=key, **kw),
                     fingerprint=f"standin-d{d}-{sorted(kw.items())}", vocab=256, seq_len=seq_len)


def cfg(optimizer: dict | None = None, **kw) -> RunConfig:
    """A short run of the stand-in; `optimizer`: settings of its optimizer group."""
    base = dict(model="standin", steps=30, batch=4, eval_every=0, ckpt_every=10, eval_batches=2)
    return RunConfig(**{**base, **kw}, optimizer=OptimizerConfig(**{"lr": 3e-3, **(optimizer or {})}))


QUIET = dict(progress=False, plot=False, tensorboard=False)


def test_loss_falls_on_the_default_corpus(tmp_path):
    r = train(cfg(steps=40, eval_every=20), tmp_path / "run", standin(), progress=False)
    losses = list(r.losses.values())
    assert np.mean(losses[:5]) > np.log(256) - 0.3         # starts near uniform over bytes
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # and learns something
    recs = read_metrics(tmp_path / "run")
    val = [x for x in recs if x.get("split") == "validation"]
    assert len(val) == 2 and val[-1]["loss"] < val[0]["loss"]
    train_recs = [x for x in recs if x.get("split") == "train"]
    assert [x["step"] for x in train_recs] == list(range(1, 41))
    assert all(abs(x["bpb"] - x["loss"] / np.log(2)) < 1e-6 for x in train_recs)
    run = tmp_path / "run"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert RunConfig.load(run / "config.yaml") == cfg(steps=40, eval_every=20)
    assert Checkpointer(run / "checkpoints").steps() == [20, 30, 40]  # keep-last-3


def test_resumed_run_equals_uninterrupted(tmp_path):
    c = cfg(steps=24, accum=2, ckpt_every=5)
    full = train(c, tmp_path / "full", standin(), **QUIET)
    part = train(c, tmp_path / "part", standin(), hooks=[StopAfter(13)], **QUIET)  # "killed" after step 13
    assert max(part.losses) == 13 and Checkpointer(tmp_path / "part/checkpoints").latest() == 13
    rest = train(c, tmp_path / "part", standin(), resume=True, **QUIET)
    assert min(rest.losses) == 14
    joined = {**part.losses, **rest.losses}
    assert sorted(joined) == sorted(full.losses)
    np.testing.assert_allclose([joined[s] for s in sorted(joined)],
                               [full.losses[s] for s in sorted(full.losses)], rtol=1e-6, atol=0)
    # metrics.jsonl reads as one run: every step once
    steps = [x["step"] for x in read_metrics(tmp_path / "part") if x.get("split") == "train"]
    assert steps == list(range(1, 25))


def test_resume_is_needed_to_reuse_a_run_dir(tmp_path):
    train(cfg(steps=3, ckpt_every=3), tmp_path / "r", standin(), **QUIET)
    with pytest.raises(UsageError, match="--resume"):
        train(cfg(steps=3), tmp_path / "r", standin(), **QUIET)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 17.*last good checkpoint is step 15"):
        train(cfg(steps=30, ckpt_every=5), run, standin(), hooks=[PoisonLoss(17)], **QUIET)
    ck = Checkpointer(run / "checkpoints")
    assert ck.steps() == [5, 10, 15]
    model, step, _, _ = load_model(run, standin())
    assert step == 15
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    # and the run continues from there
    r = train(cfg(steps=18, ckpt_every=5), run, standin(), resume=True, **QUIET)
    assert min(r.losses) == 16 and all(np.isfinite(list(r.losses.values())))


def test_checkpoint_of_a_different_model_is_a_clear_error(tmp_path):
    run = tmp_path / "r"
    train(cfg(steps=2, ckpt_every=2), run, standin(d=32), **QUIET)
    with pytest.raises(CheckpointError, match="different model"):
        train(cfg(steps=4), run, standin(d=48), resume=True, **QUIET)
    other = standin(d=48)
    other.fingerprint = standin(d=32).fingerprint  # same fingerprint, different shapes
    with pytest.raises(CheckpointError, match="does not match this model"):
        train(cfg(steps=4), run, other, resume=True, **QUIET)


def _corrupt(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path, capsys):
    ref = train(cfg(steps=6, ckpt_every=2), tmp_path / "ref", standin(), **QUIET)
    run = tmp_path / "r"
    train(cfg(steps=6, ckpt_every=2), run, standin(), hooks=[StopAfter(4)], **QUIET)
    _corrupt(run / "checkpoints" / "4")
    res = train(cfg(steps=6, ckpt_every=2), run, standin(), resume=True, **QUIET)
    err = capsys.readouterr().err
    assert "checkpoints/4 is corrupt or unreadable" in err and "using checkpoint step 2" in err, err
    assert (run / "checkpoints.set-aside" / "4").is_dir()  # kept, out of the way
    assert sorted(res.losses) == [3, 4, 5, 6]
    np.testing.assert_allclose([res.losses[s] for s in (3, 4, 5, 6)], [ref.losses[s] for s in (3, 4, 5, 6)],
                               rtol=1e-6)
    for s in (2, 4):
        _corrupt(run / "checkpoints" / str(s))
    _corrupt(run / "checkpoints" / "6")
    with pytest.raises(CheckpointError, match="no checkpoint in .* is readable"):
        train(cfg(steps=8), run, standin(), resume=True, **QUIET)


def test_resume_from_a_chosen_step(tmp_path, capsys):
    ref = train(cfg(steps=6, ckpt_every=2), tmp_path / "ref", standin(), **QUIET)
    res = train(cfg(steps=6, ckpt_every=2), tmp_path / "ref", standin(), resume=True, resume_step=2, **QUIET)
    assert "moved checkpoints [4, 6]" in capsys.readouterr().err
    np.testing.assert_allclose([res.losses[s] for s in (3, 4, 5, 6)], [ref.losses[s] for s in (3, 4, 5, 6)],
                               rtol=1e-6)
    with pytest.raises(UsageError, match=r"no checkpoint for step 5 .*have \[2, 4, 6\]"):
        train(cfg(steps=6), tmp_path / "ref", standin(), resume=True, resume_step=5, **QUIET)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    spec = standin(dropout=0.0)
    one = train(cfg(steps=6, batch=8, accum=1), tmp_path / "a", spec, **QUIET)
    acc = train(cfg(steps=6, batch=8, accum=4), tmp_path / "b", spec, **QUIET)
    np.testing.assert_allclose(list(acc.losses.values()), list(one.losses.values()), rtol=2e-5)


def test_per_group_learning_rate(tmp_path):
    spec = standin(conv_lr=0.0)
    m0 = spec.build(jax.random.fold_in(jax.random.PRNGKey(0), 0x5EED))
    mults = lr_multipliers(m0)
    assert mults.conv.w == 0.0 and mults.emb == 1.0 and mults.head.weight == 1.0
    train(cfg(steps=5, ckpt_every=5), tmp_path / "r", spec, **QUIET)
    m1, _, _, _ = load_model(tmp_path / "r", spec)
    np.testing.assert_array_equal(m1.conv.w, m0.conv.w)   # frozen by its multiplier
    assert not np.allclose(m1.emb, m0.emb)                   # the rest trains


def test_eval_reports_lengths_and_per_position_loss(tmp_path):
    run = tmp_path / "r"
    train(cfg(steps=10, ckpt_every=10), run, standin(), **QUIET)
    res = evaluate(run, spec=standin(), lengths=[64, 256], max_tokens=4096)
    for L in ("64", "256"):
        r = res["lengths"][L]
        assert r["tokens"] == 4096 and abs(r["bpb"] - r["loss"] / np.log(2)) < 1e-9
        assert abs(r["perplexity"] - np.exp(r["loss"])) < 1e-6 * r["perplexity"]
    per = json.loads((run / "eval" / "per_position-validation.json").read_text())
    assert len(per["256"]["per_position"]) == 256
    saved = json.loads((run / "eval" / "eval-validation.json").read_text())
    assert saved["lengths"]["64"]["loss"] == res["lengths"]["64"]["loss"]
    assert (run / "eval" / "per_position-validation.png").stat().st_size > 1000
    # The model `train` returns is the one its final checkpoint holds: evaluated without a
    # restore, it gives the same figures.
    again = train(cfg(steps=12, ckpt_every=12), run, standin(), resume=True, **QUIET)
    direct = evaluate(run, spec=standin(), lengths=[64], max_tokens=1024, model=again.model, step=again.step,
                      out_dir=tmp_path / "direct", plot=False)
    restored = evaluate(run, spec=standin(), lengths=[64], max_tokens=1024, out_dir=tmp_path / "restored")
    assert direct["step"] == restored["step"] == 12
    assert direct["lengths"]["64"]["loss"] == restored["lengths"]["64"]["loss"]
    assert not (tmp_path / "direct" / "per_position-validation.png").exists()


def test_synthetic_task_reports_accuracy(tmp_path):
    run = tmp_path / "t"
    r = train(cfg(steps=3, ckpt_every=3, task="recall", eval_every=3), run, standin(), **QUIET)
    assert 0.0 <= r.val["accuracy"] <= 1.0 and r.val["tokens"] == 2 * 4 * 4  # batches x seqs x pairs
    res = evaluate(run, spec=standin(), lengths=[64, 128], max_tokens=512)
    assert "accuracy" in res["lengths"]["128"]


SIGTERM_SCRIPT = r"""
import sys; sys.path.insert(0, {tests!r})
from test_runtime_train import standin, cfg
from bstc.runtime import train
train(cfg(steps=100000, ckpt_every=100000, eval_every=0), {run!r}, standin(), progress=False, plot=False)
"""


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "sig"
    code = SIGTERM_SCRIPT.format(tests=str(ROOT / "tests"), run=str(run))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(read_metrics(run)) < 5:
            assert p.poll() is None, p.communicate()[1]
            time.sleep(0.2)
        assert len(read_metrics(run)) >= 5
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "SIGTERM at step" in err and "checkpoint saved" in err
    last = max(x["step"] for x in read_metrics(run))
    assert Checkpointer(run / "checkpoints").steps() == [last]
    model, step, _, _ = load_model(run, standin())
    assert step == last


def test_adafactor_and_warmup_schedule(tmp_path):
    from bstc.runtime.optim import make_schedule

    c = cfg(steps=20, optimizer=dict(name="adafactor", warmup=5, lr=1e-2))
    s = make_schedule(c.optimizer, c.steps)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 1e-2) < 1e-9 and abs(float(s(20)) - 1e-3) < 1e-9
    r = train(c, tmp_path / "r", standin(), **QUIET)
    lr = [x["lr"] for x in read_metrics(tmp_path / "r") if x.get("split") == "train"]
    assert lr[0] == 0.0 and max(lr) == pytest.approx(1e-2, rel=1e-6)  # logged lr follows the schedule
    assert np.mean(list(r.losses.values())[-3:]) < np.mean(list(r.losses.values())[:3])


# ---- the optimizer group and run configs of earlier versions ----------------------------------
# config.yaml as versions before the optimizer group wrote it: the optimizer's settings flat.
FLAT_CONFIG_YAML = """\
model: standin
set: {}
preset: auto
data: null
text_field: text
tokenizer: null
tracker: null
task: null
task_args: {}
seq_len: null
length_mix: null
steps: 6
batch: 4
accum: 1
optimizer: adamw
lr: 0.01
warmup: null
min_lr_ratio: 0.1
weight_decay: 0.05
b1: 0.9
b2: 0.95
clip: 1.0
seed: 0
eval_every: 0
eval_batches: 2
ckpt_every: 3
keep: 3
log_every: 1
mesh: null
sweep: {}
"""


def test_a_run_directory_with_flat_optimizer_settings_resumes_exactly(tmp_path):
    from bstc.cli.run import _refuse_changes_on_resume
    from bstc.runtime.rundir import RunFiles

    c = cfg(steps=6, ckpt_every=3, optimizer=dict(lr=1e-2, weight_decay=0.05))
    full = train(c, tmp_path / "full", standin(), **QUIET)
    old = tmp_path / "old"
    part = train(c, old, standin(), hooks=[StopAfter(3)], **QUIET)
    (old / "config.yaml").write_text(FLAT_CONFIG_YAML)  # as an earlier version left the run
    loaded, _ = RunFiles(old).read()
    assert loaded == c and loaded.optimizer == OptimizerConfig(lr=1e-2, weight_decay=0.05)
    _refuse_changes_on_resume(loaded, {}, {"optimizer": "adamw", "lr": 1e-3}, {})  # --lr may change
    with pytest.raises(UsageError, match="--optimizer adafactor differs from the run's adamw"):
        _refuse_changes_on_resume(loaded, {}, {"optimizer": "adafactor"}, {})
    rest = train(loaded, old, standin(), resume=True, **QUIET)
    joined = {**part.losses, **rest.losses}
    assert sorted(joined) == sorted(full.losses)
    np.testing.assert_allclose([joined[s] for s in sorted(joined)], [full.losses[s] for s in sorted(full.losses)],
                               rtol=1e-6, atol=0)
    assert "optimizer:\n  name: adamw\n  lr: 0.01\n" in (old / "config.yaml").read_text()  # rewritten grouped


def test_optimizer_settings_in_yaml_and_flags(tmp_path):
    from bstc.cli.run import _with_flags

    grouped = RunConfig.from_dict({"optimizer": {"name": "adafactor", "lr": "1e-3", "clip": 0}})
    assert grouped.optimizer == OptimizerConfig(name="adafactor", lr=1e-3, clip=0.0)
    assert RunConfig.from_dict({"optimizer": "adafactor", "lr": 1e-3, "clip": 0}) == grouped
    grouped.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == grouped
    for bad, message in [({"lr": 1e-3, "optimizer": {"lr": 2e-3}}, "'lr' is given twice"),
                         ({"optimizer": {"lrr": 1e-3}}, "unknown optimizer setting 'lrr' \\(did you mean 'lr'\\?\\)"),
                         ({"optimizer": {"b2": 1.5}}, "b2 must be in \\[0, 1\\)"),
                         ({"optimizer": ["adamw"]}, "setting 'optimizer' must be a mapping"),
                         ({"wieght_decay": 0.1}, "did you mean 'weight_decay'")]:
        with pytest.raises(UsageError, match=f"^c.yaml: .*{message}"):
            RunConfig.from_dict(bad, "c.yaml")
    # `bstc train --lr 1e-3 --optimizer adafactor --warmup 7` over a config: the group's fields
    flagged = _with_flags(RunConfig(), dict(lr=1e-3, optimizer="adafactor", warmup=7, steps=50, seed=None))
    assert flagged.optimizer == OptimizerConfig(name="adafactor", lr=1e-3, warmup=7) and flagged.steps == 50
    assert _with_flags(grouped, dict(lr=None, optimizer=None)).optimizer == grouped.optimizer


def test_remat_trains_the_same_model_with_the_same_losses(tmp_path):
    """`remat: full | dots` recomputes each block in the backward pass: the lowered stages carry
    the policy, the parameters (and so checkpoints) are the same arrays, and the losses of a
    short run equal those without it; an unknown policy is refused in one line."""
    from bstc.runtime.model import resolve_model, spec_from_file
    from bstc.runtime.trainer import with_remat
    from conftest import tiny_overrides

    path = resolve_model("bst_sh_s4")
    spec = spec_from_file(path, tiny_overrides(path))
    key = jax.random.PRNGKey(0)
    plain, full = spec.build(key), with_remat(spec, "full").build(key)
    assert {s.remat for s in full.stages} == {"full"} and {s.remat for s in plain.stages} == {"none"}
    arrays = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(arrays(plain), arrays(full), strict=True))
    losses = {p: list(train(cfg(model=str(path), steps=3, ckpt_every=3, remat=p), tmp_path / p, spec,
                            **QUIET).losses.values()) for p in ("none", "full", "dots")}
    np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-5)
    np.testing.assert_allclose(losses["dots"], losses["none"], rtol=1e-5)
    # The policy may change on resume: the checkpoint holds the same arrays.
    train(cfg(model=str(path), steps=3, ckpt_every=1), tmp_path / "switch", spec, hooks=[StopAfter(2)], **QUIET)
    resumed = train(cfg(model=str(path), steps=3, ckpt_every=1, remat="full"), tmp_path / "switch", spec,
                    resume=True, **QUIET)
    np.testing.assert_allclose(resumed.losses[3], losses["none"][2], rtol=1e-5)
    with pytest.raises(UsageError, match="unknown remat policy 'some'"):
        cfg(remat="some")
    from typer.testing import CliRunner

    from bstc.cli import app

    r = CliRunner().invoke(app, ["train", "--remat", "some", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "unknown remat policy 'some'" in r.stderr and "Traceback" not in r.output
