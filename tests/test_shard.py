"""Sharding: logical axes, mesh rules checked before any device (a table of bad declarations,
each with its exact diagnostic), `bstc explain --mesh`, and — in a subprocess with 8 fake CPU
devices — sharded == unsharded (loss, gradients, a few training steps) under data, FSDP,
tensor and mixed meshes, and a sharded checkpoint restored onto a different mesh.

The main pytest process keeps its single CPU device (other test files rely on it): everything
that needs 8 devices runs in `subprocess.run([sys.executable, script])` with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import FAST_CODEGEN, assert_sharded_equals_single_device
from jax.sharding import PartitionSpec as P

import bstc
from bstc import placement, shard, shard_plan
from bstc.errors import BstcError
from bstc.passes.mesh import DEFAULT_RULES, LOGICAL_AXES, resolve_mesh

ROOT = Path(__file__).resolve().parent.parent

# A tiny BST: 5 × (local, bst) scanned (bstc.lower.SCAN_MIN_COUNT), then one more local. MESH is line 23: the table below
# points there.
TINY = """\
model tiny {
  vocab = 64
  d_model = 32
  heads = 4
  window = 8
  seq_len = 32
  block local {
    attn = block_attention(window: window)
    mlp  = mlp(hidden: 48, act: gelu)
  }
  block bst(context = sh) {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> context)
    mlp  = mlp(hidden: 48, act: gelu)
  }
  layers {
    embed
    repeat 5 { local; bst }
    local
    norm rms
    head untied
  }
MESH
}
"""


def tiny(mesh: str = "") -> str:
    return TINY.replace("MESH", mesh)


def write(tmp_path, mesh: str = "", name: str = "m.bst") -> Path:
    p = tmp_path / name
    p.write_text(tiny(mesh))
    return p


# ---- the table of bad declarations -------------------------------------------------------------
# (id, mesh/rules lines at line 23, --mesh option, devices present, batch, expected diagnostics:
#  the "file:line:col: error: message" line and the "= help:" text (None: no help) of each, in order)

BAD = [
    ("unknown-logical-axis", "  rules { btach -> data }", None, None, None,
     [("m.bst:23:11: error: unknown logical axis 'btach'", "did you mean 'batch'?")]),
    ("unknown-logical-axis-no-close-name", "  rules { zzz -> data }", None, None, None,
     [("m.bst:23:11: error: unknown logical axis 'zzz'",
       "logical axes: batch, channels, embed, experts, filters, heads, kv, layers, mlp, seq, ssm_state, vocab")]),
    ("unknown-mesh-axis", "  mesh { data = 2 }\n  rules { heads -> tensr }", None, None, None,
     [("m.bst:24:20: error: rule 'heads' names unknown mesh axis 'tensr'", "mesh axes: data")]),
    ("unknown-mesh-axis-default-names", "  rules { heads -> tensr }", None, None, None,
     [("m.bst:23:20: error: rule 'heads' names unknown mesh axis 'tensr'", "did you mean 'tensor'?")]),
    ("two-rules-one-logical-axis", "  mesh { data = 2, tensor = 2 }\n  rules { heads -> tensor; heads -> data }",
     None, None, None,
     [("m.bst:24:28: error: logical axis 'heads' is claimed by two rules", "the first is at line 24; keep one")]),
    ("mesh-axis-twice-in-rule", "  mesh { data = 2, fsdp = 2 }\n  rules { batch -> (data, data) }", None, None, None,
     [("m.bst:24:20: error: rule 'batch' names a mesh axis twice", None)]),
    ("mesh-axis-declared-twice", "  mesh { data = 2, data = 4 }", None, None, None,
     [("m.bst:23:20: error: mesh axis 'data' is declared twice", "first declared at line 23")]),
    ("mesh-axis-size-zero", "  mesh { data = 0 }", None, None, None,
     [("m.bst:23:10: error: mesh axis 'data' must have a positive integer size, got 0", None)]),
    ("mesh-axis-size-not-integer", "  mesh { data = 3 / 2 }", None, None, None,
     [("m.bst:23:10: error: mesh axis 'data' must have a positive integer size, got 1.5", None)]),
    ("heads-not-divisible", "  mesh { data = 1, tensor = 8 }\n  rules { heads -> tensor }", None, None, None,
     [("m.bst:24:11: error: rule 'heads -> tensor' splits 'heads' of size 4 (the model's heads) into 8 "
       "shards (tensor=8), which does not divide it", "choose mesh sizes that divide 4, or replicate it with "
       "`heads -> ()`")]),
    ("mlp-not-divisible", "  mesh { tensor = 5 }\n  rules { heads -> (); vocab -> (); channels -> (); mlp -> tensor }",
     None, None, None,
     [("m.bst:24:53: error: rule 'mlp -> tensor' splits 'mlp' of size 48 (local.0-4.mlp.w_in (5, 32, 48)) into 5 "
       "shards (tensor=5), which does not divide it",
       "choose mesh sizes that divide 48, or replicate it with `mlp -> ()`; 5 more parameters affected")]),
    ("embed-not-divisible-by-default-rule", "  mesh { fsdp = 3 }\n  rules { batch -> () }", None, None, None,
     [("m.bst:23:10: error: the default rule 'embed -> fsdp' splits 'embed' of size 32 (embed.weight (64, 32)) "
       "into 3 shards (fsdp=3), which does not divide it",
       "choose mesh sizes that divide 32, or replicate it with `embed -> ()`; 30 more parameters affected")]),
    ("batch-not-divisible", "  mesh { data = 4 }", None, None, 6,
     [("m.bst:23:10: error: the default rule 'batch -> (data, fsdp)' splits 'batch' of size 6 (the batch) "
       "into 4 shards (data=4), which does not divide it",
       "use a batch divisible by 4, or mesh sizes whose product divides 6")]),
    ("mesh-larger-than-devices", "  mesh { data = 4, tensor = 4 }", None, 8, None,
     [("m.bst:23:10: error: the mesh needs 16 devices (data=4 × tensor=4) but only 8 are present",
       "shrink the mesh with --mesh, e.g. --mesh data=8")]),
    ("option-larger-than-devices", "", "data=2,tensor=2", 1, None,
     [("<--mesh>:1:1: error: the mesh needs 4 devices (data=2 × tensor=2) but only 1 is present",
       "shrink the mesh with --mesh, e.g. --mesh data=1; on a CPU, "
       "XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices")]),
    ("option-unknown-axis", "", "data=2,tensr=2", None, None,
     [("<--mesh>:1:8: error: unknown mesh axis 'tensr'", "did you mean 'tensor'?")]),
    ("option-bad-syntax", "", "data:2", None, None,
     [("<--mesh>:1:1: error: --mesh expects axis=size pairs separated by commas, got 'data:2'",
       "e.g. --mesh data=2,tensor=4")]),
    ("option-zero-size", "", "data=0", None, None,
     [("<--mesh>:1:1: error: mesh axis 'data' must have a positive integer size, got '0'", None)]),
    ("option-heads-not-divisible", "", "tensor=3", None, None,
     [("<--mesh>:1:1: error: the default rule 'heads -> tensor' splits 'heads' of size 4 (the model's "
       "heads) into 3 shards (tensor=3), which does not divide it",
       "choose mesh sizes that divide 4, or replicate it with `heads -> ()`; 12 more parameters affected"),
      ("<--mesh>:1:1: error: the default rule 'channels -> tensor' splits 'channels' of size 32 "
       "(bst.0-4.ssm.log_dt (5, 32)) into 3 shards (tensor=3), which does not divide it",
       "choose mesh sizes that divide 32, or replicate it with `channels -> ()`; 5 more parameters affected"),
      ("<--mesh>:1:1: error: the default rule 'vocab -> tensor' splits 'vocab' of size 64 (embed.weight (64, 32)) "
       "into 3 shards (tensor=3), which does not divide it",
       "choose mesh sizes that divide 64, or replicate it with `vocab -> ()`; 1 more parameter affected")]),
    ("option-unknown-axis-for-file-mesh", "  mesh { data = 2, model = 2 }\n  rules { heads -> model }",
     "data=2,modle=2", None, None, [("<--mesh>:1:8: error: unknown mesh axis 'modle'", "did you mean 'model'?")]),
]


def _diagnose(tmp_path, mesh_text, option, devices, batch) -> BstcError:
    path = write(tmp_path, mesh_text)
    with pytest.raises(BstcError) as ei:
        m = bstc.parse(str(path))
        shard_plan.plan(m, option, n_devices=devices, batch=batch)
    return ei.value


def _lines(e: BstcError) -> list[tuple[str, str | None]]:
    out = []
    for d in e.diagnostics:
        first = str(e.render()).split("\n")  # noqa: F841 - rendering must not fail
        loc = f"{Path(d.span.file).name if d.span and d.span.file != '<--mesh>' else (d.span.file if d.span else '')}"
        out.append((f"{loc}:{d.span.line}:{d.span.col}: error: {d.message}" if d.span else f"error: {d.message}", d.hint))
    return out


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_mesh_table(tmp_path, case):
    _id, mesh_text, option, devices, batch, expected = case
    got = _lines(_diagnose(tmp_path, mesh_text, option, devices, batch))
    assert len(got) == len(expected), got
    for (line, hint), (want_line, want_hint) in zip(got, expected):
        assert line == want_line
        assert hint == want_hint


def test_rendered_diagnostic_has_caret_under_the_rule(tmp_path):
    e = _diagnose(tmp_path, "  mesh { data = 1, tensor = 8 }\n  rules { heads -> tensor }", None, None, None)
    text = e.render()
    assert "24 |   rules { heads -> tensor }" in text
    assert "   |           ^^^^^" in text
    assert "help: choose mesh sizes that divide 4, or replicate it with `heads -> ()`" in text


def test_divisibility_names_the_parameter(tmp_path):
    e = _diagnose(tmp_path, "  mesh { tensor = 5 }\n  rules { heads -> (); vocab -> (); channels -> (); mlp -> tensor }",
                  None, None, None)
    msg = e.diagnostics[0].message
    assert "(local.0-4.mlp.w_in (5, 32, 48))" in msg, msg  # the first parameter affected, by its layer names
    assert "into 5 shards (tensor=5), which does not divide it" in msg


def test_yaml_mesh_errors_are_located(tmp_path):
    y = tmp_path / "m.yaml"
    # the YAML twin of a model with a bad rule: the diagnostic points into the YAML file
    src = (ROOT / "models" / "bst_sh_s4.yaml").read_text()
    y.write_text(src + "\nmesh: {data: 2}\nrules: {heads: tensr}\n")
    with pytest.raises(BstcError) as ei:
        bstc.parse(str(y))
    (d,) = ei.value.diagnostics
    assert d.message == "rule 'heads' names unknown mesh axis 'tensr'"
    assert d.span.file.endswith("m.yaml") and d.span.line == len(src.splitlines()) + 3


# ---- resolution, specs, logical axes -----------------------------------------------------------


def test_spec_for_uses_each_mesh_axis_once():
    rules = dict(DEFAULT_RULES)
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    # the residual stream: batch takes data and fsdp, so embed (-> fsdp) stays whole
    assert shard.spec_for(("batch", "seq", "embed"), rules, sizes) == P(("data", "fsdp"))
    assert shard.spec_for(("layers", "embed", "mlp"), rules, sizes) == P(None, "fsdp", "tensor")
    assert shard.spec_for(("embed", "heads"), rules, {"data": 8}) == P()  # size-1 axes are left out
    assert shard.spec_for(("vocab", "embed"), rules, sizes) == P("tensor", "fsdp")


def test_default_mesh_is_data_parallel_over_all_devices():
    m = bstc.parse(tiny())
    rm = resolve_mesh(m, None, n_devices=8)
    assert rm.shape == {"data": 8, "fsdp": 1, "tensor": 1} and rm.origin == "default"
    assert rm.rule_map["batch"] == ("data", "fsdp") and rm.rule_map["heads"] == ("tensor",)


def test_option_overrides_the_file_mesh(tmp_path):
    m = bstc.parse(str(write(tmp_path, "  mesh { data = 4, fsdp = 2 }\n  rules { mlp -> () }")))
    rm = resolve_mesh(m, "data=2,tensor=4", n_devices=8)
    assert rm.shape == {"data": 2, "tensor": 4, "fsdp": 1} and rm.origin == "--mesh"
    assert rm.rule_map["mlp"] == () and rm.rule_map["heads"] == ("tensor",)  # file rules still apply
    assert resolve_mesh(m, None).shape == {"data": 4, "fsdp": 2, "tensor": 1}


def test_every_parameter_has_known_logical_axes():
    m = bstc.parse(tiny())
    p = shard_plan.plan(m, "data=2,fsdp=2,tensor=2", batch=8)
    names = {r.name for r in p.rows}
    assert "embed.weight" in {n for n in names if n.startswith("embed")} or any(n.startswith("embed") for n in names)
    for r in p.rows:
        assert len(r.logical) == len(r.shape), r
        assert all(n is None or n in LOGICAL_AXES for n in r.logical), r
        if r.name.startswith(("local.0-4", "bst.0-4")):  # scanned stacks: a leading layers axis
            assert r.logical[0] == "layers" and r.shape[0] == 5, r
    assert any(r.name.startswith("bst.0-4") for r in p.rows)
    # tensor parallel reaches the attention (heads) and the MLP (mlp), FSDP the model width
    specs = {r.name: r.spec for r in p.rows}
    assert any("tensor" in str(s) for n, s in specs.items() if ".attn." in n), specs
    assert any("tensor" in str(s) for n, s in specs.items() if ".mlp." in n and "norm" not in n), specs
    assert sum(r.bytes for r in p.rows) == bstc.explain(m).param_bytes


def test_a_parameter_no_layer_kind_names_is_an_error_not_replicated():
    """Axes come from the kind that built each module, never from key-path strings: a module
    whose field its kind does not declare (a renamed field) and an array outside every kind's
    module are both refused."""
    import equinox as eqx
    import jax.numpy as jnp

    from bstc.lower import lower
    from bstc.params import param_axes

    m = bstc.parse(tiny())
    model = jax.eval_shape(lambda: lower(m, key=jax.random.key(0)))
    assert param_axes(m, model) is not None

    class Renamed(eqx.Module):  # the untied head with its field renamed
        w: jax.Array

    renamed = eqx.tree_at(lambda t: t.head, model, Renamed(jax.ShapeDtypeStruct((64, 32), jnp.float32)))
    with pytest.raises(TypeError, match="'w' has no logical axes"):
        param_axes(m, renamed)

    block = model.stages[-1].block
    stray = eqx.tree_at(lambda t: t.stages[-1].block, model, (block, jax.ShapeDtypeStruct((3,), jnp.float32)))
    with pytest.raises(TypeError, match="outside every layer kind"):
        param_axes(m, stray)


def test_per_device_memory_shrinks_with_fsdp():
    m = bstc.parse(tiny())
    one = shard_plan.plan(m, "data=1").memory(8)
    fsdp = shard_plan.plan(m, "fsdp=8").memory(8)
    assert fsdp["params"] < one["params"] / 3
    assert fsdp["activations"] == pytest.approx(one["activations"] / 8)


def test_explain_mesh_cli(tmp_path):
    from typer.testing import CliRunner

    from bstc.cli import app

    path = write(tmp_path)
    r = CliRunner().invoke(app, ["explain", str(path), "--mesh", "data=2,tensor=4"])
    assert r.exit_code == 0, r.output
    assert "mesh data=2 × tensor=4 = 8 devices (from --mesh)" in r.output
    assert "partition spec" in r.output and "per device:" in r.output
    r = CliRunner().invoke(app, ["explain", str(path), "--mesh", "data=2,tensor=4", "--json"])
    d = json.loads(r.output)
    assert d["sharding"]["mesh"] == {"data": 2, "tensor": 4, "fsdp": 1}
    assert d["sharding"]["memory_per_device"]["total"] > 0
    r = CliRunner().invoke(app, ["explain", str(path), "--mesh", "tensor=3"])
    assert r.exit_code == 1
    assert "<--mesh>:1:1: error: the default rule 'heads -> tensor'" in r.output


def test_validate_checks_the_mesh_section_against_the_parameters(tmp_path):
    from typer.testing import CliRunner

    from bstc.cli import app

    bad = write(tmp_path, "  mesh { tensor = 5 }\n  rules { heads -> (); vocab -> (); channels -> (); mlp -> tensor }")
    r = CliRunner().invoke(app, ["validate", str(bad)])
    assert r.exit_code == 1
    assert "m.bst:24:53: error: rule 'mlp -> tensor' splits 'mlp' of size 48" in r.output
    good = write(tmp_path, "  mesh { data = 2, tensor = 4 }", name="good.bst")
    r = CliRunner().invoke(app, ["validate", str(good)])
    assert r.exit_code == 0, r.output


def test_constrain_is_identity_outside_a_sharded_trace():
    x = jax.numpy.ones((2, 4, 8))
    assert shard.constrain(x, shard.ACTIVATION) is x


# ---- 8 fake devices, in a subprocess --------------------------------------------------------------

# The model the sharded runs train: the BST block (S4D context source -> block attention -> MLP),
# scanned five times (bstc.lower.SCAN_MIN_COUNT). Small, so each mesh costs one compile of a few seconds.
RUN_MODEL = '''\
model run {
  vocab = 64
  d_model = 32
  heads = 4
  window = 8
  seq_len = 32
  block bst(context = sh) {
    ssm  = s4d(state: 8)
    attn = block_attention(window: window, context: ssm -> context)
    mlp  = mlp(hidden: 48, act: gelu)
  }
  layers {
    embed
    repeat 5 { bst }
    norm rms
    head untied
  }
}
'''

# The baselines' attention kinds side by side (fused q|k|v projections, the BRT's fused state
# projections and per-part output maps), so that a tensor-parallel mesh splits them by heads.
BASELINES_MODEL = '''\
model baselines {
  vocab = 64
  d_model = 32
  heads = 4
  window = 8
  seq_len = 32
  block full  { attn = full_attention() }
  block slide { attn = sliding_attention(window: window) }
  block xl    { attn = xl_attention(window: window, memory: 8) }
  block rec   { rec = brt(window: window, state: 4, gate: lstm, skip: false, hidden: 48, norm: none) }
  layers {
    embed
    full
    slide
    xl
    rec
    norm rms
    head untied
  }
}
'''

SHARDED = r'''
import json, re, sys
import jax, jax.numpy as jnp, numpy as np, equinox as eqx, optax
assert jax.device_count() == 8, jax.devices()
import bstc
from bstc import placement, shard, shard_plan
model_path, meshes, out = sys.argv[1], sys.argv[2], sys.argv[3]
m = bstc.parse(model_path)
B, L, V = 8, m.dims.seq_len, m.dims.vocab
model = bstc.load(model_path, key=jax.random.key(0))
tx = optax.adamw(3e-3)
batches = []
for s in range(3):
    tok = np.random.default_rng(s).integers(0, V, (B, L + 1)).astype(np.int32)
    batches.append({"inputs": tok[:, :-1], "targets": tok[:, 1:]})

def loss_fn(model, b):
    lp = jax.nn.log_softmax(model(b["inputs"]), -1)
    return -jnp.take_along_axis(lp, b["targets"][..., None], -1).mean()

def step(state, b):  # one AdamW step; also returns the loss and gradients it took
    model, opt = state
    l, g = eqx.filter_value_and_grad(loss_fn)(model, b)
    upd, opt = tx.update(g, opt, eqx.filter(model, eqx.is_array))
    return (eqx.apply_updates(model, upd), opt), {"loss": l, "grads": g}

def flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))])

def train(state, f, bs):
    losses, g0 = [], None
    for b in bs:
        state, o = f(state, b)
        losses.append(float(o["loss"]))
        g0 = flat(o["grads"]) if g0 is None else g0
    return state, losses, g0

state0 = (model, tx.init(eqx.filter(model, eqx.is_array)))
st, ref_losses, ref_g = train(state0, eqx.filter_jit(step), batches)
ref_params = flat(st[0])
res = {"ref_losses": ref_losses, "meshes": {}}
for mesh_txt in meshes.split(";"):
    p = shard_plan.plan(m, mesh_txt, n_devices=8, batch=B)
    mesh = placement.make_mesh(p)
    sh = placement.tree_shardings(state0, p, mesh)
    state = placement.shard_tree(state0, sh)
    bsh = placement.batch_sharding(p, mesh)
    f = placement.sharded_step(step, mesh, p, sh, bsh, donate=False)
    gbs = [placement.global_batch(b, bsh) for b in batches]
    state, losses, g = train(state, f, gbs)
    leaves = jax.tree.leaves(eqx.filter(state[0], eqx.is_array))
    # the FFT convolution runs on local blocks (XLA alone would gather it: openxla/xla#24)
    hlo = f.jitted.lower(eqx.filter(state, eqx.is_array), gbs[0]).compile().as_text()
    ffts = sorted({re.search(r"= \S+?\[([\d,]+)\]", l).group(1) for l in hlo.splitlines() if " fft(" in l})
    res["meshes"][mesh_txt] = {
        "losses": losses, "grad_err": float(np.abs(g - ref_g).max()), "grad_scale": float(np.abs(ref_g).max()),
        "param_err": float(np.abs(flat(state[0]) - ref_params).max()),
        "specs": sorted({str(x.sharding.spec) for x in leaves}), "ffts": ffts,
        "n_sharded": sum(not x.sharding.is_fully_replicated for x in leaves),
    }
json.dump(res, open(out, "w"))
'''

CKPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np, equinox as eqx, optax
import orbax.checkpoint as ocp
import bstc
from bstc import placement, shard, shard_plan
model_path, ckdir, out = sys.argv[1], sys.argv[2], sys.argv[3]
m = bstc.parse(model_path)
model = bstc.load(model_path, key=jax.random.key(0))
tx = optax.adamw(1e-3)
state0 = (model, tx.init(eqx.filter(model, eqx.is_array)))
arrays0 = eqx.filter(state0, eqx.is_array)

# save sharded over fsdp=8: each device writes its own shard
pa = shard_plan.plan(m, "fsdp=8", n_devices=8)
ma = placement.make_mesh(pa)
saved = placement.shard_tree(arrays0, placement.tree_shardings(arrays0, pa, ma))
placement.save_checkpoint(ckdir, saved)

# restore straight onto data=2,tensor=4 (a different mesh, different specs)
pb = shard_plan.plan(m, "data=2,tensor=4", n_devices=8)
mb = placement.make_mesh(pb)
target = placement.tree_shardings(arrays0, pb, mb)
restored = placement.restore_checkpoint(ckdir, arrays0, target)
errs, moved = [], 0
for a, b, t in zip(jax.tree.leaves(arrays0), jax.tree.leaves(restored), jax.tree.leaves(target)):
    errs.append(float(np.abs(np.asarray(a) - np.asarray(b)).max()))
    assert b.sharding.is_equivalent_to(t, a.ndim), (b.sharding, t)
    moved += int(str(b.sharding.spec) != "PartitionSpec()")
json.dump({"max_err": max(errs), "n": len(errs), "tensor_sharded": moved}, open(out, "w"))
'''


def _subprocess(script: str, tmp_path, *args, timeout: int = 300, devices: int = 8) -> dict:
    """Run `script ARGS... OUT` with `devices` fake CPU devices; return the JSON it wrote to OUT."""
    f = tmp_path / "script.py"
    f.write_text(script)
    out = tmp_path / "out.json"
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # fake devices; optimisation level 0 halves XLA's CPU compile time (same numerics on both sides)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                         + FAST_CODEGEN)
    r = subprocess.run([sys.executable, str(f), *map(str, args), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


MESHES = ["data=8", "fsdp=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"]


def test_baseline_attention_sharded_by_heads_equals_single_device(tmp_path):
    """Full, sliding, Transformer-XL and BRT attention under tensor parallelism: their fused
    projections are split by heads, and loss, gradients and 3 steps equal one device's."""
    path = tmp_path / "baselines.bst"
    path.write_text(BASELINES_MODEL)
    mesh_txt = "data=2,tensor=4"
    res = _subprocess(SHARDED, tmp_path, path, mesh_txt)
    assert_sharded_equals_single_device(res, mesh_txt)
    got = res["meshes"][mesh_txt]
    # (in, part, out) projections split over their heads axis, output maps over their rows
    assert "P(None, None, 'tensor')" in got["specs"], got["specs"]
    assert "P(None, 'tensor')" in got["specs"], got["specs"]


@pytest.mark.parametrize("meshes", [
    pytest.param(["data=2,fsdp=2,tensor=2"], id="mixed"),  # data, FSDP and tensor parallel at once
    pytest.param(MESHES, id="data-fsdp-tensor-mixed", marks=pytest.mark.slow),  # each on its own too
])
def test_sharded_equals_single_device(tmp_path, meshes):
    """Loss and gradients of the first step, the losses of 3 AdamW steps and the final weights:
    the same on 8 devices under each mesh as on one device."""
    path = tmp_path / "run.bst"
    path.write_text(RUN_MODEL)
    res = _subprocess(SHARDED, tmp_path, path, ";".join(meshes))
    ref = res["ref_losses"]
    assert ref[-1] < ref[0]
    for mesh_txt in meshes:
        got = res["meshes"][mesh_txt]
        assert got["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6), mesh_txt
        assert got["grad_err"] <= 1e-4 * got["grad_scale"], (mesh_txt, got)
        assert got["param_err"] < 1e-4, (mesh_txt, got)
        if mesh_txt != "data=8":  # parameters really are split (data parallel replicates them)
            assert got["n_sharded"] > 0, (mesh_txt, got)
        if "tensor" in mesh_txt:
            assert any("tensor" in s for s in got["specs"]), got["specs"]
        if "fsdp" in mesh_txt:
            assert any("fsdp" in s for s in got["specs"]), got["specs"]
        # every FFT sees its device's rows (8 / batch shards) and channels (32 / tensor shards)
        sizes = dict(kv.split("=") for kv in mesh_txt.split(","))
        rows = 8 // (int(sizes.get("data", 1)) * int(sizes.get("fsdp", 1)))
        chans = 32 // int(sizes.get("tensor", 1))
        assert got["ffts"], got
        for shape in got["ffts"]:
            dims = [int(x) for x in shape.split(",")]
            assert 32 not in dims[:-1] or chans == 32, (mesh_txt, got["ffts"])  # never all channels
            assert dims[0] <= rows, (mesh_txt, got["ffts"])  # never the whole batch


def test_sharded_checkpoint_restores_onto_another_mesh(tmp_path):
    path = tmp_path / "run.bst"
    path.write_text(RUN_MODEL)
    res = _subprocess(CKPT, tmp_path, path, tmp_path / "ckpt")
    assert res["max_err"] == 0.0 and res["n"] > 10 and res["tensor_sharded"] > 0


# The runtime's checkpoints: saved by 8 devices (fsdp=8), restored by a one-device process from
# a template of shapes alone, as `bstc eval` does with a run trained on a mesh.
RUNTIME_SAVE = r'''
import sys
import jax, numpy as np, equinox as eqx
import bstc
from bstc import placement, shard_plan
from bstc.runtime.checkpoint import Checkpointer
import json
model_path, ckdir, saved, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = bstc.load(model_path, key=jax.random.key(0))
plan = shard_plan.plan(bstc.parse(model_path), "fsdp=8", n_devices=8)
mesh = placement.make_mesh(plan)
arrays = eqx.filter(model, eqx.is_array)
sharded = eqx.combine(placement.shard_tree(arrays, placement.tree_shardings(arrays, plan, mesh)), model)
ck = Checkpointer(ckdir)
ck.save(1, sharded, None, {})
ck.close()
np.savez(saved, *[np.asarray(x) for x in jax.tree.leaves(arrays)])
json.dump({"sharded": sum(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(eqx.filter(sharded, eqx.is_array)))},
          open(out, "w"))
'''
RUNTIME_RESTORE = r'''
import json, sys
import jax, numpy as np, equinox as eqx
import bstc
from bstc.runtime.checkpoint import Checkpointer
model_path, ckdir, saved, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
template = eqx.filter_eval_shape(lambda: bstc.load(model_path, key=jax.random.key(1)))
state, _ = Checkpointer(ckdir).restore(1, template, None, None)
want = np.load(saved)
got = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))]
json.dump({"n": len(got), "equal": all(np.array_equal(g, want[f"arr_{i}"]) for i, g in enumerate(got)),
           "devices": jax.device_count()}, open(out, "w"))
'''


def test_a_mesh_checkpoint_restores_in_a_one_device_process(tmp_path):
    path = tmp_path / "run.bst"
    path.write_text(RUN_MODEL)
    args = (path, tmp_path / "ckpt", tmp_path / "saved.npz")
    assert _subprocess(RUNTIME_SAVE, tmp_path, *args)["sharded"] > 0
    res = _subprocess(RUNTIME_RESTORE, tmp_path, *args, devices=1)
    assert res == {"n": res["n"], "equal": True, "devices": 1} and res["n"] > 10


# ---- the runtime on a mesh (the CLI, in subprocesses) --------------------------------------------


def _cli(args, cwd, devices: int = 1, timeout: int = 300):
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 {FAST_CODEGEN}")
    r = subprocess.run([sys.executable, "-m", "bstc.cli", *map(str, args)], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


@pytest.mark.slow
def test_train_cli_on_a_mesh_resumes_on_another(tmp_path):
    """`bstc train --mesh` on 8 devices computes the one-device run's losses, and its sharded
    checkpoint resumes on a different mesh (orbax restores straight into the new shardings)."""
    (tmp_path / "run.bst").write_text(RUN_MODEL)
    common = ["--set", "vocab=256", "--batch", "8", "--eval-every", "0", "--preset", "none", "-q"]
    _cli(["train", "run.bst", "--steps", "2", "-o", "one", *common], tmp_path)
    _cli(["train", "--resume", "-o", "one", "--steps", "4", "-q"], tmp_path)
    _cli(["train", "run.bst", "--steps", "2", "-o", "mesh", "--mesh", "data=2,fsdp=2,tensor=2", *common],
         tmp_path, devices=8)
    _cli(["train", "--resume", "-o", "mesh", "--steps", "4", "--mesh", "fsdp=4,tensor=2", "-q"], tmp_path, devices=8)
    one, mesh = train_losses(tmp_path / "one"), train_losses(tmp_path / "mesh")
    assert sorted(one) == sorted(mesh) == [1, 2, 3, 4]
    for s in one:
        assert mesh[s] == pytest.approx(one[s], rel=1e-5), (s, one, mesh)
    _cli(["eval", "mesh"], tmp_path)  # the 8-device checkpoint, evaluated on one device
    assert (tmp_path / "mesh" / "eval" / "eval-validation.json").is_file()


def test_train_cli_mesh_errors_are_located(tmp_path):
    (tmp_path / "run.bst").write_text(RUN_MODEL)
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-m", "bstc.cli", "train", "run.bst", "--mesh", "data=2,tensor=2",
                        "--steps", "1", "--preset", "none", "--set", "vocab=256", "-q", "-o", "x"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "<--mesh>:1:1: error: the mesh needs 4 devices (data=2 × tensor=2) but only 1 is present" in r.stderr
    assert "Traceback" not in r.stderr
