"""What the layer-profile scripts share: compile the gradient of a function of a module, then
time several such programs interleaved in one process (median over rounds, rotating order)."""
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp


def compiled_grad(module, f, x):
    """(compiled program, params, XLA flops) for the gradient of sum(f(module, x)) w.r.t. the
    module's arrays and x; run once so that timing sees no first-call work."""
    p, static = eqx.partition(module, eqx.is_inexact_array)
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(f(eqx.combine(p, static), x)), argnums=(0, 1)))
    c = g.lower(p, x).compile()
    jax.block_until_ready(c(p, x))
    return c, p, (c.cost_analysis() or {}).get("flops", float("nan"))


def median_times(parts: dict, x, rounds: int) -> dict[str, float]:
    """parts: name -> (compiled, params, …); the median seconds of each over `rounds` rounds."""
    times = {n: [] for n in parts}
    names = list(parts)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c, p = parts[n][:2]
            t0 = time.perf_counter()
            jax.block_until_ready(c(p, x))
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}
