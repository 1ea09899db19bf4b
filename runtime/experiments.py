"""Small, reproducible experiments on synthetic tasks (used by the slow tests and docs/results.md).

    python -m bstc.runtime.experiments recall [--steps N] [--out DIR]
    python -m bstc.runtime.experiments lengths [--steps N] [--init lin|real] [--no-centre] [--length-mix 1,2]

`recall`: a tiny BST-SH and the same network with context injection removed (every layer
block-local attention only) are trained on associative recall with the key-value pairs in the
first block and the queries in the last, i.e. several windows away. Only context injection
(the SSM's summary of earlier blocks handed to the attention as context) can carry the pairs
across; the local-only model can do no better than chance (1/values).

`lengths`: the BST-SH of `recall` alone, with the S4D options and training length mix given,
evaluated at 1, 2, 4 and 8 × the training length (the queries 2–8 × further from the pairs):
the rows of docs/results.md, "Length generalisation".
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bstc.runtime.config import OptimizerConfig, RunConfig


@dataclass(frozen=True)
class RecallSetup:
    d_model: int = 64
    heads: int = 2
    window: int = 16
    seq_len: int = 64            # 4 blocks: pairs in block 0, queries in block 3
    ssm_state: int = 32
    pairs: int = 4
    values: int = 8              # chance = 1/8
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0
    ssm_init: str = "lin"        # s4d `init`
    centre: bool = True          # s4d `centre`
    length_mix: tuple[int, ...] = ()  # training length factors (empty: seq_len only)


def recall_model_text(s: RecallSetup, context: bool) -> str:
    from bstc.runtime.recall_table import network_text

    ssm = f"s4d(state: ssm_state, init: {s.ssm_init}, centre: {str(s.centre).lower()})"
    bst = f"""ssm_state = {s.ssm_state}
  block bst(context = sh) {{
    ssm  = {ssm}
    attn = block_attention(window: window, context: ssm -> context)
    mlp  = mlp(hidden: 2 * d_model, act: gelu)
  }}"""
    label = "BST-SH (context injection)" if context else "block-local attention only"
    return network_text(label, f"recall_{'bst' if context else 'local'}", bst,
                        ("local", "bst" if context else "local", "local"),
                        d_model=s.d_model, heads=s.heads, window=s.window, seq_len=s.seq_len)


def run_recall(s: RecallSetup = RecallSetup(), out: Path | None = None, progress: bool = False) -> dict:
    """Train both models; return their validation accuracy/loss and the chance level."""
    from bstc.runtime.model import spec_from_file
    from bstc.runtime.trainer import train

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="bstc-recall-"))
    out.mkdir(parents=True, exist_ok=True)
    res: dict = dict(setup=s.__dict__, chance=1 / s.values)
    for name, ctx in (("bst_sh", True), ("local_only", False)):
        f = out / f"{name}.bst"
        f.write_text(recall_model_text(s, ctx))
        spec = spec_from_file(f, {})
        cfg = RunConfig(model=str(f), task="recall", task_args=dict(pairs=s.pairs, values=s.values),
                        steps=s.steps, batch=s.batch, optimizer=OptimizerConfig(lr=s.lr, weight_decay=0.0),
                        seed=s.seed, eval_every=max(1, s.steps // 4), eval_batches=8, ckpt_every=s.steps, keep=1)
        t0 = time.perf_counter()
        r = train(cfg, out / name, spec, progress=progress, plot=True, tensorboard=False)
        res[name] = dict(accuracy=r.val["accuracy"], loss=r.val["loss"], scored=r.val["tokens"],
                         seconds=round(time.perf_counter() - t0, 1), run_dir=str(out / name))
    (out / "recall.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def run_lengths(s: RecallSetup = RecallSetup(), out: Path | None = None, progress: bool = False,
                factors: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Train the BST-SH of `recall`; its accuracy and answer loss at each factor × seq_len."""
    from bstc.runtime.evaluator import evaluate
    from bstc.runtime.model import spec_from_file
    from bstc.runtime.trainer import train

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="bstc-lengths-"))
    out.mkdir(parents=True, exist_ok=True)
    f = out / "bst_sh.bst"
    f.write_text(recall_model_text(s, True))
    spec = spec_from_file(f, {})
    cfg = RunConfig(model=str(f), task="recall", task_args=dict(pairs=s.pairs, values=s.values),
                    steps=s.steps, batch=s.batch, optimizer=OptimizerConfig(lr=s.lr, weight_decay=0.0),
                    seed=s.seed, eval_every=0, eval_batches=8, ckpt_every=s.steps, keep=1,
                    length_mix=list(s.length_mix) or None)
    t0 = time.perf_counter()
    train(cfg, out / "bst_sh", spec, progress=progress, plot=False, tensorboard=False)
    ev = evaluate(out / "bst_sh", lengths=[s.seq_len * m for m in factors], max_tokens=2**16)
    res = dict(setup={**s.__dict__, "length_mix": list(s.length_mix)}, chance_loss=math.log(s.values),
               seconds=round(time.perf_counter() - t0, 1), run_dir=str(out / "bst_sh"),
               lengths={L: dict(accuracy=r["accuracy"], loss=r["loss"]) for L, r in ev["lengths"].items()})
    (out / "lengths.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bstc.runtime.experiments")
    p.add_argument("experiment", choices=["recall", "lengths"])
    p.add_argument("--steps", type=int, default=RecallSetup.steps)
    p.add_argument("--pairs", type=int, default=RecallSetup.pairs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--init", default="lin", choices=["lin", "inv", "real"], help="lengths: s4d init")
    p.add_argument("--no-centre", action="store_true", help="lengths: s4d centre: false")
    p.add_argument("--length-mix", default="", help="lengths: training length factors, e.g. 1,2")
    a = p.parse_args(argv)
    if a.experiment == "lengths":
        mix = tuple(int(m) for m in a.length_mix.split(",") if m.strip())
        s = RecallSetup(steps=a.steps, pairs=a.pairs, seed=a.seed, ssm_init=a.init, centre=not a.no_centre,
                        length_mix=mix)
        print(json.dumps(run_lengths(s, a.out, progress=True), indent=2))
        return
    res = run_recall(RecallSetup(steps=a.steps, pairs=a.pairs, seed=a.seed), a.out, progress=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
