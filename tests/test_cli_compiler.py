"""The compiler's command line (`bstc validate`, `bstc explain`, `bstc models`, `--help`), driven
through typer's CliRunner: exit statuses, diagnostics with file:line:col, JSON, no tracebacks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import bstc
from bstc import zoo
from bstc.cli import app
from conftest import THREE_MISTAKES

SH = str(zoo.models_dir() / "bst_sh_s4.bst")
SH_YAML = str(zoo.models_dir() / "bst_sh_s4.yaml")



@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _one_line_error(res):
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("bstc: error: ")
    return lines[0]


# ---- validate ----------------------------------------------------------------------------------


def test_validate_good_files(run):
    res = run("validate", SH, SH_YAML, "bst_mf_s4")  # paths and zoo names
    assert res.exit_code == 0, res.output
    assert res.output.count(": ok — model ") == 3
    assert f"{SH}: ok — model bst_sh_s4, 12 blocks" in res.output


def test_validate_reports_all_three_mistakes(run, tmp_path):
    bad = tmp_path / "three.bst"
    bad.write_text(THREE_MISTAKES)
    res = run("validate", bad)
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    heads = [ln for ln in res.output.splitlines() if ": error: " in ln]
    assert heads == [
        f"{bad}:3:3: error: seq_len (100) is not divisible by window (16)",
        f"{bad}:5:12: error: unknown layer kind 's4dd'",
        f"{bad}:6:53: error: context source 'ssm2' is not defined in block 'bst'",
    ]
    assert "  |            ^^^^" in res.output  # the caret under s4dd
    assert "= help: did you mean 's4d'?" in res.output
    assert res.output.rstrip().endswith("found 3 errors")
    assert "\x1b[" not in res.output  # no colour codes when not on a terminal


def test_validate_goes_on_after_a_bad_file(run, tmp_path):
    bad = tmp_path / "three.bst"
    bad.write_text(THREE_MISTAKES)
    res = run("validate", bad, SH)
    assert res.exit_code == 1
    assert f"{SH}: ok" in res.output and "found 3 errors" in res.output


def test_validate_with_set(run):
    assert run("validate", SH, "--set", "d_model=256").exit_code == 0
    res = run("validate", SH, "--set", "window=300")
    assert res.exit_code == 1
    assert "error: seq_len (4096) is not divisible by window (300)" in res.output
    res = run("validate", SH, "--set", "d_modle=3")
    assert res.exit_code == 1
    assert "<--set>:1:1: error: --set d_modle: the model has no parameter 'd_modle'" in res.output
    assert "= help: did you mean 'd_model'?" in res.output


def test_validate_yaml_error(run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(SH_YAML).read().replace("params:", "blokcs:"))
    res = run("validate", bad)
    assert res.exit_code == 1
    assert re.search(rf"^{re.escape(str(bad))}:\d+:1: error: unknown key 'blokcs' in the model file$", res.output, re.M)


# ---- explain -----------------------------------------------------------------------------------


def test_explain_json(run):
    res = run("explain", SH, "--set", "d_model=256", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert isinstance(data["params"], int) and data["params"] > 0
    assert isinstance(data["flops_per_token"], (int, float)) and data["flops_per_token"] > 0
    assert data["model"] == "bst_sh_s4"
    assert data["rows"][1]["shape"] == "(B, 4096, 256)"
    assert data["params"] == bstc.explain(SH, overrides={"d_model": 256}).params
    assert data["params"] < bstc.explain(SH).params


def test_explain_json_is_the_same_for_the_yaml_twin(run):
    a = json.loads(run("explain", SH, "--json", "--set", "d_model=128").stdout)
    b = json.loads(run("explain", SH_YAML, "--json", "--set", "d_model=128").stdout)
    assert a == b


def test_explain_table_shows_layer_names(run):
    res = run("explain", SH, "--set", "d_model=256")
    assert res.exit_code == 0, res.output
    for name in ("embed", "local.0.attn", "local.0.mlp", "bst.0.ssm", "bst.0.attn", "bst.2.mlp", "head"):
        assert re.search(rf"\s{re.escape(name)}\s", res.output), name
    assert "context ssm->sh" in res.output
    assert re.search(r"^total .* params · .* GFLOP/token", res.output, re.M)


def test_explain_ir(run):
    res = run("explain", SH, "--ir", "--set", "d_model=128")
    assert res.exit_code == 0
    assert res.output.startswith("model bst_sh_s4 {")
    assert "context: ssm -> sh" in res.output


def test_explain_model_error_exits_1(run, tmp_path):
    bad = tmp_path / "three.bst"
    bad.write_text(THREE_MISTAKES)
    res = run("explain", bad)
    assert res.exit_code == 1
    assert "found 3 errors" in res.output and "Traceback" not in res.output


# ---- misuse: one line, exit 2 -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["explain", "validate"])
def test_bad_set_is_one_line(run, command):
    res = run(command, SH, "--set", "foo")
    assert res.exit_code == 2
    assert _one_line_error(res) == "bstc: error: --set expects NAME=VALUE, got 'foo'"


def test_nonexistent_file_is_one_line(run, tmp_path):
    missing = tmp_path / "nope.bst"
    res = run("explain", missing)
    assert res.exit_code == 2
    assert _one_line_error(res) == f"bstc: error: no such model file: {missing}"


def test_validate_nonexistent_file_is_one_line(run, tmp_path):
    missing = tmp_path / "nope.bst"
    res = run("validate", missing)
    assert res.exit_code == 2
    assert _one_line_error(res) == f"bstc: error: no such model file: {missing}"


# ---- models and help -----------------------------------------------------------------------------


def test_models_lists_the_zoo(run):
    res = run("models")
    assert res.exit_code == 0
    for p in zoo.list_models():
        assert re.search(rf"^{re.escape(p.name)}\s", res.output, re.M), p.name
    assert "bst_sh_s4.bst" in res.output and "bst_sh_s4.yaml" in res.output


def test_help(run):
    res = run("--help")
    assert res.exit_code == 0
    assert "Usage" in res.output
    for name in ("validate", "explain", "compile", "models"):
        assert name in res.output


_COMMANDS = sorted(typer.main.get_command(app).commands)


def test_compiler_commands_are_registered():
    assert {"validate", "explain", "compile", "models"} <= set(_COMMANDS)


@pytest.mark.parametrize("command", _COMMANDS)
def test_each_subcommand_has_help(run, command):
    res = run(command, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and command in res.output
    assert "Traceback" not in res.output


def test_set_means_the_same_in_every_command():
    """`--set` values are expressions of the model language for train/eval as for
    explain/compile/bench: one parser, no YAML coercion (`on` → True, `0x10` → 16)."""
    from bstc.cli.compiler import parse_sets as compiler_sets
    from bstc.runtime.config import parse_sets as runtime_sets
    from bstc.runtime.errors import UsageError

    items = ["d_model=2 * 64", "act=on", "window=0x10", "dtype = bfloat16"]
    assert compiler_sets(items) == runtime_sets(items) == {
        "d_model": "2 * 64", "act": "on", "window": "0x10", "dtype": "bfloat16"}
    m = bstc.parse(str(Path(__file__).resolve().parent.parent / "models" / "bst_sh_s4.bst"),
                   overrides=runtime_sets(["d_model=2 * 64"]))
    assert m.dims.d_model == 128
    with pytest.raises(UsageError, match="NAME=VALUE"):
        runtime_sets(["d_model"])
