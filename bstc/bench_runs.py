"""Benchmarks that time one thing at several sizes: compile time against depth, decoding
speed, and the checker on large model files (`bstc bench compile|decode|check`)."""
from __future__ import annotations

import statistics
import time

from bstc.bench import machine_info


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
