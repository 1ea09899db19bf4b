"""`bstc experiment lm`: the BST paper's Table 1 at CPU scale.

Every zoo model of the paper (BST-SH/MH/MF with S4D kernels, BST-SH/MF unstructured, the
Transformer, Slide, Transformer-XL, the Block-Recurrent Transformer, GSS-Hybrid, and the
SH variant whose context is the block's own window) is trained on the embedded corpus with
the same data, optimizer, schedule and number of training tokens, at a parameter count
matched to one target (the BST-SH zoo file at the scale's width, with its 12 layers): first
by depth (the file's `groups` or `depth`), then by MLP width (`mlp_hidden`). Each run is then
evaluated at 1x, 2x and 4x the training length. The result is a Markdown table, raw JSON and a
plot in the output directory.

Resumable: every (model, seed) run lives in OUT/runs/MODEL-sSEED; a finished run (its
result.json exists) is skipped, an interrupted one continues from its last checkpoint. Later
invocations with other --models or --seeds add rows; the table is rebuilt from every result
present, averaging seeds (mean and spread).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bstc.runtime.config import OptimizerConfig, RunConfig
from bstc.runtime.errors import UsageError
from bstc.runtime.rundir import RunFiles

# The rows of the paper's Table 1, in its order, plus the SH context over the block's own
# window (the paper's appendix), a BST whose context source is a selective SSM, and two of
# today's hybrids (Jamba-like, Samba-like) for comparison; a model file missing from the zoo
# is left out.
MODELS = ("bst_sh_s4", "bst_mh_s4", "bst_mf_s4", "bst_sh_own_s4", "bst_sh_unstructured", "bst_mf_unstructured",
          "transformer", "slide", "transformer_xl", "brt", "gss_hybrid", "bst_sh_mamba", "jamba", "samba")
LABELS = {"bst_sh_s4": "BST-SH (S4D)", "bst_mh_s4": "BST-MH (S4D)", "bst_mf_s4": "BST-MF (S4D)",
          "bst_sh_own_s4": "BST-SH, own-window context (S4D)", "bst_sh_unstructured": "BST-SH (unstructured)",
          "bst_mf_unstructured": "BST-MF (unstructured)", "transformer": "Transformer", "slide": "Slide",
          "transformer_xl": "Transformer-XL", "brt": "Block-Recurrent Transformer", "gss_hybrid": "GSS-Hybrid",
          "bst_sh_mamba": "BST-SH, selective SSM context (Mamba-2)",
          "jamba": "Jamba-like (Mamba-2 + attention 7:1, MoE)", "samba": "Samba-like (Mamba-2 + sliding window)"}
TOLERANCE = 0.05  # a row's parameters within 5% of the target


@dataclass(frozen=True)
class Scale:
    """Model sizes and the training/eval budget of one table."""

    d_model: int
    heads: int
    window: int
    seq_len: int
    ssm_state: int
    context_states: int
    target_groups: int          # the BST-SH file's `groups` that defines the target size
    steps: int
    batch: int
    lr: float
    eval_tokens: int            # tokens scored at each length (the same prefix of the split)
    eval_batches: int = 4       # validation during training (the loss curve)
    eval_every: int = 0         # 0: only at the end
    ckpt_every: int = 100       # resumable within a run
    experts: int = 4            # MoE models: total parameters are matched, so fewer, wider experts
    run_plots: bool = True      # each run's loss and per-position pictures (the table's own is always drawn)


SCALES = {
    # Runs in the test suite: every row, short. Its time is compiling (a program per row and
    # length, roughly in proportion to depth), so the stacks are as shallow as matching allows:
    # one BST-SH group (4 layers). The width is 96, not smaller, because the shallowest
    # Jamba-like stack (one group of 8 layers, 7 of them Mamba) only fits within the tolerance
    # of a single BST-SH group once the embeddings stop dominating (at d_model 32 it is 18% over).
    "smoke": Scale(d_model=96, heads=4, window=16, seq_len=64, ssm_state=8, context_states=4, target_groups=1,
                   steps=6, batch=4, lr=2e-3, eval_tokens=1024, eval_batches=0, ckpt_every=0, experts=2,
                   run_plots=False),
    # The documented table: the BST-SH zoo file at d_model 128 with its 12 layers (~2.5M
    # params), 4 blocks of 64 bytes per training sequence, 300 steps of 8 sequences (614k
    # training tokens): the eleven paper rows in 46 minutes on an idle 2-core CPU (docs/results.md).
    "small": Scale(d_model=128, heads=4, window=64, seq_len=256, ssm_state=32, context_states=16, target_groups=3,
                   steps=300, batch=8, lr=2e-3, eval_tokens=2**15, eval_every=100),
}


def base_overrides(scale: Scale, declared: set[str]) -> dict[str, Any]:
    """The scale's sizes, restricted to the parameters the model file defines."""
    ov = dict(d_model=scale.d_model, heads=scale.heads, window=scale.window, seq_len=scale.seq_len,
              ssm_state=scale.ssm_state, context_states=scale.context_states, memory=scale.window,
              state_vectors=scale.window, experts=scale.experts)
    return {k: v for k, v in ov.items() if k in declared}


def count_params(path: Path, overrides: dict[str, Any]) -> int | None:
    """Parameters of the model file under overrides (no arrays built); None if it does not check."""
    import bstc
    from bstc.errors import BstcError

    try:
        return int(bstc.explain(bstc.parse(str(path), overrides=overrides)).params)
    except BstcError:
        return None


def match_size(path: Path, scale: Scale, target: int) -> tuple[dict[str, Any], int]:
    """Overrides that bring the model file closest to `target` parameters: depth first (the
    file's `groups` or `depth`), then MLP width (`mlp_hidden`, a multiple of 8)."""
    from bstc.zoo import declared_params

    declared = declared_params(path)
    ov = base_overrides(scale, declared)
    depth_name = next((n for n in ("groups", "depth") if n in declared), None)
    best = (ov, count_params(path, ov))
    if depth_name is not None:
        cands = []
        for d in range(1, 25):
            o = {**ov, depth_name: d}
            n = count_params(path, o)
            if n is not None:
                cands.append((abs(n - target), d, o, n))
            if n is not None and n > 2 * target:
                break
        if cands:
            _, _, o, n = min(cands, key=lambda c: (c[0], c[1]))
            best = (o, n)
    ov, n = best
    if "mlp_hidden" in declared and n is not None and abs(n - target) > 0.005 * target:
        lo, hi = 1, 16 * scale.d_model // 8  # in units of 8
        while lo < hi:  # the smallest width whose count reaches the target
            mid = (lo + hi) // 2
            m = count_params(path, {**ov, "mlp_hidden": 8 * mid})
            if m is not None and m >= target:
                hi = mid
            else:
                lo = mid + 1
        options = [w for w in (lo - 1, lo) if w >= 1]
        scored = [(abs(count_params(path, {**ov, "mlp_hidden": 8 * w}) - target), w) for w in options]
        w = min(scored)[1]
        ov = {**ov, "mlp_hidden": 8 * w}
        n = count_params(path, ov)
    if n is None:
        raise UsageError(f"{path.name} does not check at this scale")
    return ov, n


def target_params(scale: Scale) -> int:
    from bstc.runtime.model import resolve_model
    from bstc.zoo import declared_params

    path = resolve_model("bst_sh_s4")
    ov = {**base_overrides(scale, declared_params(path)), "groups": scale.target_groups}
    return count_params(path, ov)


def run_config(scale: Scale, model: Path, overrides: dict[str, Any], seed: int) -> RunConfig:
    return RunConfig(model=str(model), set=overrides, preset="none", steps=scale.steps, batch=scale.batch,
                     optimizer=OptimizerConfig(lr=scale.lr), seed=seed, eval_every=scale.eval_every,
                     eval_batches=scale.eval_batches, ckpt_every=scale.ckpt_every, keep=1, log_every=1)


def run_one(name: str, seed: int, scale: Scale, target: int, out: Path, *, progress: bool = True) -> dict:
    """Train and evaluate one row (or read its finished result)."""
    from rich.console import Console

    from bstc.runtime.evaluator import evaluate
    from bstc.runtime.metrics import read_metrics
    from bstc.runtime.model import resolve_model, spec_from_file
    from bstc.runtime.trainer import train

    row = row_name(name)
    run_dir = out / "runs" / f"{row}-s{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not _claim(run_dir):
        return None  # another `bstc experiment lm` on the same directory is training this row
    path = resolve_model(name)
    overrides, n = match_size(path, scale, target)
    cfg = run_config(scale, path, overrides, seed)
    spec = spec_from_file(path, overrides)
    resume = RunFiles(run_dir).has_checkpoints()
    t0 = time.perf_counter()
    trained = train(cfg, run_dir, spec, resume=resume, progress=progress, plot=scale.run_plots, tensorboard=False)
    train_s = time.perf_counter() - t0
    L = spec.seq_len
    quiet = Console(quiet=True)
    # The model just trained, as the final checkpoint holds it: nothing to restore.
    ev = evaluate(run_dir, lengths=[L, 2 * L, 4 * L], max_tokens=scale.eval_tokens, console=quiet,
                  plot=scale.run_plots, model=trained.model, step=trained.step if trained.model is not None else None)
    tps = [r["tokens_per_s"] for r in read_metrics(run_dir) if r.get("split") == "train" and r.get("tokens_per_s")]
    res = dict(model=row, label=LABELS.get(row, row), seed=seed, params=n, target=target,
               matched=abs(n - target) <= TOLERANCE * target, overrides=overrides,
               train_tokens=scale.steps * scale.batch * L, tokens_per_s=round(tps[-1], 1) if tps else None,
               train_seconds=round(train_s, 1), seq_len=L,
               bpb={k: v.get("bpb") for k, v in ev["lengths"].items()},
               skipped={k: v["skipped"] for k, v in ev["lengths"].items() if "skipped" in v})
    done.write_text(json.dumps(res, indent=2) + "\n")
    return res


def _claim(run_dir: Path) -> bool:
    """Take the row for this process (several invocations may share an output directory and
    split the rows between them); a claim left by a process that no longer runs is taken over."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "claimed-by"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            lock.unlink(missing_ok=True)
            return _claim(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def collect(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]


def aggregate(results: list[dict]) -> list[dict]:
    """One row per model: mean and spread (max − min) over its seeds, in MODELS order."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["model"], []).append(r)
    order = {m: i for i, m in enumerate(MODELS)}
    rows = []
    for name in sorted(by, key=lambda m: (order.get(m, len(order)), m)):
        rs = by[name]
        L = rs[0]["seq_len"]
        row = dict(model=name, label=rs[0]["label"], seeds=sorted(r["seed"] for r in rs), params=rs[0]["params"],
                   target=rs[0]["target"], matched=all(r["matched"] for r in rs), seq_len=L,
                   train_tokens=rs[0]["train_tokens"],
                   tokens_per_s=statistics.mean(r["tokens_per_s"] for r in rs if r["tokens_per_s"]) if any(
                       r["tokens_per_s"] for r in rs) else None, bpb={}, spread={})
        for mult in (1, 2, 4):
            vals = [r["bpb"].get(str(mult * L)) for r in rs]
            vals = [v for v in vals if v is not None]
            row["bpb"][mult] = statistics.mean(vals) if vals else None
            row["spread"][mult] = (max(vals) - min(vals)) if len(vals) > 1 else None
        rows.append(row)
    return rows


def _cell(row: dict, mult: int, best: float | None) -> str:
    v = row["bpb"].get(mult)
    if v is None:
        return "—"
    s = f"{v:.3f}"
    if row["spread"].get(mult) is not None:
        s += f" ± {row['spread'][mult] / 2:.3f}"
    return f"**{s}**" if best is not None and abs(v - best) < 1e-9 else s


def markdown(rows: list[dict], scale_name: str) -> str:
    if not rows:
        return "(no results yet)\n"
    L = rows[0]["seq_len"]
    best = {m: min((r["bpb"][m] for r in rows if r["bpb"].get(m) is not None), default=None) for m in (1, 2, 4)}
    lines = [f"| model | params | seeds | bits/byte @ {L} | @ {2 * L} (2×) | @ {4 * L} (4×) | 4× vs 1× | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b1, b4 = r["bpb"].get(1), r["bpb"].get(4)
        drift = f"{100 * (b4 / b1 - 1):+.1f}%" if b1 and b4 else "—"
        mark = "" if r["matched"] else " (unmatched)"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M{mark} | {len(r['seeds'])} | {_cell(r, 1, best[1])} | "
                     f"{_cell(r, 2, best[2])} | {_cell(r, 4, best[4])} | {drift} | {tps} |")
    t = rows[0]
    lines.append("")
    lines.append(f"Scale `{scale_name}`: target {t['target'] / 1e6:.2f}M parameters (±{TOLERANCE:.0%}), "
                 f"{t['train_tokens']:,} training tokens per run, validation bits/byte of the embedded corpus; "
                 "± is half the spread over seeds; bold is the best of a column.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        xs = [m * r["seq_len"] for m in (1, 2, 4) if r["bpb"].get(m) is not None]
        ys = [r["bpb"][m] for m in (1, 2, 4) if r["bpb"].get(m) is not None]
        style = "-" if r["model"].startswith("bst") else "--"
        ax.plot(xs, ys, style, marker="o", lw=1.6, label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("validation bits / byte")
    ax.set_title("Language modelling at matched size (solid: BST variants)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "lm_table.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, scale_name: str, plot_png: bool = True) -> dict:
    rows = aggregate(collect(out))
    md = markdown(rows, scale_name)
    (out / "lm_table.md").write_text(md)
    (out / "lm_table.json").write_text(json.dumps(dict(scale=scale_name, rows=rows), indent=2) + "\n")
    if rows and plot_png:
        plot(rows, out)
    return dict(rows=rows, markdown=md)


def run_table(out: Path, scale_name: str = "small", models: list[str] | None = None, seeds: list[int] | None = None,
              steps: int | None = None, progress: bool = True, console=None) -> dict:
    """Train and evaluate every requested (model, seed); write lm_table.{md,json,png} into `out`."""
    from rich.console import Console

    from bstc.runtime.model import zoo_names

    if scale_name not in SCALES:
        raise UsageError(f"unknown scale '{scale_name}' (choose from {', '.join(SCALES)})")
    scale = SCALES[scale_name]
    if steps is not None:
        scale = replace(scale, steps=steps)
    zoo = set(zoo_names())
    models = list(models or [m for m in MODELS if m in zoo])
    # A model file (yours, or a variant of a zoo file) joins the table as a row named by its stem.
    unknown = [m for m in models if m not in zoo and not _is_model_file(m)]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)} (zoo: {', '.join(sorted(zoo))}; "
                         "or give a model file's path)")
    stems = [row_name(m) for m in models]
    clash = sorted({s for s in stems if stems.count(s) > 1 or (s in zoo and s not in models)})
    if clash:
        raise UsageError(f"two rows would be named {', '.join(clash)}: rename the model file")
    seeds = list(seeds if seeds is not None else [0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = out / "setup.json"
    # What the numbers depend on (whether pictures are drawn does not).
    mine = dict(scale=scale_name, **{k: v for k, v in asdict(scale).items() if k != "run_plots"})
    if setup.is_file() and json.loads(setup.read_text()) != mine:
        raise UsageError(f"{out} holds a table of another setup ({setup}); choose another --out")
    setup.write_text(json.dumps(mine, indent=2) + "\n")
    console = console or Console(stderr=True)
    target = target_params(scale)
    jobs = [(m, s) for s in seeds for m in models]
    t0 = time.perf_counter()
    for i, (m, s) in enumerate(jobs, 1):
        console.print(f"[bold][{i}/{len(jobs)}][/] {LABELS.get(row_name(m), row_name(m))} · seed {s} · "
                      f"elapsed {time.perf_counter() - t0:,.0f} s")
        r = run_one(m, s, scale, target, out, progress=progress)
        if r is None:
            console.print("    being trained by another invocation on this directory: skipped")
            continue
        b = " · ".join(f"{k}: {v:.3f}" for k, v in r["bpb"].items() if v is not None)
        console.print(f"    {r['params'] / 1e6:.2f}M params ({100 * (r['params'] / target - 1):+.1f}% of target) · "
                      f"bits/byte {b}")
        write_report(out, scale_name, plot_png=False)  # the table so far: an interrupted table still shows its rows
    rep = write_report(out, scale_name)
    console.print(rep["markdown"])
    console.print(f"wrote {out / 'lm_table.md'}, {out / 'lm_table.json'}, {out / 'lm_table.png'} "
                  f"({time.perf_counter() - t0:,.0f} s)")
    return rep


def _is_model_file(m: str) -> bool:
    return Path(m).suffix in (".bst", ".yaml", ".yml") and Path(m).is_file()


def row_name(model: str) -> str:
    """A row's name: the zoo name, or a model file's stem."""
    return Path(model).stem if _is_model_file(model) else model


def drift(row: dict) -> float | None:
    b1, b4 = row["bpb"].get(1), row["bpb"].get(4)
    return None if not b1 or not b4 or math.isnan(b1) else b4 / b1 - 1
