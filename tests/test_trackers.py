"""Optional trackers: --tracker wandb (offline by default) besides metrics.jsonl and TensorBoard."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bstc.runtime import metrics
from bstc.runtime.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_tracker_and_missing_extra_are_one_line(monkeypatch):
    with pytest.raises(UsageError, match=r"^unknown tracker 'mlflow' \(choose from wandb; metrics.jsonl and "
                                         r"TensorBoard are always written\)$"):
        metrics.check_tracker("mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UsageError, match=r"^the wandb tracker needs the optional dependency wandb: "
                                         r"pip install 'bstc\[wandb\]'$"):
        metrics.check_tracker("wandb")
    metrics.check_tracker(None)


def test_wandb_logs_offline_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default is offline: nothing leaves the machine
    sys.path.insert(0, str(ROOT / "tests"))
    from test_runtime_train import QUIET, cfg, standin

    from bstc.runtime import train

    run = tmp_path / "run"
    train(cfg(steps=2, ckpt_every=2, tracker="wandb"), run, standin(), **QUIET)
    logs = sorted((run / "wandb").glob("offline-run-*/run-bstc-*.wandb"))
    assert len(logs) == 1 and b"train/loss" in logs[0].read_bytes()
    assert (run / "metrics.jsonl").is_file()  # the JSONL log is written as always
