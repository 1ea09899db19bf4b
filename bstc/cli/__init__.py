"""The `bstc` command (typer): one package, one error policy (bstc.cli.errors: diagnostics
for model files, one line for misuse, documented exit codes, never a traceback).

Modules: compiler (validate, explain, compile, models), run (train, eval, plot, export,
tokenizer, data, sweeps), experiment (lm, recall, recall-table), sample, bench (layers, model,
compile, decode, check, report).
"""
from __future__ import annotations

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


# Each module of the package registers its commands (`register(app)`).
from bstc.cli import bench, compiler, experiment, run, sample  # noqa: E402

for _mod in (compiler, run, experiment, sample, bench):
    _mod.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
