"""The run config: a small typed record, read from YAML and/or flags, saved into the run directory.

A run is fully described by the model file (copied into the run directory) plus this config,
so `bstc eval RUN_DIR` and `bstc train --resume` need nothing else.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bstc.runtime.errors import UsageError

TASKS = ("recall", "copy", "induction")
OPTIMIZERS = ("adamw", "adafactor")


def _type_ok(value, annotation: str) -> bool:
    """`value` against a field's annotation string (`int`, `float`, `str | None`, `dict[...]`,
    a class name)."""
    for opt in (o.strip() for o in annotation.split("|")):
        if (opt == "None" and value is None
                or opt == type(value).__name__
                or opt == "int" and isinstance(value, int) and not isinstance(value, bool)
                or opt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool)
                or opt == "str" and isinstance(value, str)
                or opt.startswith("dict") and isinstance(value, dict)
                or opt.startswith("list") and isinstance(value, list)):
            return True
    return False


def _type_words(annotation: str) -> str:
    words = {"int": "an integer", "float": "a number", "str": "a string", "None": "empty (null)",
             "OptimizerConfig": "an OptimizerConfig"}
    return " or ".join(words.get(o.strip(), "a list" if o.strip().startswith("list") else "a mapping")
                       for o in annotation.split("|"))


def _check_types(obj) -> None:
    """Types before values, so `steps: "five"` is one clear line."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not _type_ok(v, f.type):
            raise UsageError(f"setting '{f.name}' must be {_type_words(f.type)}, got {v!r}")


def _from_mapping(cls, d: Any, where: str, what: str, also: tuple[str, ...] = ()):
    """`cls(**d)` for a YAML mapping: unknown keys named (with a suggestion), YAML 1.1's `1e-3`
    (no dot, read as a string) taken as the number, every error one line prefixed by `where`.
    `also`: other names a typo may have meant."""
    if not isinstance(d, dict):
        raise UsageError(f"{where}: expected a mapping of {what}s")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(str(k), names + list(also), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"{where}: unknown {what} '{k}'{hint}")
    d = dict(d)
    for f in dataclasses.fields(cls):
        if f.type == "float" and isinstance(d.get(f.name), str):
            try:
                d[f.name] = float(d[f.name])
            except ValueError:
                pass
    try:
        return cls(**d)
    except (UsageError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its learning-rate schedule: linear warmup to `lr`, then cosine decay to
    `lr * min_lr_ratio` at the run's last step (bstc.runtime.optim builds the optax chain)."""

    name: str = "adamw"                   # adamw | adafactor
    lr: float = 2e-3                      # peak learning rate
    warmup: int | None = None             # None: 10% of the run's steps (at most 100)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1             # applied to the parameters whose role decays them
    b1: float = 0.9                       # AdamW's moment decays
    b2: float = 0.95
    clip: float = 1.0                     # global-norm gradient clipping; 0 disables it

    def __post_init__(self):
        _check_types(self)
        problems = [
            (self.name in OPTIMIZERS, f"unknown optimizer '{self.name}' (choose from {', '.join(OPTIMIZERS)})"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup is None or self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.clip >= 0, f"clip must be >= 0, got {self.clip}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.b1 < 1, f"b1 must be in [0, 1), got {self.b1}"),
            (0 <= self.b2 < 1, f"b2 must be in [0, 1), got {self.b2}"),
        ]
        for ok, msg in problems:
            if not ok:
                raise UsageError(msg)

    def warmup_steps(self, steps: int) -> int:
        return self.warmup if self.warmup is not None else min(100, steps // 10)

    def replace(self, **changes: Any) -> "OptimizerConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Before the optimizer group, these were top-level run settings and `optimizer` held the name
# alone; config.yaml files of earlier run directories (and `--resume` of them) still read.
FLAT_OPTIMIZER_KEYS = ("lr", "warmup", "min_lr_ratio", "weight_decay", "b1", "b2", "clip")


def _group_optimizer(d: dict[str, Any], where: str) -> dict[str, Any]:
    """A run-config mapping with its optimizer settings, flat or grouped, as one OptimizerConfig."""
    group = d.get("optimizer", {})
    group = {"name": group} if isinstance(group, str) else group
    if not isinstance(group, dict):
        raise UsageError(f"{where}: setting 'optimizer' must be a mapping (optimizer: {{lr: 2e-3}}), got {group!r}")
    d, group = dict(d), dict(group)
    for k in FLAT_OPTIMIZER_KEYS:
        if k in d:
            if k in group:
                raise UsageError(f"{where}: '{k}' is given twice, at the top level and under optimizer: keep one")
            group[k] = d.pop(k)
    d["optimizer"] = _from_mapping(OptimizerConfig, group, where, "optimizer setting")
    return d


@dataclass
class RunConfig:
    """Everything about a run that is not in the model file."""

    model: str = "bst_sh_s4"              # a zoo name or a path to a .bst / .yaml file
    set: dict[str, Any] = field(default_factory=dict)  # model parameter overrides (--set k=v)
    preset: str = "auto"                  # auto: tiny for zoo models, none for user files; tiny; none
    data: str | None = None               # None: the embedded stdlib corpus; else file/dir/glob
    text_field: str = "text"              # the text of a JSON Lines / Parquet / ArrayRecord record
    tokenizer: str | None = None          # None: bytes; else a tokenizers JSON or SentencePiece model file
    tracker: str | None = None            # also log to this tracker (wandb, offline by default)
    task: str | None = None               # a synthetic task instead of text: recall|copy|induction
    task_args: dict[str, Any] = field(default_factory=dict)  # e.g. {pairs: 4}
    seq_len: int | None = None            # None: the model's seq_len
    length_mix: list[int] | None = None   # tasks: batch b (from 0) has seq_len × length_mix[b mod k] tokens
    steps: int = 300
    batch: int = 8                        # sequences per optimizer step (all micro-batches)
    accum: int = 1                        # gradient-accumulation micro-batches per step
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # YAML: optimizer: {lr: 1e-3, ...}
    seed: int = 0
    eval_every: int = 100                 # validation loss every N steps (0: only at the end)
    eval_batches: int = 4
    ckpt_every: int = 100                 # checkpoint every N steps (and always at the end)
    keep: int = 3                         # keep the last N checkpoints
    log_every: int = 1
    remat: str = "none"                   # rematerialise each block in the backward pass: none | full | dots
                                          # (less memory for activations, and faster compiles of deep
                                          # scanned stacks, for a second forward pass; the math is the same)
    mesh: str | None = None               # device mesh, e.g. "data=2,tensor=4" (bstc.placement; default:
                                          # the model's mesh section, else data parallel over all devices)
    sweep: dict[str, Any] = field(default_factory=dict)  # a grid of --set values, {d_model: [64, 128]}:
                                          # one run per combination (bstc.runtime.sweep)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        _check_types(self)
        need(all(isinstance(k, str) and k.isidentifier() for k in self.set),
             f"setting 'set' must map parameter names to values, got {self.set!r}")
        for name in ("eval_every", "ckpt_every", "eval_batches"):  # 0: none
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch >= 1, f"batch must be >= 1, got {self.batch}")
        need(self.accum >= 1, f"accum must be >= 1, got {self.accum}")
        need(self.batch % self.accum == 0,
             f"batch ({self.batch}) must be divisible by accum ({self.accum})")
        need(self.task is None or self.task in TASKS,
             f"unknown task '{self.task}' (choose from {', '.join(TASKS)})")
        need(not (self.task and self.data), "give either --data or --task, not both")
        need(bool(self.text_field.strip()), "text_field must name a field, got an empty string")
        need(not (self.task and self.tokenizer), "a tokenizer reads text: give --tokenizer or --task, not both")
        need(self.preset in ("auto", "tiny", "none"),
             f"unknown preset '{self.preset}' (choose from auto, tiny, none)")
        need(self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        from bstc.lower import REMAT_POLICIES

        need(self.remat in REMAT_POLICIES,
             f"unknown remat policy '{self.remat}' (choose from {', '.join(REMAT_POLICIES)})")
        if self.sweep:
            from bstc.runtime.sweep import sweep_from_config

            try:
                sweep_from_config(self.sweep)
            except ValueError as e:
                raise UsageError(str(e)) from None
        need(self.seq_len is None or self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        if self.length_mix is not None:
            need(isinstance(self.length_mix, list) and len(self.length_mix) >= 1
                 and all(isinstance(m, int) and m >= 1 for m in self.length_mix),
                 f"length_mix must be a list of integers >= 1, got {self.length_mix}")
            need(bool(self.task), "length_mix needs --task (text is packed at one length)")

    @property
    def micro_batch(self) -> int:
        return self.batch // self.accum

    # ---- YAML -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        if not isinstance(d, dict):
            raise UsageError(f"{where}: expected a mapping of run settings")
        return _from_mapping(cls, _group_optimizer(d, where), where, "setting", also=FLAT_OPTIMIZER_KEYS)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        path = Path(path)
        from bstc.errors import BstcError, read_text_file

        try:
            d = yaml.safe_load(read_text_file(path, "config file")) or {}
        except BstcError as e:
            raise UsageError(str(e.diagnostics[0].span) + ": " + e.diagnostics[0].message) from None
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(d, where=str(path))

    def replace(self, **changes: Any) -> "RunConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """`--set d_model=128 --set dtype=bfloat16` -> {"d_model": "128", "dtype": "bfloat16"}: the
    values are expressions of the model language, parsed by the checker as for every command
    (`bstc.frontend.parse_set_items`)."""
    from bstc.frontend import parse_set_items

    try:
        return parse_set_items(items)
    except ValueError as e:
        raise UsageError(str(e)) from None
