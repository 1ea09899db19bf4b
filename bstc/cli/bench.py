"""The `bstc bench` commands: layers, model, compile, decode, check, report (the benchmarks
themselves: bstc.bench, bstc.bench_runs, bstc.bench_report)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import jax
import typer

from bstc.bench import (CANDIDATES, DEFAULT_LAYERS, REFERENCE, BenchConfig, machine_info, overrides_per_model,
                        plot_layers, ratios, run_layers, run_models)
from bstc.bench_runs import run_check, run_compile, run_decode


bench_app = typer.Typer(help="Side-by-side speed on this machine: single layers, or a model's training step.",
                        no_args_is_help=True)


def _int_list(s: str, what: str) -> list[int]:
    try:
        out = [int(float(x)) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{what} expects comma-separated integers, got {s!r}") from None
    if not out or min(out) <= 0:
        raise typer.BadParameter(f"{what} expects positive integers, got {s!r}")
    return out


def _fail(msg: str) -> None:
    from bstc.cli.errors import fail

    fail(msg)


@bench_app.command("layers")
def layers_cmd(
    lengths: str = typer.Option("1024,2048,4096,8192,16384", "--lengths", help="Sequence lengths, comma-separated."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repeats per candidate and length (median)."),
    d_model: int = typer.Option(256, "--d-model", min=1, help="Model width."),
    heads: int = typer.Option(4, "--heads", min=1, help="Attention heads."),
    window: int = typer.Option(256, "--window", min=1, help="Block length W (BRT: also its S = W states)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    ssm_state: int = typer.Option(64, "--ssm-state", min=2, help="S4D state size N."),
    context_states: int = typer.Option(16, "--context-states", min=2, help="BST-MF: S filters / context vectors."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="Candidates, comma-separated (default: all but gss): "
                                        + ", ".join(CANDIDATES)),
    max_seconds: float = typer.Option(30.0, "--max-seconds", help="Skip a candidate at lengths where one "
                                      "forward+backward would take longer than this (extrapolated)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here (and a PNG plot beside it)."),
):
    """Time one layer of each kind, forward + backward, over sequence lengths; ratios against BST-SH."""
    from rich.console import Console
    from rich.table import Table

    try:
        lens = _int_list(lengths, "--lengths")
    except typer.BadParameter as e:
        _fail(str(e))
    names = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else list(DEFAULT_LAYERS)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        _fail(f"unknown candidate {unknown[0]!r}; choose from {', '.join(CANDIDATES)}")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)  # the ratios need it
    bad = [L for L in lens if L % window]
    if bad:
        _fail(f"every length must be a multiple of --window {window}; {bad[0]} is not")
    if d_model % heads:
        _fail(f"--d-model {d_model} is not divisible by --heads {heads}")
    cfg = BenchConfig(d_model=d_model, heads=heads, window=window, batch=batch, ssm_state=ssm_state,
                      context_states=context_states)
    err = Console(stderr=True)
    err.print(f"[dim]bench layers on {jax.default_backend()} ({os.cpu_count()} cores): D={d_model} H={heads} "
              f"W={window} B={batch}, {repeats} repeats, lengths {', '.join(map(str, lens))}[/dim]")
    results = run_layers(names, lens, cfg, repeats, max_seconds, log=lambda s: err.print(f"[dim]{s}[/dim]"))
    rat = ratios(results)

    table = Table(title=f"forward + backward per layer, median ms (× BST-SH) — D={d_model}, H={heads}, "
                        f"W={window}, batch {batch}, {jax.default_backend()}")
    table.add_column("layer")
    for L in lens:
        table.add_column(f"L={L}", justify="right")
    notes = []
    for name in names:
        row = [CANDIDATES[name].label]
        for L in lens:
            r = next(x for x in results if x.candidate == name and x.length == L)
            if r.skipped and not r.times_s:
                row.append("skipped")
                notes.append(f"{CANDIDATES[name].label} at L={L}: {r.skipped}")
            else:
                cell = f"{1e3 * r.median_s:.1f}"
                if (name, L) in rat and name != REFERENCE:
                    cell += f" ({rat[(name, L)]:.2f}×)"
                if r.skipped:
                    cell += " *"
                    notes.append(f"{CANDIDATES[name].label} at L={L}: {r.skipped}")
                row.append(cell)
        table.add_row(*row)
    console = Console()
    console.print(table)
    for n in notes:
        console.print(f"  note: {n}")

    if json_out is not None:
        png = json_out.with_suffix(".png")
        data = {"command": "bench layers", "machine": machine_info(),
                "config": {"d_model": d_model, "heads": heads, "window": window, "batch": batch,
                           "ssm_state": ssm_state, "context_states": context_states, "repeats": repeats,
                           "lengths": lens, "max_seconds": max_seconds, "reference": REFERENCE},
                "candidates": {n: {"label": CANDIDATES[n].label,
                                   "sublayers": [s.kind for s in CANDIDATES[n].subs(cfg)]} for n in names},
                "results": [{"candidate": r.candidate, "length": r.length, "times_s": r.times_s,
                             "median_s": r.median_s, "compile_s": r.compile_s, "params": r.params,
                             "flops_per_token": r.flops_per_token,
                             "ratio_vs_reference": rat.get((r.candidate, r.length)), "skipped": r.skipped}
                            for r in results],
                "plot": png.name}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(data, indent=2))
        plot_layers(results, png, f"one layer, forward + backward — D={d_model}, W={window}, "
                                  f"{jax.default_backend()} ({os.cpu_count()} cores)")
        console.print(f"wrote {json_out} and {png}")


@bench_app.command("model")
def model_cmd(
    models: List[str] = typer.Argument(..., help="Model files or zoo model names; several are timed "
                                       "interleaved in one process, with ratios to the first."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a top-level model parameter, "
                                             "e.g. --set d_model=256 (repeatable; applied to the models that "
                                             "define it)."),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Batch size."),
    steps: int = typer.Option(5, "--steps", min=1, help="Timed training steps per model (after one warm-up step)."),
    scan: bool = typer.Option(True, "--scan/--no-scan", help="Stack repeated blocks and run them with lax.scan."),
    remat: str = typer.Option("none", "--remat", help="Rematerialisation policy of every model: none, full or "
                              "dots (as bstc train --remat): long sequences whose activations do not fit."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here."),
):
    """Time whole models' training steps (AdamW), interleaved: step time, tokens/s, compile time, MFU."""
    from rich.console import Console
    from rich.table import Table

    from bstc import zoo
    from bstc.cli.compiler import parse_sets
    from bstc.cli.errors import command as cli_errors

    from bstc.lower import REMAT_POLICIES

    if remat not in REMAT_POLICIES:
        _fail(f"unknown remat policy {remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    paths = []
    for name in models:
        path = zoo.resolve(name)
        if path is None:
            _fail(f"no model file or zoo model named {name!r}")
        paths.append(path)

    @cli_errors
    def go():
        ovs = overrides_per_model(paths, parse_sets(set_))
        return run_models([str(p) for p in paths], ovs, batch, steps, scan=scan, remat=remat)

    outs = go()
    first, mach = outs[0], outs[0]["machine"]
    console = Console()
    t = Table(title=f"training step, batch {batch} × {first['seq_len']} tokens, median of {steps} interleaved "
                    f"steps — {mach['backend']} ({mach['cpu_count']} cores)")
    for c in ("model", "params", "train FLOPs/token", "step (ms)", f"× {first['model']}", "tokens/s", "compile (s)",
              "MFU", "loss (first → last)"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for o in outs:
        t.add_row(o["model"], f"{o['params'] / 1e6:.2f} M", f"{o['train_flops_per_token'] / 1e6:.2f} M",
                  f"{1e3 * o['step_s']:.1f}", f"{o['ratio_vs_first']:.2f}", f"{o['tokens_per_s']:,.0f}",
                  f"{o['compile_s']:.1f}", f"{100 * o['mfu']:.1f} %", f"{o['losses'][0]:.3f} → {o['losses'][-1]:.3f}")
    console.print(t)
    console.print(f"matmul peak (measured, f32 2048²): {first['matmul_peak_flops'] / 1e9:.2f} GFLOP/s; "
                  "MFU = 3 × forward FLOPs/token (explain) × tokens/s ÷ that peak")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        data = outs[0] if len(outs) == 1 else {"command": "bench model", "models": outs}
        json_out.write_text(json.dumps(data, indent=2, default=str))
        console.print(f"wrote {json_out}")


@bench_app.command("compile")
def compile_cmd(
    model: str = typer.Argument("bst_sh_s4", help="A model file with a `groups` parameter (the zoo's BST files have one)."),
    groups: str = typer.Option("1,2,4,8", help="Values of `groups` to compile (each group is 4 layers in the zoo)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a top-level model parameter (repeatable)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Compile every configuration this many times (in "
                                "rounds) and keep the fastest."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here."),
):
    """Compile time against depth: scanned stacks stay nearly flat, unrolled ones grow."""
    from rich.console import Console
    from rich.table import Table

    from bstc.cli.compiler import parse_sets
    from bstc.cli.errors import command as cli_errors

    gs = _int_list(groups, "--groups")
    overrides = {"d_model": 64, "heads": 2, "seq_len": 256, "window": 64, **parse_sets(set_)}
    rows = cli_errors(lambda: run_compile(model, gs, overrides, repeats))()
    base = {r["scan"]: r["compile_train_s"] for r in rows if r["groups"] == gs[0]}
    t = Table(title=f"train-step compile time vs depth — {model}, " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    for c in ("layers", "lowering", "params", "compile fwd (s)", "compile train (s)", "× smallest"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(4 * r["groups"]), "scan" if r["scan"] else "unrolled", f"{r['params']:,}",
                  f"{r['compile_forward_s']:.2f}", f"{r['compile_train_s']:.2f}",
                  f"{r['compile_train_s'] / base[r['scan']]:.2f}")
    Console().print(t)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"rows": rows, "overrides": overrides, "machine": machine_info()}, indent=2))


@bench_app.command("decode")
def decode_cmd(
    model: str = typer.Argument("bst_sh_s4", help="A model file or zoo name whose layers all have a decode step."),
    tokens: int = typer.Option(256, "--tokens", "-n", min=1, help="Bytes to generate per timing."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timings of each way (after one to compile)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a top-level model parameter (repeatable)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here."),
):
    """Sampling speed: cached decoding against recomputing the forward pass for every token."""
    from rich.console import Console
    from rich.table import Table

    from bstc import zoo
    from bstc.cli.compiler import parse_sets
    from bstc.cli.errors import command as cli_errors

    path = zoo.resolve(model)
    if path is None:
        _fail(f"no model file or zoo model named {model!r}")
    overrides: dict = {}

    @cli_errors
    def go():
        from bstc.frontend import parse_ast

        names = {a.name for a in parse_ast(str(path))[0].assigns}  # defaults only for what the file defines
        defaults = {"d_model": 128, "heads": 4, "seq_len": 1024, "window": 128, "groups": 1}
        overrides.update({k: v for k, v in defaults.items() if k in names})
        overrides.update(parse_sets(set_))
        try:
            return run_decode(str(path), dict(overrides), tokens, repeats)
        except ValueError as e:
            _fail(str(e))

    out = go()
    t = Table(title=f"sampling {tokens} bytes — {out['model']}, "
                    + ", ".join(f"{k}={v}" for k, v in overrides.items())
                    + f"; {out['machine']['backend']} ({out['machine']['cpu_count']} cores)")
    for c in ("decoding", "ms / token", "tokens / s", "× cached"):
        t.add_column(c, justify="right")
    for way, s_tok in out["s_per_token"].items():
        t.add_row(way, f"{1e3 * s_tok:.2f}", f"{1 / s_tok:,.0f}", f"{s_tok / out['s_per_token']['cached']:.1f}")
    Console().print(t)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2))


@bench_app.command("check")
def check_cmd(
    sizes: str = typer.Option("0.25,0.5,1", "--sizes", help="Model-file sizes in MB (comma-separated)."),
):
    """Time `bstc validate` on large generated model files: is it linear, and do the passes
    after parsing cost no more than the parse?"""
    try:
        mbs = [float(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        _fail(f"--sizes expects numbers, got {sizes!r}")
    if not mbs or min(mbs) <= 0:
        _fail("--sizes must be positive")
    rows = run_check(mbs)
    base = rows[0]
    for r in rows:
        typer.echo(f"{r['megabytes']:.2f} MB: front end {r['front_end_s']:.2f} s, passes after it "
                   f"{r['passes_s']:.2f} s ({r['passes_s'] / r['front_end_s']:.2f}× the front end); "
                   f"total {r['total_s'] / base['total_s']:.2f}× the {base['megabytes']:.2f} MB file's for "
                   f"{r['megabytes'] / base['megabytes']:.2f}× the size")


@bench_app.command("report")
def report_cmd(
    out: Path = typer.Option(Path("bench-report"), "--out", "-o", help="Directory for report.md, report.json, layers.png."),
    preset: str = typer.Option("cpu", "--preset", help="Sizes: 'cpu' (tiny, seconds) or 'paper' (D 1024, H 8, "
                               "W 512, L 4k–32k: one accelerator)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="Override the preset's sequence lengths."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Override the per-step time guard."),
    budget: Optional[float] = typer.Option(None, "--budget", help="Seconds for the whole report (0: no limit; "
                                           "paper: 480): no new layer length is started after 60% of it."),
):
    """One Markdown report of the speed claims: layers, training step with MFU, sampling."""
    import dataclasses

    from bstc.bench_report import PRESETS, write_report

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if lengths is not None:
        lens = _int_list(lengths, "--lengths")
        bad = [L for L in lens if L % p.layers.window]
        if bad:
            _fail(f"every length must be a multiple of the window {p.layers.window}; {bad[0]} is not")
        p = dataclasses.replace(p, lengths=tuple(lens))
    if max_seconds is not None:
        p = dataclasses.replace(p, max_seconds=max_seconds)
    if budget is not None:
        if budget < 0:
            _fail(f"--budget must be 0 (no limit) or a number of seconds, got {budget:g}")
        p = dataclasses.replace(p, budget_s=budget or None)
    write_report(out, p, log=lambda s: typer.echo(s, err=True))
    typer.echo(f"wrote {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
