"""`bstc experiment recall-table`: which context source lets a Block-State Transformer answer
associative recall with shuffled queries, against block-local attention and today's hybrids.

Every variant is the same small network, embed → A → X → A → RMS norm → untied head
(d_model 64, 2 heads, window 16, 64-token sequences), where X is the layer under test and A
is block-local attention + MLP (a sliding window for the Samba-like row), trained alike:
`--task recall` with 4 key–value pairs and 16 values (chance 1/16), batch 32, AdamW lr 3e-3
without weight decay, 3000 steps, seed 0; validation accuracy over 1,024 scored answers.
The pairs lie in block 0 and the queries in block 3: only a path across blocks can answer.

Resumable: each variant trains into OUT/NAME (an interrupted run continues from its last
checkpoint, a finished one is read back); the table is rebuilt from every finished variant.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from bstc.runtime.errors import UsageError

LOCAL = """block local {
    attn = block_attention(window: window)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }"""


@dataclass(frozen=True)
class Variant:
    label: str
    blocks: str                        # block definitions besides `local`
    layers: tuple[str, ...]            # the stack between embed and the final norm
    lr: float = 3e-3


def _bst(ssm: str, context: str) -> str:
    return f"""block bst {{
    ssm  = {ssm}
    attn = block_attention(window: window, {context})
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }}"""


MAMBA = "mamba(state: 16, head_dim: 16, chunk: 16{})"
OWN = "context: ssm -> sh, context_block: own"
PREV = "context: ssm -> sh"
MIDDLE = ("local", "bst", "local")
LENGTH_FACTORS = (1, 2, 4, 8)
EVAL_TOKENS = 2**16  # scored answers: 4,096 at the training length down to 512 at 8×

VARIANTS = {
    # the BST layer without its SSM and context edge
    "local": Variant("block-local attention only", """block bst {
    attn = block_attention(window: window)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }""", MIDDLE),
    "s4d_prev": Variant("BST-SH, S4D, previous block", _bst("s4d(state: 32)", PREV), MIDDLE),
    "s4d_own_res": Variant("BST-SH, S4D, own window, SSM also residual",
                           _bst("s4d(state: 32, residual: true)", OWN), MIDDLE),
    "mamba_prev_res": Variant("BST-SH, Mamba-2, previous block, SSM also residual",
                              _bst(MAMBA.format(", residual: true"), PREV), MIDDLE),
    "mamba_own_res": Variant("BST-SH, Mamba-2, own window, SSM also residual",
                             _bst(MAMBA.format(", residual: true"), OWN), MIDDLE),
    "mamba_own_res_lr1e-3": Variant("the same, lr 1e-3", _bst(MAMBA.format(", residual: true"), OWN), MIDDLE,
                                    lr=1e-3),
    "mamba_own_res_n32": Variant("the same, Mamba state 32",
                                 _bst("mamba(state: 32, head_dim: 16, chunk: 16, residual: true)", OWN), MIDDLE),
    "mamba_no_context": Variant("Mamba-2 + block-local attention, no context edge",
                                """block bst {
    ssm  = mamba(state: 16, head_dim: 16, chunk: 16)
    attn = block_attention(window: window)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }""", MIDDLE),
    "samba": Variant("Samba-like: sliding window, Mamba-2, sliding window", """block swa {
    attn = sliding_attention(window: window)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }
  block mamba_mlp {
    ssm = mamba(state: 16, head_dim: 16, chunk: 16)
    mlp = mlp(hidden: 2 * d_model, act: gelu)
  }""", ("swa", "mamba_mlp", "swa")),
    "jamba": Variant("Jamba-like: Mamba-2 + MoE, full attention (GQA), Mamba-2", """block mamba_moe {
    ssm = mamba(state: 16, head_dim: 16, chunk: 16)
    mlp = moe(experts: 4, top_k: 2, hidden: 2 * d_model)
  }
  block attn_mlp {
    attn = full_attention(kv_heads: 1)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }""", ("mamba_moe", "attn_mlp", "mamba_moe")),
}


@dataclass(frozen=True)
class Setup:
    d_model: int = 64
    heads: int = 2
    window: int = 16
    seq_len: int = 64
    pairs: int = 4
    values: int = 16
    steps: int = 3000
    batch: int = 32
    seed: int = 0
    eval_every: int = 500
    eval_batches: int = 8


def network_text(label: str, name: str, blocks: str, layers: tuple[str, ...], *, d_model: int, heads: int,
                 window: int, seq_len: int) -> str:
    """The recall network as a model file: embed → `layers` → RMS norm → untied head, with the
    block-local `local` block and `blocks` defined (shared with bstc.runtime.experiments)."""
    defs = "\n  ".join(b for b in (LOCAL, blocks) if b)
    stack = "\n    ".join(layers)
    return f"""# associative recall: {label}
model {name} {{
  vocab = 256
  d_model = {d_model}
  heads = {heads}
  window = {window}
  seq_len = {seq_len}
  {defs}
  layers {{
    embed
    {stack}
    norm rms
    head untied
  }}
}}
"""


def model_text(name: str, s: Setup = Setup()) -> str:
    v = VARIANTS[name]
    return network_text(v.label, "recall", v.blocks, v.layers, d_model=s.d_model, heads=s.heads, window=s.window,
                        seq_len=s.seq_len)


def _validation(run_dir: Path) -> list[dict]:
    from bstc.runtime.metrics import read_metrics

    return [m for m in read_metrics(run_dir) if m.get("split") == "validation"] if run_dir.is_dir() else []


def run_variant(name: str, s: Setup, out: Path, *, progress: bool = True) -> dict:
    """Train one variant (or read its finished run) and return its row."""
    import bstc
    from bstc.runtime.config import OptimizerConfig, RunConfig
    from bstc.runtime.model import spec_from_file
    from bstc.runtime.rundir import RunFiles
    from bstc.runtime.trainer import train

    v = VARIANTS[name]
    run_dir = out / name
    f = out / f"{name}.bst"
    f.write_text(model_text(name, s))
    if not any(m["step"] == s.steps for m in _validation(run_dir)):  # not finished: train or continue
        cfg = RunConfig(model=str(f), task="recall", task_args=dict(pairs=s.pairs, values=s.values), steps=s.steps,
                        batch=s.batch, optimizer=OptimizerConfig(lr=v.lr, weight_decay=0.0), seed=s.seed,
                        eval_every=s.eval_every, eval_batches=s.eval_batches, ckpt_every=s.eval_every, keep=1)
        train(cfg, run_dir, spec_from_file(f, {}), progress=progress, plot=True, tensorboard=False,
              resume=RunFiles(run_dir).has_checkpoints())
    val = _validation(run_dir)
    done = [m for m in val if m["step"] == s.steps][-1]
    return dict(variant=name, label=v.label, lr=v.lr, accuracy=done["accuracy"], loss=done["loss"],
                scored=done.get("tokens"), curve={str(m["step"]): round(m["accuracy"], 4) for m in val},
                params=int(bstc.explain(bstc.parse(str(f))).params), lengths=at_lengths(run_dir, s))


def at_lengths(run_dir: Path, s: Setup) -> dict[str, dict]:
    """Accuracy and answer loss at 1, 2, 4 and 8 × the training length (the queries that much
    further from the pairs), on the validation split: the run's eval file when it has them."""
    from rich.console import Console

    from bstc.runtime.evaluator import evaluate

    want = [str(s.seq_len * m) for m in LENGTH_FACTORS]
    saved = run_dir / "eval" / "eval-validation.json"
    ev = json.loads(saved.read_text()) if saved.is_file() else None
    if ev is None or ev.get("step") != s.steps or not all(L in ev["lengths"] for L in want):
        ev = evaluate(run_dir, lengths=[int(L) for L in want], max_tokens=EVAL_TOKENS, console=Console(quiet=True))
    return {L: dict(accuracy=ev["lengths"][L]["accuracy"], loss=ev["lengths"][L]["loss"]) for L in want}


def markdown(rows: list[dict], s: Setup) -> str:
    """Accuracy / answer loss at every length; bold: the best accuracy at the training length."""
    Ls = [s.seq_len * m for m in LENGTH_FACTORS]
    head = " | ".join(f"{L} ({m}×)" if m > 1 else f"{L} (train)" for L, m in zip(Ls, LENGTH_FACTORS))
    lines = [f"| variant | model | params | {head} | accuracy at 1k / 2k steps |",
             "|---|---|---:|" + "---:|" * len(Ls) + "---:|"]
    best = max((r["accuracy"] for r in rows), default=None)
    for r in rows:
        cells = []
        for L in Ls:
            e = r["lengths"][str(L)]
            c = f"{e['accuracy']:.3f} / {e['loss']:.2f}"
            cells.append(f"**{c}**" if L == s.seq_len and r["accuracy"] == best else c)
        mid = " / ".join(f"{r['curve'][k]:.3f}" if k in r["curve"] else "–" for k in ("1000", "2000"))
        lines.append(f"| `{r['variant']}` | {r['label']} | {r['params'] / 1e3:.0f}k | {' | '.join(cells)} | {mid} |")
    lines.append("")
    lines.append(f"Accuracy / answer loss (nats) on the validation split. {s.pairs} pairs, {s.values} values "
                 f"(chance {1 / s.values:.4f}, loss ln {s.values} = {math.log(s.values):.2f}), trained on "
                 f"{s.seq_len}-token sequences, window {s.window}, {s.steps} steps of batch {s.batch}, seed {s.seed}.")
    return "\n".join(lines) + "\n"


def run_table(out: Path, names: list[str] | None = None, s: Setup = Setup(), progress: bool = True,
              console=None) -> dict:
    from rich.console import Console

    names = list(names or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    for i, n in enumerate(names, 1):
        console.print(f"[bold][{i}/{len(names)}][/] {n}: {VARIANTS[n].label}")
        r = run_variant(n, s, out, progress=progress)
        (out / n / "result.json").write_text(json.dumps(r, indent=2) + "\n")
        console.print(f"    accuracy {r['accuracy']:.3f} · answer loss {r['loss']:.3f}")
    rows = [json.loads(p.read_text()) for n in VARIANTS if (p := out / n / "result.json").is_file()]
    md = markdown(rows, s)
    (out / "recall_table.md").write_text(md)
    (out / "recall_table.json").write_text(json.dumps(dict(setup=s.__dict__, rows=rows), indent=2) + "\n")
    console.print(md)
    return dict(rows=rows, markdown=md)
