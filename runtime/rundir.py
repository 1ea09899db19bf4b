"""The run directory: its layout (`RunFiles`, the one place that knows each file's name) and
its lock (one `bstc train` at a time per directory).

The lock is an advisory `flock` on `<run>/.lock`, which the kernel releases when its holder
exits, however it exits — so a run killed with SIGKILL leaves a lock file that the next run
finds unlocked and simply takes over (the file's pid is only used in messages)."""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from bstc.runtime.errors import UsageError

LOCK_NAME = ".lock"


class RunFiles:
    """Where everything of a run lives. Every reader and writer of a run directory (trainer,
    evaluator, export, plots, metrics, the CLI) takes its paths from here."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")   # the RunConfig
    info = property(lambda self: self.root / "run.json")        # model name, file, overrides, fingerprint
    checkpoints = property(lambda self: self.root / "checkpoints")
    set_aside = property(lambda self: self.root / "checkpoints.set-aside")  # newer ones moved away on resume
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tb")
    loss_plot = property(lambda self: self.root / "loss.png")
    eval_dir = property(lambda self: self.root / "eval")
    lock = property(lambda self: self.root / LOCK_NAME)

    def model_file(self, suffix: str = ".bst") -> Path:
        """The run's own copy of its model file."""
        return self.root / ("model" + (suffix or ".bst"))

    def tokenizer(self, kind: str = "huggingface") -> Path:
        """Where the run keeps its copy of a tokenizer (kind: huggingface | sentencepiece)."""
        return self.root / ("tokenizer.json" if kind == "huggingface" else "tokenizer.model")

    def saved_tokenizer(self) -> Path | None:
        """The run's tokenizer copy, if it has one (a byte-level run has none)."""
        return next((p for p in (self.tokenizer("huggingface"), self.tokenizer("sentencepiece")) if p.is_file()), None)

    def is_run(self) -> bool:
        return self.config.is_file() and self.info.is_file()

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def read(self):
        """(RunConfig, run.json's dict) of a finished or interrupted run; a one-line error for
        a directory that is not a run."""
        from bstc.runtime.config import RunConfig

        if not self.is_run():
            raise UsageError(f"'{self.root}' is not a bstc run directory (no config.yaml / run.json)")
        return RunConfig.load(self.config), json.loads(self.info.read_text())

    def write(self, cfg, spec) -> None:
        """The run's config, a copy of its model file and run.json (a ModelSpec's name, file,
        overrides, fingerprint and sizes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg.save(self.config)
        model_file = None
        if spec.file is not None:
            copy = self.model_file(spec.file.suffix)
            if spec.file.resolve() != copy.resolve():
                # A model that imports block libraries is kept as one self-contained file (the
                # same IR), so the run rebuilds it however the libraries later move or change.
                suffix, text = _self_contained(spec)
                copy = self.model_file(suffix)
                if text is not None:
                    copy.write_text(text)
                else:
                    shutil.copyfile(spec.file, copy)
            model_file = copy.name
        info: dict[str, Any] = dict(model=spec.name, model_file=model_file, overrides=spec.overrides,
                                    fingerprint=spec.fingerprint, vocab=spec.vocab, seq_len=spec.seq_len,
                                    window=spec.window, created=_dt.datetime.now().isoformat(timespec="seconds"))
        self.info.write_text(json.dumps(info, indent=2) + "\n")


def _self_contained(spec) -> tuple[str, str | None]:
    """The suffix and text of the run's copy of a model file that imports libraries: the file
    with its `.bst` libraries written in (`bundle`, comments kept) or, where that cannot be done
    in text (YAML on either side), the checked model printed as `.bst` (`to_bst`: the same IR,
    every parameter still declared, so the run's overrides apply to it as before). Text None:
    nothing is imported, copy the file as it is."""
    from bstc.frontend import bundle, parse_ast
    from bstc.ir import to_bst

    tree = parse_ast(spec.file)[0]  # syntax only: most model files import nothing
    if tree is None or not tree.imports:
        return spec.file.suffix, None
    text = bundle(spec.file)
    if text is not None:
        return ".bst", text
    return (".bst", to_bst(spec.model_ir)) if spec.model_ir is not None else (spec.file.suffix, None)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be one: an existing file, or a place that cannot
    be written (`/proc/x`, a read-only mount). Creates the directory."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} exists and is not a directory: choose another -o")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from None


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunFiles(run_dir).lock
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        check_run_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot write the run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.path.parent} is in use by another `bstc train` ({holder}); "
                             "wait for it to finish or choose another -o") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
