"""The compiler's commands: validate, explain, compile, models (errors: bstc.cli.errors)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bstc.cli.errors import color, command
from bstc.errors import BstcError

SET_HELP = "Override a top-level model parameter before checking, e.g. --set d_model=256 (repeatable)."


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    """`--set k=v` pairs → {k: 'v'} (`bstc.frontend.parse_set_items`, shared by every command)."""
    from bstc.frontend import parse_set_items

    try:
        return parse_set_items(sets)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def validate(
    files: List[str] = typer.Argument(..., help="Model or library files (.bst or .yaml), or zoo names."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Check model files: syntax, names, schemas, context edges, shapes. Reports every error.
    A block library is checked on its own: imports, parameters, each block's definition."""
    import bstc

    overrides = _sets_or_exit(set_)
    failed = missing = 0
    for f in files:
        try:
            lib = _library_or_none(f)
            if lib is not None:  # a block library: its imports, parameters and blocks
                from bstc.frontend import check_library

                tree = check_library(lib)
                n = len(tree.blocks)
                typer.echo(f"{f}: ok — library {tree.name}, {n} block{'s' if n != 1 else ''}: "
                           + ", ".join(b.name for b in tree.blocks))
                continue
            m = bstc.parse(f, overrides=overrides)
            if m.mesh is not None:  # the mesh section's rules against every parameter (bstc.shard_plan)
                from bstc import shard_plan
                shard_plan.plan(m)
        except BstcError as e:
            typer.echo(e.render(color=color()), err=True)
            failed += 1
            continue
        except FileNotFoundError as e:
            typer.echo(f"bstc: error: {e.args[0]}", err=True)
            missing += 1
            continue
        typer.echo(f"{f}: ok — model {m.name}, {len(m.layers)} blocks")
    if missing:  # misuse (a path that does not exist) outranks a model-file error
        raise typer.Exit(2)
    if failed:
        raise typer.Exit(1)


def _library_or_none(f: str):
    """The path of `f` when it names a block library (a file or a zoo library), else None."""
    from bstc import zoo

    p = zoo.resolve(f)
    return p if p is not None and p.is_file() and zoo.is_library(p) else None


def _sets_or_exit(set_):
    try:
        return parse_sets(set_)
    except typer.BadParameter as e:
        typer.echo(f"bstc: error: {e}", err=True)
        raise typer.Exit(2) from None


@command
def explain(
    file: str = typer.Argument(..., help="Model file (.bst or .yaml) or zoo model name."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Batch size for the memory estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ir_: bool = typer.Option(False, "--ir", help="Print the resolved IR instead of the table."),
    mesh: Optional[str] = typer.Option(None, "--mesh", help="Plan for a device mesh, e.g. --mesh data=2,tensor=4: "
                                       "each parameter's partition spec and the per-device memory."),
    sweep_: Optional[List[str]] = typer.Option(None, "--sweep", help="A grid of --set values, e.g. --sweep "
                                               "d_model=64,128 --sweep window=16,32: one row per combination "
                                               "(parameters, FLOPs per token) instead of the layer table."),
):
    """Show the expanded layer table, parameter count, FLOPs per token and memory, before any device is used."""
    import bstc
    from bstc import ir
    from bstc.passes.report import build_report

    if sweep_:
        if ir_ or mesh is not None:
            raise typer.BadParameter("--sweep prints one row per point: give --ir or --mesh without it")
        _explain_sweep(file, parse_sets(set_), sweep_, batch, as_json)
        return
    m = bstc.parse(file, overrides=parse_sets(set_))
    if ir_:
        typer.echo(ir.dump(m))
        return
    rep = build_report(m, batch=batch)
    plan = None
    if mesh is not None or m.mesh is not None:  # sharding plan (bstc.shard_plan); checks the rules
        from bstc import shard_plan
        plan = shard_plan.plan(m, mesh, batch=batch)
    if as_json:
        if plan is not None:
            d = rep.to_dict()
            d["sharding"] = shard_plan.plan_dict(plan, batch)
            typer.echo(json.dumps(d, indent=2))
        else:
            typer.echo(rep.to_json())
        return
    print_report(rep)
    if plan is not None:
        shard_plan.print_plan(plan, batch)


def _explain_sweep(file: str, sets: dict, items: list[str], batch: int, as_json: bool) -> None:
    """`bstc explain --sweep`: one row per grid point (bstc.sweep); exit 1 if a point fails."""
    from dataclasses import asdict

    from bstc.frontend import load_ast
    from bstc.passes.resolve import SETTINGS
    from bstc.sweep import check_names, explain_grid, explain_table, grid, parse_sweep_items

    try:
        sweep = parse_sweep_items(items)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    tree, _, _, errors = load_ast(file)
    errors.raise_if_any()
    try:
        check_names(sweep, sets, {a.name for a in tree.assigns}, SETTINGS)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    rows = explain_grid(file, grid(sweep), sets, batch)
    typer.echo(json.dumps([asdict(r) for r in rows], indent=2) if as_json else explain_table(rows))
    if any(r.status != "ok" for r in rows):
        raise typer.Exit(1)


def print_report(rep) -> None:
    from rich.console import Console
    from rich.table import Table

    from bstc.passes.report import human

    t = Table(title=f"model {rep.model}", box=None, header_style="bold")
    for col, just in (("#", "right"), ("name", "left"), ("kind", "left"), ("out shape", "left"),
                      ("params", "right"), ("GFLOP/tok", "right"), ("", "left")):
        t.add_column(col, justify=just)
    for r in rep.rows:
        t.add_row(str(r.index), r.name, r.kind, r.shape, human(r.params), f"{r.flops_per_token / 1e9:.4f}", r.note)
    c = Console(width=140)
    c.print(t)
    c.print(rep.summary())


@command
def compile_(
    file: str = typer.Argument(..., help="Model file (.bst or .yaml) or zoo model name."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    batch: int = typer.Option(2, "--batch", "-b", min=1, help="Batch size to compile for."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the resolved model and StableHLO text here."),
    remat: str = typer.Option("none", help="Rematerialisation policy: none | full | dots."),
    scan: bool = typer.Option(True, "--scan/--no-scan", help="Stack repeated blocks and run them with lax.scan."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Check, lower and AOT-compile the forward pass and a training step; report compile time and XLA's analyses."""
    from bstc.compile import compile_model

    overrides = parse_sets(set_)
    from bstc.lower import REMAT_POLICIES

    if remat not in REMAT_POLICIES:
        raise typer.BadParameter(f"--remat must be {', '.join(REMAT_POLICIES[:-1])} or {REMAT_POLICIES[-1]}, "
                                 f"got {remat!r}")
    if out is not None:  # an unusable -o is reported before the (long) compile, in one line
        if out.exists() and not out.is_dir():
            raise typer.BadParameter(f"-o {out} exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise typer.BadParameter(f"cannot write -o {out}: {e.strerror or e}") from None
    res = compile_model(file, overrides=overrides, batch=batch, remat=remat, scan=scan, out_dir=out)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    from bstc.passes.report import bytes_h, human

    typer.echo(f"model {res['model']}: {human(res['params'])} params ({res['params']:,}), "
               f"batch {batch} × seq_len {res['seq_len']}")
    typer.echo(f"  check + lower      {res['lower_s']:.2f} s")
    typer.echo(f"  compile forward    {res['compile_forward_s']:.2f} s")
    typer.echo(f"  compile train step {res['compile_train_s']:.2f} s")
    mem = res.get("train_memory") or {}
    if mem:
        typer.echo("  XLA memory (train step): " + ", ".join(f"{k} {bytes_h(v)}" for k, v in mem.items()))
    if res.get("xla_forward_flops"):
        typer.echo(f"  XLA cost (forward): {res['xla_forward_flops'] / 1e9:.3g} GFLOP "
                   f"(explain says {res['explain_forward_flops'] / 1e9:.3g} GFLOP)")
        if res.get("scanned_stages"):
            typer.echo("    note: XLA's cost analysis counts a lax.scan body once, not once per iteration; "
                       "compile with --no-scan to compare FLOPs")
    if out:
        typer.echo(f"  wrote {out}/model.resolved.bst, {out}/forward.stablehlo.mlir, {out}/train_step.stablehlo.mlir")


def models():
    """List the model zoo shipped with bstc."""
    from bstc import zoo

    for p in zoo.list_models():
        first = ""
        for line in p.read_text().splitlines():
            if line.startswith("#"):
                first = line.lstrip("# ").strip()
                break
        typer.echo(f"{p.name:28s} {first}")
    typer.echo(f"({zoo.models_dir()})")


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(explain)
    app.command("compile")(compile_)
    app.command()(models)
