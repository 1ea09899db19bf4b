"""Where a BST-SH layer's time goes: forward + backward of the layer and of its parts, each
compiled once and timed interleaved in one process (median of 5 rounds, rotating order).

    python docs/bench/scripts/profile_bst_sh.py [L] [batch]

Sizes as `bstc bench layers`' defaults: D 256, 4 heads, W 256, S4D state 64."""
import dataclasses
import sys

import jax

from _interleaved import compiled_grad, median_times
from bstc.bench import BenchConfig, build_layer
from bstc.ops import _ssm

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
B = int(sys.argv[2]) if len(sys.argv) > 2 else 2
cfg = BenchConfig(d_model=256, heads=4, window=256, batch=B)
H = cfg.d_model
sh, slide = (build_layer(n, cfg, L, key=jax.random.key(0)) for n in ("bst_sh_s4", "slide"))
s4d, ba, mlp, sa = sh.subs[0].op, sh.subs[1].op, sh.subs[2].op, slide.subs[0].op
x = jax.random.normal(jax.random.key(1), (B, L, H))
parts = {}


def add(name, module, f):
    """f(module, x) -> output; timed: the gradient of its sum w.r.t. the module and x."""
    parts[name] = compiled_grad(module, f, x)


add("BST-SH layer", sh, lambda m, x: m(x))
add("Slide layer", slide, lambda m, x: m(x))
add("s4d sublayer (centre)", s4d, lambda m, x: m(x))
add("s4d sublayer, no centre", dataclasses.replace(s4d, centre=False), lambda m, x: m(x))
add("  kernel generation", s4d, lambda m, x: m.kernel(L) + 0 * x[0, 0, 0])
add("  FFT convolution", s4d, lambda m, x: _ssm.multi_filter_fft_conv(x, m.kernel(L)))
add("  gelu + output map", s4d, lambda m, x: _ssm.ssm_head(x[:, :, None], m.w_out, m.b_out, x.dtype))
add("block attention (sh context)", ba, lambda m, x: m(x, context=x))
add("sliding attention", sa, lambda m, x: m(x))
add("mlp", mlp, lambda m, x: m(x))
times = median_times(parts, x, rounds=5)
ref = times["BST-SH layer"]
print(f"L={L} batch={B}, forward + backward, median of 5 interleaved rounds")
for n, m in times.items():
    print(f"{n:32s} {1e3 * m:9.1f} ms  {m / ref:5.2f}× the BST-SH layer")
