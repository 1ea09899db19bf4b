"""Side-by-side speed on one machine, in one run (the `bstc bench` commands: bstc.cli.bench).

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

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from bstc.errors import out_of_memory


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


def memory_bytes() -> float:
    """The memory a layer runs in: an accelerator's own (the limit its allocator reports), else
    this host's RAM (the CPU backend reports no limit)."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # a backend without memory statistics
        limit = None
    if limit:
        return float(limit)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def run_layers(names: list[str], lengths: list[int], cfg: BenchConfig, repeats: int, max_seconds: float,
               log: Callable[[str], None] = lambda s: None, deadline: float | None = None) -> list[Result]:
    """Time every candidate at every length; interleave the candidates within each repeat.
    With a `deadline` (a `time.perf_counter()` value) no length after the first is started past
    it: its cells and the later ones are skipped, so that a report fits a time budget on any device."""
    results: list[Result] = []
    last: dict[str, tuple[int, float]] = {}  # candidate -> (length, median) at the last length it ran
    no_memory: dict[str, int] = {}  # candidate -> the length at which it ran out of memory
    for i, L in enumerate(lengths):
        ready = []
        over_time = deadline is not None and i > 0 and time.perf_counter() > deadline
        for name in names:
            r = Result(name, L)
            results.append(r)
            cand = CANDIDATES[name]
            if over_time:  # a whole length or none: its ratios need BST-SH beside the others
                r.skipped = "the report's time budget was spent before this length"
                continue
            if L >= no_memory.get(name, L + 1):  # a longer sequence will not fit either
                r.skipped = f"out of memory on this device at L = {no_memory[name]}"
                continue
            if name in last:  # extrapolate from the previous length: skip what would exceed the guard
                L0, t0 = last[name]
                guess = t0 * (L / L0) ** (2 if cand.quadratic else 1)
                if guess > max_seconds:
                    r.skipped = f"predicted {guess:.3g} s per step > --max-seconds {max_seconds:g}"
                    continue
            if cand.quadratic and 4.0 * cfg.batch * cfg.heads * L * L * 4 > 0.5 * memory_bytes():
                r.skipped = "the L×L attention weights would not fit in memory"
                continue
            try:
                layer = build_layer(name, cfg, L, key=jax.random.key(0))
            except Unfit as e:
                r.skipped = str(e)
                continue
            try:
                f, params = fwd_bwd(layer)
                x = jax.random.normal(jax.random.key(1), (cfg.batch, L, cfg.d_model), jnp.float32)
                t0 = time.perf_counter()
                compiled = f.lower(params, x).compile()
                r.compile_s = time.perf_counter() - t0
                warm = _timed(compiled, params, x)  # first call: allocation, thread pools
            except jax.errors.JaxRuntimeError as e:
                if not out_of_memory(e):
                    raise
                # The guard above covers attention weights only; whatever else does not fit is
                # one skipped cell, not the end of a long report.
                r.skipped = "out of memory on this device"
                no_memory[name] = L
                log(f"L={L} {name}: out of memory, skipped")
                continue
            r.params = sum(a.size for a in jax.tree.leaves(params))
            r.flops_per_token = layer_flops_per_token(name, cfg, L)
            if warm > max_seconds:
                r.times_s = [warm]
                r.skipped = f"one step took {warm:.3g} s > --max-seconds {max_seconds:g}; timed once"
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


def _prepare_model(source: str, overrides: dict, batch: int, scan: bool, lr: float, remat: str = "none") -> dict:
    """A model's compiled AdamW training step with its state, after one warm-up step."""
    import bstc
    from bstc.compile import plain_train_step
    from bstc.lower import lower

    t0 = time.perf_counter()
    m = bstc.parse(source, overrides=overrides)
    rep = bstc.explain(m, batch=batch)
    model = lower(m, key=jax.random.key(0), scan=scan, remat=remat)
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
               lr: float = 1e-3, remat: str = "none") -> list[dict]:
    """Several models' training steps in one process: each is compiled and warmed up, then the
    timed steps are interleaved (a rotating order every round), so a slow patch of the machine
    hits them all alike; ratios are to the first model, round by round (their median)."""
    from bstc.runtime.metrics import measure_matmul_peak

    preps = [_prepare_model(src, ov, batch, scan, lr, remat) for src, ov in zip(sources, overrides)]
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
                    "matmul_peak_flops": peak, "mfu": achieved / peak, "remat": remat, "machine": machine_info()})
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
