"""`bstc bench`: side-by-side speed on one machine, in one run.

* `bstc bench layers` times one layer of each kind — forward + backward (the gradient of the sum
  of the outputs with respect to the parameters and the input) — over a range of sequence
  lengths. The candidates are interleaved within every repeat (so a slow patch of the machine
  hits them all alike), the median is reported, and every time is also given as a ratio to
  BST-SH, the paper's reference layer.
* `bstc bench model A [B …]` times whole models' training steps (AdamW), interleaved in one
  process like the layers: tokens/s, step time and its ratio to the first model, compile time,
  and MFU against a matmul peak measured on the same machine in the same run.

A "layer" is what a model file stacks: pre-norm sublayers with residuals, MLP included, e.g.
BST-SH = s4d (context source) + block_attention (context: ssm -> sh) + mlp; the Block-Recurrent
Transformer's recurrent layer holds its own norms and MLP. Each candidate is written as a
one-block model file (`layer_text`) and lowered by the public lowering, so it is built exactly
as in a model, and its FLOPs are `bstc explain`'s.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import typer

# ---- single layers, built from the registry --------------------------------------------------------


@dataclass(frozen=True)
class Sub:
    """One sublayer of a bench layer: kind, given arguments, pre-norm, residual, context source."""

    kind: str
    args: dict
    norm: bool = True
    residual: bool = True
    context: tuple[int, str] | None = None  # (index of the source sublayer, variant)


@dataclass(frozen=True)
class Candidate:
    name: str
    label: str
    subs: Callable[["BenchConfig"], list[Sub]]
    quadratic: bool = False  # cost grows as L² (the --max-seconds guard extrapolates with it)


@dataclass(frozen=True)
class BenchConfig:
    d_model: int = 256
    heads: int = 4
    window: int = 256
    batch: int = 1
    ssm_state: int = 64
    context_states: int = 16  # S of BST-MF

    @property
    def mlp(self) -> Sub:
        return Sub("mlp", {"hidden": 4 * self.d_model, "act": "gelu"})


def _bst(conv: str, variant: str) -> Callable[[BenchConfig], list[Sub]]:
    def subs(c: BenchConfig) -> list[Sub]:
        filters = {"sh": 1, "mh": c.heads, "mf": c.context_states}[variant]
        src = {"state": c.ssm_state} if conv in ("s4d", "mamba") else {}
        return [Sub(conv, {**src, "filters": filters}, residual=False),
                Sub("block_attention", {"window": c.window}, context=(0, variant)), c.mlp]
    return subs


CANDIDATES: dict[str, Candidate] = {c.name: c for c in [
    Candidate("bst_sh_s4", "BST-SH (S4D)", _bst("s4d", "sh")),
    Candidate("bst_mh_s4", "BST-MH (S4D)", _bst("s4d", "mh")),
    Candidate("bst_mf_s4", "BST-MF (S4D)", _bst("s4d", "mf")),
    Candidate("bst_sh_unstructured", "BST-SH (unstructured)", _bst("long_conv", "sh")),
    Candidate("bst_mh_unstructured", "BST-MH (unstructured)", _bst("long_conv", "mh")),
    Candidate("bst_mf_unstructured", "BST-MF (unstructured)", _bst("long_conv", "mf")),
    Candidate("brt", "BRT recurrent layer", lambda c: [
        Sub("brt", {"window": c.window, "state": c.window, "hidden": 4 * c.d_model}, norm=False)]),
    Candidate("full", "Full attention", lambda c: [Sub("full_attention", {}), c.mlp], quadratic=True),
    Candidate("slide", "Sliding window", lambda c: [Sub("sliding_attention", {"window": c.window}), c.mlp]),
    Candidate("txl", "Transformer-XL", lambda c: [
        Sub("xl_attention", {"window": c.window, "memory": c.window}), c.mlp]),
    Candidate("gss", "GSS layer", lambda c: [Sub("gss", {"state": c.ssm_state})]),
    # Today's hybrids' kinds (not in the default comparison, which is the paper's):
    Candidate("bst_sh_mamba", "BST-SH (Mamba-2 context)", _bst("mamba", "sh")),
    Candidate("mamba", "Mamba-2 layer", lambda c: [Sub("mamba", {"state": c.ssm_state})]),
    Candidate("slide_gqa", "Sliding window, 1 KV head", lambda c: [
        Sub("sliding_attention", {"window": c.window, "kv_heads": 1}), c.mlp]),
    Candidate("slide_moe", "Sliding window + MoE (8 experts, top 2)", lambda c: [
        Sub("sliding_attention", {"window": c.window}),
        Sub("moe", {"experts": 8, "top_k": 2, "hidden": 2 * c.d_model})]),
]}
PAPER_LAYERS = ("bst_sh_s4", "bst_mh_s4", "bst_mf_s4", "bst_sh_unstructured", "bst_mh_unstructured",
                "bst_mf_unstructured", "brt", "full", "slide", "txl")
DEFAULT_LAYERS = list(PAPER_LAYERS)
REFERENCE = "bst_sh_s4"


class Unfit(Exception):
    """A candidate that cannot be built at these sizes (the checker says why)."""


def _literal(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def layer_text(name: str, cfg: BenchConfig, seq_len: int) -> str:
    """The candidate as a model file: one block of its sublayers between an embedding and a head."""
    lines = []
    for i, sub in enumerate(CANDIDATES[name].subs(cfg)):
        args = [f"{k}: {_literal(v)}" for k, v in sub.args.items()]
        args += ([] if sub.norm else ["norm: none"]) + ([] if sub.residual else ["residual: false"])
        if sub.context is not None:
            args.append(f"context: s{sub.context[0]} -> {sub.context[1]}")
        lines.append(f"s{i} = {sub.kind}({', '.join(args)})")
    body = "\n    ".join(lines)
    return (f"model bench_{name} {{\n  vocab = 256; d_model = {cfg.d_model}; heads = {cfg.heads}; "
            f"window = {cfg.window}; seq_len = {seq_len}\n  block layer {{\n    {body}\n  }}\n"
            "  layers { embed; layer; head untied }\n}\n")


def _checked(name: str, cfg: BenchConfig, seq_len: int):
    from bstc.errors import BstcError
    from bstc.frontend import parse

    try:
        return parse(layer_text(name, cfg, seq_len))
    except BstcError as e:
        raise Unfit(e.diagnostics[0].message if e.diagnostics else str(e)) from None


def build_layer(name: str, cfg: BenchConfig, seq_len: int, *, key):
    """The candidate's block, x (B, L, D) -> x: lowered from `layer_text` by the public
    lowering, so it is built exactly as in a model."""
    from bstc.lower import lower

    return lower(_checked(name, cfg, seq_len), key=key, scan=False).stages[0].block


def layer_flops_per_token(name: str, cfg: BenchConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the layer (norms included): `bstc explain`'s rows of the block."""
    from bstc.passes.report import build_report

    rep = build_report(_checked(name, cfg, seq_len), batch=1)
    return sum(r.flops_per_token for r in rep.rows if r.name.startswith("layer."))


def fwd_bwd(layer):
    """A jitted function (params, x) -> gradients w.r.t. params and x of sum(layer(x))."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def loss(p, x):
        return jnp.sum(eqx.combine(p, static)(x).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


@dataclass
class Result:
    candidate: str
    length: int
    times_s: list[float] = field(default_factory=list)
    compile_s: float | None = None
    flops_per_token: float | None = None
    params: int | None = None
    skipped: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


def _memory_bytes() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def run_layers(names: list[str], lengths: list[int], cfg: BenchConfig, repeats: int, max_seconds: float,
               log: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Time every candidate at every length; interleave the candidates within each repeat."""
    results: list[Result] = []
    last: dict[str, tuple[int, float]] = {}  # candidate -> (length, median) at the last length it ran
    for L in lengths:
        ready = []
        for name in names:
            r = Result(name, L)
            results.append(r)
            cand = CANDIDATES[name]
            if name in last:  # extrapolate from the previous length: skip what would exceed the guard
                L0, t0 = last[name]
                guess = t0 * (L / L0) ** (2 if cand.quadratic else 1)
                if guess > max_seconds:
                    r.skipped = f"predicted {guess:.1f} s per step > --max-seconds {max_seconds:g}"
                    continue
            if cand.quadratic and 4.0 * cfg.batch * cfg.heads * L * L * 4 > 0.5 * _memory_bytes():
                r.skipped = "the L×L attention weights would not fit in memory"
                continue
            try:
                layer = build_layer(name, cfg, L, key=jax.random.key(0))
            except Unfit as e:
                r.skipped = str(e)
                continue
            f, params = fwd_bwd(layer)
            x = jax.random.normal(jax.random.key(1), (cfg.batch, L, cfg.d_model), jnp.float32)
            t0 = time.perf_counter()
            compiled = f.lower(params, x).compile()
            r.compile_s = time.perf_counter() - t0
            r.params = sum(a.size for a in jax.tree.leaves(params))
            r.flops_per_token = layer_flops_per_token(name, cfg, L)
            warm = _timed(compiled, params, x)  # first call: allocation, thread pools
            if warm > max_seconds:
                r.times_s = [warm]
                r.skipped = f"one step took {warm:.1f} s > --max-seconds {max_seconds:g}; timed once"
                last[name] = (L, warm)
                continue
            ready.append((r, compiled, params, x))
            log(f"L={L} {name}: compiled in {r.compile_s:.1f} s")
        for rep in range(repeats):
            k = rep % max(1, len(ready))
            for r, compiled, params, x in ready[k:] + ready[:k]:  # a different order every repeat
                r.times_s.append(_timed(compiled, params, x))
        for r, *_ in ready:
            last[r.candidate] = (L, r.median_s)
            log(f"L={L} {r.candidate}: median {1e3 * r.median_s:.1f} ms")
        del ready
    return results


def ratios(results: list[Result]) -> dict[tuple[str, int], float]:
    ref = {r.length: r.median_s for r in results if r.candidate == REFERENCE and r.median_s}
    return {(r.candidate, r.length): r.median_s / ref[r.length]
            for r in results if r.median_s and r.length in ref and not r.skipped}


def machine_info() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "devices": jax.device_count(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "jax": jax.__version__}


def plot_layers(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in dict.fromkeys(r.candidate for r in results):
        pts = [(r.length, r.median_s) for r in results if r.candidate == name and r.median_s and not r.skipped]
        if pts:
            xs, ys = zip(*pts)
            style = "-" if name.startswith("bst") else "--"
            ax.plot(xs, [1e3 * y for y in ys], style, marker="o", label=CANDIDATES[name].label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- a whole model's training step -------------------------------------------------------------------


def _prepare_model(source: str, overrides: dict, batch: int, scan: bool, lr: float) -> dict:
    """A model's compiled AdamW training step with its state, after one warm-up step."""
    import bstc
    from bstc.compile import plain_train_step
    from bstc.lower import lower

    t0 = time.perf_counter()
    m = bstc.parse(source, overrides=overrides)
    rep = bstc.explain(m, batch=batch)
    model = lower(m, key=jax.random.key(0), scan=scan)
    load_s = time.perf_counter() - t0
    L, V = m.dims.seq_len, m.dims.vocab
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt, step = plain_train_step(static, lr)
    opt_state = opt.init(params)

    tokens = jax.random.randint(jax.random.key(1), (batch, L), 0, V)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state, loss = compiled(params, opt_state, tokens)  # warm-up
    jax.block_until_ready(loss)
    return {"rep": rep, "source": str(source), "overrides": overrides, "seq_len": L, "compile_s": compile_s,
            "load_s": load_s, "step": compiled, "state": [params, opt_state, tokens], "times": [],
            "losses": [float(loss)]}


def _time_step(prep: dict) -> None:
    params, opt_state, tokens = prep["state"]
    t0 = time.perf_counter()
    params, opt_state, loss = prep["step"](params, opt_state, tokens)
    jax.block_until_ready(loss)
    prep["times"].append(time.perf_counter() - t0)
    prep["losses"].append(float(loss))
    prep["state"] = [params, opt_state, tokens]


def run_models(sources: list[str], overrides: list[dict], batch: int, steps: int, scan: bool = True,
               lr: float = 1e-3) -> list[dict]:
    """Several models' training steps in one process: each is compiled and warmed up, then the
    timed steps are interleaved (a rotating order every round), so a slow patch of the machine
    hits them all alike; ratios are to the first model, round by round (their median)."""
    from bstc.runtime.metrics import measure_matmul_peak

    preps = [_prepare_model(src, ov, batch, scan, lr) for src, ov in zip(sources, overrides)]
    for r in range(steps):
        k = r % len(preps)
        for prep in preps[k:] + preps[:k]:
            _time_step(prep)
    peak = measure_matmul_peak()
    out = []
    for prep in preps:
        rep, times = prep["rep"], prep["times"]
        step_s = statistics.median(times)
        tps = batch * prep["seq_len"] / step_s
        achieved = rep.train_flops_per_token * tps
        out.append({"model": rep.model, "source": prep["source"], "overrides": prep["overrides"], "batch": batch,
                    "seq_len": prep["seq_len"], "params": rep.params, "steps": steps, "step_times_s": times,
                    "step_s": step_s, "tokens_per_s": tps, "compile_s": prep["compile_s"], "load_s": prep["load_s"],
                    "losses": prep["losses"], "flops_per_token": rep.flops_per_token,
                    "train_flops_per_token": rep.train_flops_per_token, "achieved_flops": achieved,
                    "matmul_peak_flops": peak, "mfu": achieved / peak, "machine": machine_info()})
    # The ratio is the median over rounds of each round's ratio: the steps of one round ran side
    # by side, so a load that drifts over the run (it does on a shared machine) cancels.
    ref = out[0]["step_times_s"]
    for o in out:
        o["ratio_vs_first"] = statistics.median(t / r for t, r in zip(o["step_times_s"], ref))
    return out


def run_model(source: str, overrides: dict, batch: int, steps: int, scan: bool = True, lr: float = 1e-3) -> dict:
    return run_models([source], [overrides], batch, steps, scan=scan, lr=lr)[0]


def overrides_per_model(paths: list[Path], sets: dict) -> list[dict]:
    """Each model gets the --set names its file defines (`groups` means nothing to a file without
    it); a name no file defines goes to every model, so the checker names it ('did you mean')."""
    from bstc.frontend import parse_ast

    defined = [{a.name for a in parse_ast(str(p))[0].assigns} for p in paths]
    unknown = {k for k in sets if not any(k in d for d in defined)}
    return [{k: v for k, v in sets.items() if k in d or k in unknown} for d in defined]


# ---- the commands ------------------------------------------------------------------------------------

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
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the raw figures here."),
):
    """Time whole models' training steps (AdamW), interleaved: step time, tokens/s, compile time, MFU."""
    from rich.console import Console
    from rich.table import Table

    from bstc import zoo
    from bstc.cli.compiler import parse_sets
    from bstc.cli.errors import command as cli_errors

    paths = []
    for name in models:
        path = zoo.resolve(name)
        if path is None:
            _fail(f"no model file or zoo model named {name!r}")
        paths.append(path)

    @cli_errors
    def go():
        ovs = overrides_per_model(paths, parse_sets(set_))
        return run_models([str(p) for p in paths], ovs, batch, steps, scan=scan)

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


def run_compile(model: str, groups: list[int], overrides: dict, repeats: int = 1) -> list[dict]:
    """Compile time of the training step against depth, scanned and unrolled, in one process.
    With repeats > 1 every configuration is compiled that many times, in rounds, and the
    fastest compile is kept: on a shared machine the load only ever adds time."""
    from bstc.compile import compile_model

    compile_model(model, overrides={**overrides, "groups": groups[0]}, batch=1)  # warm the tracer caches
    rows = {(g, scan): None for g in groups for scan in (True, False)}
    for _ in range(repeats):
        for g, scan in rows:
            r = compile_model(model, overrides={**overrides, "groups": g}, batch=1, scan=scan)
            old = rows[(g, scan)]
            rows[(g, scan)] = {"groups": g, "scan": scan, "params": r["params"],
                               "compile_forward_s": min(r["compile_forward_s"], old["compile_forward_s"] if old else 1e9),
                               "compile_train_s": min(r["compile_train_s"], old["compile_train_s"] if old else 1e9),
                               "train_s_all": (old["train_s_all"] if old else []) + [r["compile_train_s"]]}
    return list(rows.values())


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


def run_decode(model: str, overrides: dict, tokens: int, repeats: int) -> dict:
    """Per-token time of sampling `tokens` bytes, through the caches and by recomputing the
    forward pass over seq_len tokens, interleaved in one process (each compiled first)."""
    import jax

    import bstc
    from bstc import decode
    from bstc.lower import lower
    from bstc.runtime.sampling import generate

    m = bstc.parse(model, overrides=overrides)
    net = lower(m, key=jax.random.key(0))
    ok, missing = decode.decodable(net)
    if not ok:
        raise ValueError(f"{m.name} has layers without a decode step ({missing}): nothing to compare")
    seq_len, vocab = m.dims.seq_len, m.dims.vocab
    ways = {"cached": True, "recompute": False}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(repeats + 1):  # the first round compiles
        for way, cache in ways.items():
            t0 = time.perf_counter()
            generate(net, b"\n", tokens, seq_len=seq_len, vocab=vocab, temperature=1.0, seed=r, cache=cache)
            if r:
                times[way].append((time.perf_counter() - t0) / tokens)
    med = {w: statistics.median(v) for w, v in times.items()}
    return {"model": m.name, "seq_len": seq_len, "d_model": m.dims.d_model, "tokens": tokens, "repeats": repeats,
            "s_per_token": med, "raw": times, "speedup": med["recompute"] / med["cached"],
            "overrides": overrides, "machine": machine_info()}


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


# ---- the checker on large model files -------------------------------------------------------


def large_model_text(n_params: int) -> str:
    """A valid model file of `n_params` parameter definitions (about 24 bytes each)."""
    lines = [f"  p{i} = {i} * 2 + 1" for i in range(n_params)]
    return ("model large {\n  vocab = 256; d_model = 64; heads = 4; window = 16; seq_len = 64\n"
            + "\n".join(lines) + "\n  block b { attn = block_attention(window: window) }\n"
            "  layers { embed; b; head tied }\n}\n")


def run_check(megabytes: list[float]) -> list[dict]:
    """Per size: the front end (lark's parse and the tree → AST transform) and the passes after
    it (resolve, expand, check), timed in the same process one after the other."""
    from bstc.errors import Collector
    from bstc.frontend import parse
    from bstc.syntax.dsl import parse_dsl

    out = []
    for mb in megabytes:
        text = large_model_text(max(1, int(mb * 1e6 / 24)))
        t0 = time.perf_counter()
        parse_dsl(text, "large.bst", Collector({"large.bst": text}))
        t1 = time.perf_counter()
        parse(text)
        t2 = time.perf_counter()
        front, total = t1 - t0, t2 - t1
        out.append(dict(megabytes=len(text) / 1e6, front_end_s=front, total_s=total,
                        passes_s=max(0.0, total - front)))
    return out


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


def register(app: typer.Typer) -> None:
    import bstc.bench_report  # noqa: F401  (adds `bstc bench report` to bench_app)

    app.add_typer(bench_app, name="bench")
