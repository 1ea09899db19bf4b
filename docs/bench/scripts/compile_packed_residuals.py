"""Does the scan's compile time fall if the unit's residuals travel as one buffer? Train-step
(AdamW) compile and step time of the zoo's bst_sh_s4 (d_model 64, seq_len 256, window 64) at 4
layers and at 24 (a scan over six 4-layer units), with the scan body as it is, or wrapped in a
custom VJP whose forward saves every float32 residual of the unit concatenated into one array
(the loop then stacks one residual buffer instead of one per intermediate).

    python docs/bench/scripts/compile_packed_residuals.py none      # the body as lowered
    python docs/bench/scripts/compile_packed_residuals.py packed    # residuals packed"""
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import bstc
from bstc import lower as lowering
from bstc.compile import plain_train_step
from bstc.runtime.model import resolve_model


def packed(body):
    """body(carry, inp) -> (carry, None), with its residuals saved as one float32 array."""
    layout = {}

    def primal(carry, inp):
        return body(carry, inp)[0]

    @jax.custom_vjp
    def f(carry, inp):
        return primal(carry, inp)

    def fwd(carry, inp):
        out, vjp = jax.vjp(primal, carry, inp)
        leaves, layout["tree"] = jax.tree_util.tree_flatten(vjp)
        inputs = {id(a): i for i, a in enumerate(jax.tree_util.tree_leaves(inp))}
        plan, pack, other = [], [], []
        for a in leaves:
            if id(a) in inputs:  # a weight: read back from the inputs, not saved again
                plan.append(("input", inputs[id(a)], None))
            elif a.dtype == jnp.float32 and a.ndim:
                plan.append(("pack", len(pack), a.shape))
                pack.append(a)
            else:
                plan.append(("other", len(other), None))
                other.append(a)
        layout["plan"], layout["offsets"] = plan, np.cumsum([0] + [a.size for a in pack])
        return out, (jnp.concatenate([a.reshape(-1) for a in pack]), tuple(other), inp)

    def bwd(res, g):
        flat, other, inp = res
        inputs, off = jax.tree_util.tree_leaves(inp), layout["offsets"]
        leaves = [inputs[i] if kind == "input" else other[i] if kind == "other"
                  else flat[off[i]:off[i + 1]].reshape(shape) for kind, i, shape in layout["plan"]]
        return jax.tree_util.tree_unflatten(layout["tree"], leaves)(g)

    f.defvjp(fwd, bwd)
    return lambda carry, inp: (f(carry, inp), None)


mode = sys.argv[1] if len(sys.argv) > 1 else "none"
if mode == "packed":  # as a remat policy, given only to the 24-layer model: its one stage is the scan
    plain_remat = lowering._remat
    lowering.REMAT_POLICIES += ("packed",)
    lowering._remat = lambda f, policy: packed(f) if policy == "packed" else plain_remat(f, policy)
for groups in (1, 6):
    overrides = {"d_model": 64, "heads": 2, "seq_len": 256, "window": 64, "groups": groups}
    m = bstc.parse(str(resolve_model("bst_sh_s4")), overrides=overrides)
    remat = "packed" if mode == "packed" and groups > 1 else "none"
    params, static = eqx.partition(lowering.lower(m, key=jax.random.key(0), scan=True, remat=remat),
                                   eqx.is_inexact_array)
    opt, step = plain_train_step(static, 1e-3)
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 256)
    state = opt.init(params)
    lowered = jax.jit(step).lower(params, state, tokens)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, state, tokens))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(compiled(params, state, tokens))
    print(f"{mode:6s} {4 * groups:2d} layers  compile {seconds:.2f} s  step {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms  "
          f"fused computations {compiled.as_text().count('fused_computation')}", flush=True)
