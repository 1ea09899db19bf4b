"""`bstc experiment lm`: every row of the language-modelling table trains, is evaluated at
1x/2x/4x its length, and is matched in size; the table resumes instead of retraining."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bstc.runtime import lm_table as T
from bstc.runtime.model import resolve_model, zoo_names


@pytest.mark.parametrize("scale", ["smoke", "small"])
def test_every_row_is_matched_within_tolerance(scale):
    s = T.SCALES[scale]
    target = T.target_params(s)
    for name in T.MODELS:
        if name not in zoo_names():
            continue
        overrides, n = T.match_size(resolve_model(name), s, target)
        assert abs(n / target - 1) <= T.TOLERANCE, (name, n, target, overrides)
    if scale == "small":  # the documented target: the BST-SH zoo file at width 128, 12 layers
        assert 2.4e6 < target < 2.7e6


def test_smoke_table_end_to_end(tmp_path, monkeypatch):
    out = tmp_path / "lm"
    # Compile time dominates a smoke run: the suite's fast-codegen settings (conftest.py) are
    # inherited through os.environ.
    env = {**os.environ, "BSTC_JAX_CACHE": "off"}
    cmd = [sys.executable, "-m", "bstc.cli", "experiment", "lm", "--scale", "smoke", "-o", str(out), "-q"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((out / "lm_table.json").read_text())
    rows = {row["model"]: row for row in table["rows"]}
    expected = [m for m in T.MODELS if m in zoo_names()]
    assert sorted(rows) == sorted(expected) and len(expected) >= 10
    for name, row in rows.items():
        assert row["matched"], name
        for mult in ("1", "2", "4"):
            b = row["bpb"][mult]
            assert b is not None and math.isfinite(b) and 0 < b < 9, (name, mult, b)
    md = (out / "lm_table.md").read_text()
    assert all(T.LABELS[m] in md for m in expected)
    assert (out / "lm_table.png").read_bytes()[:4] == b"\x89PNG"
    # Resumable: a second invocation reads every finished row instead of training it again.
    # It and the refused one below compile nothing: they run in this process (typer's
    # CliRunner), without a new interpreter's imports.
    from typer.testing import CliRunner

    from bstc.cli import app

    monkeypatch.setenv("BSTC_JAX_CACHE", "off")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    r2 = CliRunner().invoke(app, cmd[3:])
    assert r2.exit_code == 0, r2.output[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Another setup in the same directory is refused, not mixed in.
    r3 = CliRunner().invoke(app, cmd[3:] + ["--steps", "7"])
    assert r3.exit_code == 2 and "another setup" in r3.stderr


def test_a_model_file_joins_the_table_by_its_stem(tmp_path):
    """`--models my_model.bst`: a user's file is matched like a zoo model and named by its stem;
    a name two rows would share, or a path that is not a model file, is refused."""
    from bstc.runtime.errors import UsageError

    mine = tmp_path / "my_hybrid.bst"
    mine.write_text(resolve_model("bst_sh_s4").read_text().replace("model bst_sh_s4", "model my_hybrid"))
    assert T.row_name(str(mine)) == "my_hybrid" and T.row_name("slide") == "slide"
    s = T.SCALES["smoke"]
    _, n = T.match_size(mine, s, T.target_params(s))
    assert abs(n / T.target_params(s) - 1) <= T.TOLERANCE
    with pytest.raises(UsageError, match="unknown model"):
        T.run_table(tmp_path / "a", "smoke", [str(tmp_path / "missing.bst")], progress=False)
    twin = tmp_path / "slide.bst"
    twin.write_text(mine.read_text())
    with pytest.raises(UsageError, match="two rows would be named slide"):
        T.run_table(tmp_path / "b", "smoke", [str(twin)], progress=False)
