"""The command line's one error policy: every command runs through `command`, so no error a
user can cause prints a traceback.

Exit codes (docs/runtime.md):

| code | meaning |
| ---: | --- |
| 0 | success |
| 1 | the input was read but is wrong: model-file diagnostics (every error, located), a failed run (a diverging loss, an unusable checkpoint, out of device memory), a sweep or `bench check` with a failing point |
| 2 | misuse: a bad flag or `--set`, a file or run directory that is not there or not one |
| 128 + n | stopped by signal n after saving a checkpoint (130: Ctrl-C, 143: SIGTERM) |
"""
from __future__ import annotations

import functools
import sys

import typer

from bstc.errors import BstcError, out_of_memory
from bstc.runtime.errors import RunError


def color() -> bool:
    return sys.stderr.isatty()


def fail(message: str, code: int = 2):
    """Stop a command with a one-line message (misuse: 2)."""
    typer.echo(f"bstc: error: {message}", err=True)
    raise typer.Exit(code)


def command(fn):
    """Model-file errors → rendered diagnostics, exit 1; runtime errors → one line with their
    exit code (2 for misuse, 1 for a failed run, 128 + signal when interrupted); bad
    parameters and missing files → one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BstcError as e:
            typer.echo(e.render(color=color()), err=True)
            raise typer.Exit(1) from None
        except RunError as e:
            interrupted = e.exit_code >= 128
            typer.echo(f"bstc: {e}" if interrupted else f"bstc: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except typer.BadParameter as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(str(e.args[0] if e.args else e))
        except Exception as e:
            if not out_of_memory(e):
                raise  # a fault of bstc or XLA: the traceback is what a bug report needs
            fail(f"out of memory on this device ({memory_detail(e)}); try a smaller --batch or seq_len, or "
                 "--remat full (recompute activations in the backward pass)", code=1)

    return wrapper


def memory_detail(e: BaseException) -> str:
    """XLA's first line without its status prefix, e.g. 'Out of memory allocating 877549176016 bytes.'"""
    lines = str(e).strip().splitlines() or ["RESOURCE_EXHAUSTED"]
    return lines[0].removeprefix("RESOURCE_EXHAUSTED:").strip().rstrip(".")
