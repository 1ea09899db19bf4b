"""Sweeps: `bstc train --sweep` / `bstc explain --sweep` (and a run config's `sweep:` section)
run a grid of model-parameter values, one run directory or table row per point; a failed point
is reported in the table and the grid goes on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bstc.cli import app
from bstc.errors import BstcError, Diagnostic, Span
from bstc.runtime.config import RunConfig
from bstc.runtime.errors import RunError, UsageError
from bstc.runtime.sweep import train_grid, train_table
from bstc.sweep import dir_name, grid, parse_sweep_items, sweep_from_config

TINY = """\
import "blocks"
model tiny {
  vocab = 256; d_model = 32; heads = 4; window = 16; seq_len = 32
  mlp_hidden = 2 * d_model
  layers { embed; local; head tied }
}
"""


def test_the_grid_is_every_combination_in_order():
    sweep = parse_sweep_items(["d_model=64, 128", "window=16,4 * 8"])
    assert sweep == {"d_model": ["64", "128"], "window": ["16", "4 * 8"]}  # values stay expressions
    assert grid(sweep) == [{"d_model": "64", "window": "16"}, {"d_model": "64", "window": "4 * 8"},
                           {"d_model": "128", "window": "16"}, {"d_model": "128", "window": "4 * 8"}]
    assert dir_name({"d_model": "64", "window": "4 * 8"}) == "d_model=64,window=4_8"  # spaces dropped, * is _
    for bad, msg in (("d_model", "NAME=VALUE,VALUE"), ("d_model=64,", "NAME=VALUE,VALUE"),
                     ("2x=1", "NAME=VALUE"), ("d_model=64,64", "listed twice")):
        with pytest.raises(ValueError, match=msg):
            parse_sweep_items([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_sweep_items(["d_model=64", "d_model=128"])
    # a run config's section: lists (YAML numbers become expressions) or one "A,B" string
    assert sweep_from_config({"d_model": [64, 128], "norm": "rms,layer"}) == {
        "d_model": ["64", "128"], "norm": ["rms", "layer"]}
    assert RunConfig(sweep={"d_model": [64]}).sweep == {"d_model": [64]}
    with pytest.raises(UsageError, match="must be a list of values"):
        RunConfig(sweep={"d_model": {"a": 1}})


def test_a_failed_point_is_a_row_and_the_grid_goes_on(tmp_path):
    """train_grid: a model-file error and a diverging run fail their points only."""
    class Res:
        step, losses, val = 3, {1: 5.0, 3: 4.0}, {"loss": 4.5, "bpb": 6.5}

    class Spec:
        model_ir = None

    def run_point(point, run_dir):
        if point["d_model"] == "34":
            raise BstcError([Diagnostic(Span("<--set>", 1, 9), "d_model (34) is not divisible by heads (4)")])
        if point["d_model"] == "36":
            raise RunError("the loss is NaN at step 2")
        return Res(), Spec()

    points = grid({"d_model": ["32", "34", "36", "40"]})
    rows = train_grid(points, tmp_path, run_point, echo=lambda s: None)
    assert [r.status for r in rows] == ["ok", "failed", "failed", "ok"]
    assert rows[1].error == "d_model (34) is not divisible by heads (4)"
    assert rows[2].error == "the loss is NaN at step 2"
    assert (rows[0].steps, rows[0].train_loss, rows[0].val_loss) == (3, 4.0, 4.5)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in saved] == ["ok", "failed", "failed", "ok"]
    table = train_table(rows).splitlines()
    assert table[0].split()[:3] == ["d_model", "status", "params"]
    assert table[3].split()[:2] == ["34", "failed"] and table[2].split()[:2] == ["32", "ok"]
    assert table[-2:] == ["d_model=34: d_model (34) is not divisible by heads (4)", "d_model=36: the loss is NaN at step 2"]


def test_explain_sweep_is_a_table_of_params_and_flops(tmp_path):
    f = tmp_path / "tiny.bst"
    f.write_text(TINY)
    r = CliRunner().invoke(app, ["explain", str(f), "--sweep", "d_model=32,34,64", "--sweep", "window=8,16", "--json"])
    assert r.exit_code == 1, r.output  # a point failed
    rows = json.loads(r.stdout)
    assert [(x["point"]["d_model"], x["point"]["window"], x["status"]) for x in rows] == [
        ("32", "8", "ok"), ("32", "16", "ok"), ("34", "8", "failed"), ("34", "16", "failed"),
        ("64", "8", "ok"), ("64", "16", "ok")]
    assert rows[2]["error"] == "d_model (34) is not divisible by heads (4)"
    import bstc

    for x in rows[:2] + rows[4:]:
        rep = bstc.explain(str(f), overrides=x["point"])
        assert (x["params"], x["flops_per_token"]) == (rep.params, rep.flops_per_token)
    assert rows[4]["params"] > rows[0]["params"]
    r = CliRunner().invoke(app, ["explain", str(f), "--sweep", "d_model=32,64"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["d_model", "blocks", "params", "GFLOP/tok", "status"]
    assert [ln.split()[0] for ln in lines[2:]] == ["32", "64"] and all(ln.endswith("ok") for ln in lines[2:])
    r = CliRunner().invoke(app, ["explain", str(f), "--sweep", "d_modle=32"])
    assert r.exit_code == 2 and "the model has no parameter 'd_modle' (did you mean 'd_model'?)" in r.output
    r = CliRunner().invoke(app, ["explain", str(f), "--sweep", "d_model=32", "--set", "d_model=64"])
    assert r.exit_code == 2 and "both given" in r.output


def test_train_sweep_runs_each_point_in_its_own_directory(tmp_path, monkeypatch):
    """A config's `sweep:` and --sweep make one grid; one run directory per point, a failed point
    in the table, exit 1; each run directory is a plain run (its config holds the point)."""
    monkeypatch.setenv("BSTC_JAX_CACHE", "off")
    f = tmp_path / "tiny.bst"
    f.write_text(TINY)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"sweep": {"d_model": [32, 34]}, "steps": 2, "batch": 2, "eval_every": 0,
                                   "eval_batches": 1}))
    out = tmp_path / "grid"
    r = CliRunner().invoke(app, ["train", str(f), "--config", str(cfg), "--sweep", "window=8", "-o", str(out), "-q"])
    assert r.exit_code == 1, r.output
    ok, bad = out / "d_model=32,window=8", out / "d_model=34,window=8"
    assert (ok / "run.json").is_file() and not bad.exists()
    saved = RunConfig.load(ok / "config.yaml")
    assert saved.set == {"d_model": "32", "window": "8"} and saved.sweep == {} and saved.steps == 2
    rows = json.loads((out / "sweep.json").read_text())
    assert [(x["point"], x["status"], x["steps"]) for x in rows] == [
        ({"d_model": "32", "window": "8"}, "ok", 2), ({"d_model": "34", "window": "8"}, "failed", None)]
    table = r.output[r.output.index("sweep of 2 runs"):].splitlines()
    assert table[1].split()[:4] == ["d_model", "window", "status", "params"]
    assert table[3].split()[:3] == ["32", "8", "ok"] and table[4].split()[:3] == ["34", "8", "failed"]
    assert table[-1] == "d_model=34,window=8: d_model (34) is not divisible by heads (4)"
    r = CliRunner().invoke(app, ["train", str(f), "--sweep", "window=8", "--resume", "-o", str(ok)])
    assert r.exit_code == 2 and "--resume continues one run" in r.output


def test_the_documented_explain_sweep_is_what_bstc_prints():
    """docs/runtime.md's `bstc explain --sweep` block: the command and its exact table."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parent.parent / "docs" / "runtime.md").read_text()
    block = re.search(r"^```text\n\$ (bstc explain [^\n]*--sweep[^\n]*)\n(.*?)^```", doc, re.S | re.M)
    cmd, shown = block.group(1), block.group(2)
    r = CliRunner().invoke(app, shlex.split(cmd)[1:])
    assert r.exit_code == 1  # the documented grid has failing points
    assert r.stdout == shown
