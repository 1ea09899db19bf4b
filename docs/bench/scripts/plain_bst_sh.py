"""bstc's BST-SH layer against a straightforward plain-JAX implementation of the same layer,
forward + backward, compiled once each and timed interleaved in one process (median of 7
rounds, rotating order); the Slide layer beside them for scale.

    python docs/bench/scripts/plain_bst_sh.py [L] [batch]

The plain layer is what one writes from the paper without tuning: the S4D kernel through its
full (H, N/2, L) Vandermonde tensor, one FFT convolution, GELU and the output map; keys and
values of the context and of the block projected separately and concatenated, attention by
einsum with an explicit mask; a GELU MLP; pre-RMS norms. It reads bstc's parameters and must
give bstc's output (checked below), so both compute the same function.

Sizes as `bstc bench layers`' defaults: D 256, 4 heads, W 256, S4D state 64."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from _interleaved import compiled_grad, median_times
from bstc.bench import BenchConfig, build_layer

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
B = int(sys.argv[2]) if len(sys.argv) > 2 else 2
cfg = BenchConfig(d_model=256, heads=4, window=256, batch=B)
D, NH, W = cfg.d_model, cfg.heads, cfg.window
sh, slide = (build_layer(n, cfg, L, key=jax.random.key(0)) for n in ("bst_sh_s4", "slide"))


def rms(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g


def rope(x):  # (B, nb, W, H, dh), positions within the block, half-split convention
    half = x.shape[-1] // 2
    ang = jnp.arange(W, dtype=jnp.float32)[:, None] / 10000.0 ** (jnp.arange(half) / half)
    cos, sin = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def plain_bst_sh(p, x):
    """The BST-SH layer written plainly; p: bstc's parameters (read, not reused as code)."""
    (n0, s4), (n1, at), (n2, mlp) = ((s.norm.weight, s.op) for s in p.subs)
    # S4D context source (no residual): kernel by Vandermonde, causal FFT convolution, centred.
    u = rms(x, n0)
    A = -jnp.exp(s4.log_A_re) + 1j * s4.A_im
    dtA = jnp.exp(s4.log_dt)[:, None] * A
    Cp = (s4.C[0, ..., 0] + 1j * s4.C[0, ..., 1]) * (jnp.exp(dtA) - 1) / A
    K = 2 * jnp.einsum("hn,hnl->hl", Cp, jnp.exp(dtA[..., None] * jnp.arange(L))).real  # (H, L)
    y = jnp.fft.irfft(jnp.fft.rfft(u, 2 * L, axis=1) * jnp.fft.rfft(K.T, 2 * L, axis=0), 2 * L, axis=1)[:, :L]
    mean = jnp.cumsum(u, axis=1) / jnp.arange(1, L + 1)[None, :, None]
    y = y - mean * jnp.cumsum(K, axis=1).T + s4.D[0] * u
    ctx = jax.nn.gelu(y) @ s4.w_out.T + s4.b_out
    # Block attention: queries of block k see block k-1's context (block 0: a learned one) and
    # their own block causally.
    h = rms(x, n1)
    nb, dh = L // W, D // NH
    blocks = lambda t: t.reshape(B, nb, W, NH, dh)  # noqa: E731
    q, k, v = rope(blocks(h @ at.wq)), rope(blocks(h @ at.wk)), blocks(h @ at.wv)
    c = jnp.concatenate([jnp.broadcast_to(at.ctx_first, (B, 1, W, D)), ctx.reshape(B, nb, W, D)[:, :-1]], 1)
    k = jnp.concatenate([blocks(c @ at.wk), k], 2)
    v = jnp.concatenate([blocks(c @ at.wv), v], 2)
    mask = jnp.concatenate([jnp.ones((W, W), bool), jnp.tril(jnp.ones((W, W), bool))], 1)
    logits = jnp.einsum("bkqhd,bkshd->bkhqs", q, k) / jnp.sqrt(dh)
    a = jax.nn.softmax(jnp.where(mask, logits, -1e30), -1)
    x = x + jnp.einsum("bkhqs,bkshd->bkqhd", a, v).reshape(B, L, D) @ at.wo
    return x + jax.nn.gelu(rms(x, n2) @ mlp.w_in) @ mlp.w_out


x = jax.random.normal(jax.random.key(1), (B, L, D))
np.testing.assert_allclose(np.asarray(jax.jit(plain_bst_sh)(sh, x)), np.asarray(jax.jit(lambda m, x: m(x))(sh, x)),
                           rtol=2e-3, atol=2e-3)
parts = {"bstc BST-SH layer": compiled_grad(sh, lambda m, x: m(x), x),
         "plain BST-SH layer": compiled_grad(sh, plain_bst_sh, x),
         "bstc Slide layer": compiled_grad(slide, lambda m, x: m(x), x)}
times = median_times(parts, x, rounds=7)
ref = times["plain BST-SH layer"]
print(f"L={L} batch={B}, forward + backward, median of 7 interleaved rounds; outputs agree")
for n, m in times.items():
    print(f"{n:22s} {1e3 * m:9.1f} ms  {m / ref:5.2f}× the plain layer   XLA flops {parts[n][2] / 1e9:7.2f} G")
