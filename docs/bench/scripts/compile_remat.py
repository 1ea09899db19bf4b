"""Train-step (AdamW) compile time of the zoo's bst_sh_s4 at d_model 64, seq_len 256, window 64:
4 layers, and 24 layers scanned under each rematerialisation policy and unrolled; one compile
each, with the number of fused computations in the optimised HLO.

    python docs/bench/scripts/compile_remat.py"""
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import bstc
from bstc.compile import plain_train_step
from bstc.lower import lower
from bstc.runtime.model import resolve_model

for groups, scan, remat in ((1, True, "none"), (6, True, "none"), (6, True, "dots"), (6, True, "full"),
                            (6, False, "none")):
    overrides = {"d_model": 64, "heads": 2, "seq_len": 256, "window": 64, "groups": groups}
    m = bstc.parse(str(resolve_model("bst_sh_s4")), overrides=overrides)
    params, static = eqx.partition(lower(m, key=jax.random.key(0), scan=scan, remat=remat), eqx.is_inexact_array)
    opt, step = plain_train_step(static, 1e-3)
    lowered = jax.jit(step).lower(params, opt.init(params), jnp.zeros((1, 256), jnp.int32))
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    print(f"{4 * groups:3d} layers  {'scan' if scan else 'unrolled':8s}  remat {remat:4s}  compile {seconds:.2f} s  "
          f"fused computations {compiled.as_text().count('fused_computation')}", flush=True)
