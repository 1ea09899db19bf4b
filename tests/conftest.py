"""Shared test helpers: tiny overrides for zoo models, so every test runs in seconds on a CPU."""
from __future__ import annotations

import os

# Tests never need more than the CPU; keep XLA from grabbing every core's worth of threads twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling dominates the suite's time and the tests' arrays are tiny: XLA's backend without its
# expensive LLVM passes compiles about a third faster. Only code generation changes, not the
# optimised HLO, so results and the XLA cost analysis that cost-rule tests compare with do not.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# At that level XLA's older loop emitters generate code for a fusion in about half the time of its
# MLIR fusion emitters, and one codegen thread per program suits two test workers on two cores:
# 20 first calls of a random normal of new shapes, 3.7 s -> 2.1 s; the smoke LM table, 184 s -> 100 s.
# Code generation only, again: the HLO, and so the results, are the same.
# XLA aborts the process on a flag its version does not know, so the flags are tried once in
# a throwaway interpreter (the result is passed on to xdist workers and subprocesses).
if "BSTC_TEST_FAST_CODEGEN" not in os.environ:
    import subprocess
    import sys

    _flags = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    _probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
                            env=dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {_flags}"),
                            capture_output=True, timeout=300)
    os.environ["BSTC_TEST_FAST_CODEGEN"] = _flags if _probe.returncode == 0 else ""
FAST_CODEGEN = os.environ["BSTC_TEST_FAST_CODEGEN"]
if FAST_CODEGEN not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CODEGEN}".strip()
# Token shards of the test corpora go to a temporary cache, not the user's ~/.cache/bstc/data.
os.environ.setdefault("BSTC_DATA_CACHE", os.path.join(__import__("tempfile").gettempdir(), "bstc-test-data-cache"))

import pytest  # noqa: E402

TINY = dict(groups=1, d_model=32, heads=2, window=16, seq_len=64, mlp_hidden=64, ssm_state=8, context_states=4,
            memory=16, state_vectors=16)


# The smallest BST (S4D context source -> block attention -> MLP, twice): for sampling tests.
SMALL_BST = """
model tiny {
  vocab = 256
  d_model = 32
  heads = 2
  window = 8
  seq_len = 32
  block bst {
    ssm = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> sh)
    mlp = mlp(hidden: 64)
  }
  layers { embed; bst; bst; norm rms; head tied }
}
"""


# A model file with three independent mistakes (unknown kind, dangling context source, seq_len
# not divisible by window): `bstc validate` must report all three.
THREE_MISTAKES = """\
model three {
  vocab = 256; d_model = 64; heads = 4; window = 16
  seq_len = 100
  block bst {
    ssm  = s4dd(state: 16)
    attn = block_attention(window: window, context: ssm2 -> sh)
  }
  layers { embed; bst; head tied }
}
"""


def tiny_overrides(path, **extra) -> dict:
    """The tests' TINY restricted to the parameters the model file defines (`bstc.zoo.preset_overrides`)."""
    from bstc.zoo import preset_overrides

    return {**preset_overrides(path, TINY), **extra}


def zoo_paths():
    from bstc import zoo

    return zoo.list_models()


def zoo_params(fast=("bst_sh_s4.bst", "transformer.bst")):
    """Every zoo file as a pytest param; all but `fast` are marked slow. For sweeps whose every
    layer kind is also covered by the contract test (tests/test_contract.py), so the default
    suite keeps a representative pair and `pytest -m slow` runs the rest."""
    return [pytest.param(p, id=p.name, marks=() if p.name in fast else pytest.mark.slow) for p in zoo_paths()]


@pytest.fixture
def tiny():
    return tiny_overrides


# ---- one small model per registered layer kind (the contract and optimizer-role tests) ----------
STRUCTURAL_KINDS = {"embedding", "head", "rms_norm", "layer_norm"}  # every model has them


def _kind_sublayers(kind: str) -> list[str]:
    from bstc.ops import REGISTRY

    if kind == "block_attention":
        return ["attn = block_attention(window: window)"]
    fill = {"window": "window: window", "hidden": "hidden: 32"}
    args = ", ".join(fill.get(p.name, f"{p.name}: 8") for p in REGISTRY[kind].params if p.required)
    return [f"x = {kind}({args})"]


def kind_cases() -> list[list[str]]:
    """Block bodies that together use every registered kind: each non-structural kind alone,
    and every context source feeding block attention in each context variant (sh, mh, mf)."""
    from bstc.ops import REGISTRY

    out = [_kind_sublayers(k) for k in sorted(REGISTRY) if k not in STRUCTURAL_KINDS]
    for src in sorted(k for k, op in REGISTRY.items() if op.context_source):
        for variant, filters in (("sh", 1), ("mh", 2), ("mf", 4)):
            out.append([f"src = {src}(filters: {filters})",
                        f"attn = block_attention(window: window, context: src -> {variant})"])
    return out


def kind_case_id(subs: list[str]) -> str:
    kinds = "+".join(x.split("=")[1].split("(")[0].strip() for x in subs)
    return kinds + ("-" + subs[-1].split("-> ")[1].split(")")[0].split(",")[0] if "->" in subs[-1] else "")


def kind_model_text(subs: list[str], norm: str = "rms", tied: bool = False, repeat: int = 3) -> str:
    body = "\n    ".join(subs)
    return f"""model m {{
  vocab = 64
  d_model = 16
  heads = 2
  window = 8
  seq_len = 32
  block b {{
    {body}
  }}
  layers {{ embed; repeat {repeat} {{ b }}; norm {norm}; head {'tied' if tied else 'untied'} }}
}}
"""


# ---- hooks that tests inject into the training loop (bstc.runtime.trainer.Hook) ----


def _hook_base():
    from bstc.runtime.trainer import Hook

    return Hook


class StopAfter(_hook_base()):
    """End the run after step `n` with a checkpoint, as if the process were killed there."""

    def __init__(self, n: int):
        self.n = n

    def after_step(self, run, step, stats):
        from bstc.runtime.trainer import StopRun

        if step >= self.n:
            raise StopRun


class PoisonLoss(_hook_base()):
    """Step `n` returns a NaN loss and NaN parameters, as a diverging run would."""

    def __init__(self, n: int):
        self.n = n

    def wrap_step(self, step_fn):
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        def poisoned(state, batch):
            new, stats = step_fn(state, batch)
            if int(new.step) == self.n:
                nan = lambda x: x * jnp.nan if eqx.is_inexact_array(x) else x  # noqa: E731
                new = eqx.tree_at(lambda s: s.model, new, jax.tree.map(nan, new.model))
                stats = {**stats, "loss": jnp.float32(jnp.nan)}
            return new, stats

        return poisoned



def assert_causal(forward, tokens, vocab: int, positions=(3, 8)) -> None:
    """Causality by perturbation: changing the tokens from position t on leaves every output
    before t as it was, and changes the output at t (it sees its own token). Positions: inside
    the first block and at a block boundary, plus the last."""
    import jax.numpy as jnp
    import numpy as np

    L = tokens.shape[1]
    ref = np.asarray(forward(tokens))
    scale = np.abs(ref).max()
    for t in (*positions, L - 1):
        bumped = tokens.at[:, t:].set((tokens[:, t:] + 1 + jnp.arange(L - t)) % vocab)
        got = np.asarray(forward(bumped))
        np.testing.assert_allclose(got[:, :t], ref[:, :t], atol=1e-5 * scale, rtol=0, err_msg=f"t={t}")
        assert np.abs(got[:, t] - ref[:, t]).max() > 1e-6 * scale, f"position {t} does not see its own token"


def assert_sharded_equals_single_device(res: dict, mesh_txt: str) -> None:
    """The sharded run (test_shard.SHARDED's result) matches one device: losses, gradients and
    the parameters after 3 steps."""
    import pytest as _pytest

    ref, got = res["ref_losses"], res["meshes"][mesh_txt]
    assert got["losses"] == _pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert got["grad_err"] <= 1e-4 * got["grad_scale"], got
    assert got["param_err"] < 1e-4, got
