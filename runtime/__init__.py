"""bstc.runtime: train, evaluate and plot compiled bstc models.

    from bstc.runtime import RunConfig, train, evaluate
    train(RunConfig(steps=100), "runs/demo", spec)      # spec: a ModelSpec (see runtime.model)

Modules: config, data (grain), trainer, checkpoint (orbax), metrics, plot, evaluator, and
commands (the CLI: `bstc train`, `bstc eval`, `bstc plot`).
"""
from __future__ import annotations

from bstc.runtime.config import OptimizerConfig, RunConfig
from bstc.runtime.errors import (CheckpointError, DataError, Interrupted, NonFiniteLossError,
                                 RunError, UsageError)
from bstc.runtime.model import ModelSpec

__all__ = ["RunConfig", "OptimizerConfig", "ModelSpec", "train", "evaluate", "RunError", "UsageError", "DataError",
           "CheckpointError", "NonFiniteLossError", "Interrupted"]


def train(*args, **kwargs):
    from bstc.runtime.trainer import train as _train

    return _train(*args, **kwargs)


def evaluate(*args, **kwargs):
    from bstc.runtime.evaluator import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
