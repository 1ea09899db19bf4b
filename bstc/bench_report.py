"""The paper's speed claims in one command and one Markdown file (`bstc bench report`, bstc.cli.bench).

It runs, in one process: the layer comparison (`bench layers`: BST-SH/MH/MF, BRT, Slide,
Transformer-XL and full attention, forward + backward, interleaved), the whole models'
training steps with MFU against this device's measured matmul peak (`bench model`,
interleaved), and sampling with the caches against recomputation (`bench decode`); then writes
`report.md`, `report.json` and the layer plot into one directory.

Presets: `paper` (D 1024, H 8, W 512, L 4k–32k; full attention skipped past the time guard),
sized for one accelerator within an 8-minute budget (no new layer length is started after 60%
of it, whatever the device's speed), and `cpu` (tiny widths, a few seconds per cell),
which the test suite runs. Options override a preset's sizes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bstc.bench import (CANDIDATES, REFERENCE, BenchConfig, machine_info, overrides_per_model, plot_layers, ratios,
                        run_layers, run_models)
from bstc.bench_runs import run_decode
from bstc.errors import out_of_memory


@dataclass(frozen=True)
class Preset:
    layers: BenchConfig
    lengths: tuple[int, ...]
    kinds: tuple[str, ...]
    model_sets: dict  # --set for the zoo models (each gets the names its file defines)
    models: tuple[str, ...] = ("bst_sh_s4", "slide", "transformer")
    batch: int = 1
    steps: int = 3
    repeats: int = 3
    max_seconds: float = 20.0
    decode_tokens: int = 64
    # Seconds for the whole report (None: no limit). The layers may use LAYER_SHARE of it: no
    # new length is started after that, which leaves the rest for the models and decoding.
    budget_s: float | None = None


LAYER_SHARE = 0.6


PRESETS = {
    "paper": Preset(BenchConfig(d_model=1024, heads=8, window=512, batch=1), (4096, 8192, 16384, 32768),
                    ("bst_sh_s4", "bst_mh_s4", "bst_mf_s4", "brt", "slide", "txl", "full"),
                    {"seq_len": 4096}, max_seconds=5.0, budget_s=480.0),
    "cpu": Preset(BenchConfig(d_model=32, heads=2, window=16, batch=1, ssm_state=8, context_states=4), (64, 128),
                  ("bst_sh_s4", "brt", "slide", "full"),
                  {"d_model": 32, "heads": 2, "window": 16, "seq_len": 64, "groups": 1, "depth": 4, "mlp_hidden": 64,
                   "ssm_state": 8}, steps=2, repeats=2, decode_tokens=8),
}


def _layers_markdown(results, lengths, rat) -> list[str]:
    names = list(dict.fromkeys(r.candidate for r in results))
    out = ["| layer | " + " | ".join(f"L = {L}" for L in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
    for n in names:
        cells = []
        for L in lengths:
            r = next(x for x in results if x.candidate == n and x.length == L)
            if not r.times_s:
                cells.append("skipped")
                continue
            cell = f"{1e3 * r.median_s:.1f} ms"
            if (n, L) in rat and n != REFERENCE:
                cell += f" ({rat[(n, L)]:.2f}×)"
            cells.append(cell + (" *" if r.skipped else ""))
        out.append(f"| {CANDIDATES[n].label} | " + " | ".join(cells) + " |")
    return out


def _skips_markdown(results) -> list[str]:
    """Why each skipped (or once-timed) cell is so: the guards' and the device's reasons."""
    notes = [f"- {CANDIDATES[r.candidate].label}, L = {r.length}: {r.skipped}" for r in results if r.skipped]
    return ["Skipped cells (\\* = timed once):", "", *notes, ""] if notes else []


def _claim(rat, lengths) -> str:
    """The paper's claim: BST-SH at least 10× faster than the BRT layer at L ≥ 8k."""
    long = [(L, rat[("brt", L)]) for L in lengths if L >= 8192 and ("brt", L) in rat]
    if not long:
        return "BRT ÷ BST-SH at L ≥ 8192: not measured at these lengths."
    held = all(r >= 10 for _, r in long)
    cells = ", ".join(f"{r:.2f}× at {L}" for L, r in long)
    return f"BRT ÷ BST-SH at L ≥ 8192: {cells} — the ≥ 10× claim {'holds' if held else 'does not hold'} here."


def _models_markdown(preset: Preset, models) -> list[str]:
    if isinstance(models, str):  # why the part was not measured
        return ["## Training step", "", f"Not measured: {models}.", ""]
    md = [f"## Training step (batch {preset.batch} × {models[0]['seq_len']} tokens; × {models[0]['model']})", "",
          "| model | params | step | × first | tokens/s | MFU |", "|---|---:|---:|---:|---:|---:|"]
    for o in models:
        md.append(f"| {o['model']} | {o['params'] / 1e6:.2f} M | {1e3 * o['step_s']:.1f} ms | "
                  f"{o['ratio_vs_first']:.2f} | {o['tokens_per_s']:,.0f} | {100 * o['mfu']:.1f} % |")
    return md + ["", f"MFU = 3 × forward FLOPs/token (explain) × tokens/s ÷ the measured f32 matmul peak, "
                     f"{models[0]['matmul_peak_flops'] / 1e12:.3g} TFLOP/s.", ""]


def _decode_markdown(dec) -> list[str]:
    if isinstance(dec, str):
        return ["## Sampling", "", f"Not measured: {dec}.", ""]
    return [f"## Sampling ({dec['model']}, {dec['tokens']} tokens at seq_len {dec['seq_len']})", "",
            "| decoding | ms / token |", "|---|---:|",
            *(f"| {w} | {1e3 * t:.2f} |" for w, t in dec["s_per_token"].items()),
            "", f"Cached decoding is {dec['speedup']:.1f}× faster than recomputing the forward pass.", ""]


def _unless_out_of_memory(part):
    """part() — or, when XLA runs out of device memory, the reason as a string: the report keeps
    what the other parts measured."""
    try:
        return part()
    except Exception as e:
        if not out_of_memory(e):
            raise
        return "out of memory on this device"


def write_report(out_dir: Path, preset: Preset, log=lambda s: None) -> dict:
    """Run the parts and write report.md / report.json; both are rewritten after every part, so
    a run that dies later (a host out of memory) leaves what was measured."""
    from bstc import zoo

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, lengths = preset.layers, list(preset.lengths)
    phases: dict[str, float] = {}  # seconds per part, compiles included: where a time budget went
    mach = machine_info()
    models = dec = "the run ended before this part"
    t0 = time.perf_counter()
    deadline = t0 + LAYER_SHARE * preset.budget_s if preset.budget_s else None

    def write() -> dict:
        md = [f"# bstc speed report — {mach['device']} ({mach['backend']})", "",
              f"JAX {mach['jax']}, {mach['devices']} device(s), {mach['cpu_count']} CPU cores. Every table's "
              "candidates ran interleaved in this one process; read the ratios.", "",
              f"## One layer, forward + backward (D = {cfg.d_model}, H = {cfg.heads}, W = {cfg.window}, "
              f"batch {cfg.batch}; × BST-SH)", "", *_layers_markdown(results, lengths, rat), "",
              *_skips_markdown(results), _claim(rat, lengths), "", "![layers](layers.png)", "",
              *_models_markdown(preset, models), *_decode_markdown(dec),
              "Time taken, compiles included: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) +
              f"; {sum(phases.values()):.0f} s in all" +
              (f" (budget {preset.budget_s:.0f} s; no new layer length after {LAYER_SHARE:.0%} of it)."
               if preset.budget_s else "."), ""]
        (out_dir / "report.md").write_text("\n".join(md))
        data = {"machine": mach, "preset": {"layers": vars(cfg), "lengths": lengths, "kinds": list(preset.kinds),
                                            "models": list(preset.models), "model_sets": preset.model_sets,
                                            "budget_s": preset.budget_s},
                "layers": [{"candidate": r.candidate, "length": r.length, "times_s": r.times_s,
                            "median_s": r.median_s, "ratio_vs_reference": rat.get((r.candidate, r.length)),
                            "skipped": r.skipped, "flops_per_token": r.flops_per_token} for r in results],
                "models": models, "decode": dec, "seconds": phases}
        (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str))
        return data

    log("layers …")
    results = run_layers(list(preset.kinds), lengths, cfg, preset.repeats, preset.max_seconds, log=log,
                         deadline=deadline)
    rat = ratios(results)
    plot_layers(results, out_dir / "layers.png", f"one layer, forward + backward — D={cfg.d_model}, W={cfg.window}")
    phases["layers"], t0 = time.perf_counter() - t0, time.perf_counter()
    write()
    log("models …")
    paths = [zoo.resolve(m) for m in preset.models]
    ovs = overrides_per_model(paths, preset.model_sets)
    models = _unless_out_of_memory(lambda: run_models([str(p) for p in paths], ovs, preset.batch, preset.steps))
    phases["models"], t0 = time.perf_counter() - t0, time.perf_counter()
    write()
    log("decoding …")
    dec = _unless_out_of_memory(lambda: run_decode(str(paths[0]), ovs[0], preset.decode_tokens, 1))
    phases["decoding"] = time.perf_counter() - t0
    return write()
