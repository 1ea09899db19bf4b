"""The run directory's lock: one `bstc train` at a time per directory.

The lock is an advisory `flock` on `<run>/.lock`, which the kernel releases when its holder
exits, however it exits — so a run killed with SIGKILL leaves a lock file that the next run
finds unlocked and simply takes over (the file's pid is only used in messages)."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from bstc.runtime.errors import UsageError

LOCK_NAME = ".lock"


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
        self.path = Path(run_dir) / LOCK_NAME
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
