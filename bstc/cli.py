"""The `bstc` command (typer). Model-file errors print as diagnostics, never as tracebacks."""
from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="bstc",
    help="bstc: declare hybrid SSM / attention models in a small language, check them, "
    "explain their cost, compile them to JAX, and train, evaluate and sample them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Sub-command groups defined in other modules register themselves here. Each module has a
# `register(app)` function; keeping them apart lets the compiler, runtime and benchmarks grow
# independently.
_COMMAND_MODULES = ("bstc.commands", "bstc.runtime.commands", "bstc.runtime.sampling", "bstc.bench")

for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as e:  # a part not built yet must not break the others
        if e.name != _name:
            raise
        continue
    _mod.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
