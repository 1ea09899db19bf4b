"""Multi-host: two processes on localhost joined by jax.distributed (CPU, gloo collectives), each
with 2 fake CPU devices (a 4-device mesh data=2 × tensor=2 spanning both), each reading only its
own rows of every batch (jax.make_array_from_process_local_data). They train a few steps of a
tiny BST and must agree with each other and with one process training on the whole batch.

Only 127.0.0.1 is used, on a port the OS hands out; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import FAST_CODEGEN
from test_shard import ROOT, RUN_MODEL

WORKER = r'''
import json, os, sys
pid, nproc, port, model_path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
import jax
import numpy as np
from bstc import placement, shard_plan
# jax.config.update("jax_cpu_collectives_implementation", "gloo") happens inside, before initialize
assert placement.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, cpu_collectives="gloo", timeout_s=60)
import equinox as eqx, jax.numpy as jnp, optax
import bstc

m = bstc.parse(model_path)
B, L, V = 8, m.dims.seq_len, m.dims.vocab
p = shard_plan.plan(m, "data=2,tensor=2", n_devices=jax.device_count(), batch=B)
mesh = placement.make_mesh(p)
model = bstc.load(model_path, key=jax.random.key(0))  # same seed everywhere: same initial weights
tx = optax.adamw(3e-3)

def loss_fn(model, b):
    lp = jax.nn.log_softmax(model(b["inputs"]), -1)
    return -jnp.take_along_axis(lp, b["targets"][..., None], -1).mean()

def step(state, b):
    model, opt = state
    l, g = eqx.filter_value_and_grad(loss_fn)(model, b)
    upd, opt = tx.update(g, opt, eqx.filter(model, eqx.is_array))
    return (eqx.apply_updates(model, upd), opt), {"loss": l}

def batch_of(s):  # the global batch of step s (every process could make it; each reads its rows)
    tok = np.random.default_rng(s).integers(0, V, (B, L + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:]}

state0 = (model, tx.init(eqx.filter(model, eqx.is_array)))
sh = placement.tree_shardings(state0, p, mesh)
state = placement.shard_tree(state0, sh)
bsh = placement.batch_sharding(p, mesh)
start, stop = placement.local_rows(bsh, (B, L))
f = placement.sharded_step(step, mesh, p, sh, {"inputs": bsh, "targets": bsh})
losses = []
for s in range(3):
    local = {k: v[start:stop] for k, v in batch_of(s).items()}  # only this process's rows
    state, st = f(state, placement.global_batch(local, bsh, B))
    losses.append(float(st["loss"]))
# every process ends with the same parameters: compare a checksum of its addressable shards' global sum
total = float(jax.jit(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(t)),
                      out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(
    eqx.filter(state[0], eqx.is_array)))
res = {"pid": pid, "losses": losses, "rows": [start, stop], "devices": jax.device_count(),
       "local_devices": jax.local_device_count(), "param_sum": total}
if pid == 0:  # the reference: one process, one device, the whole batch
    ref, st0 = [], jax.device_put(state0, jax.local_devices()[0])
    ref_step = eqx.filter_jit(step)
    for s in range(3):
        st0, o = ref_step(st0, batch_of(s))
        ref.append(float(o["loss"]))
    res["ref_losses"] = ref
json.dump(res, open(out, "w"))
jax.distributed.shutdown()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree(tmp_path):
    path = tmp_path / "run.bst"
    path.write_text(RUN_MODEL)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    pypath = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 " + FAST_CODEGEN,
               PYTHONPATH=os.pathsep.join(pypath))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"log{i}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), str(i), "2", str(port), str(path),
                                       str(tmp_path / f"out{i}.json")], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join(f"--- process {i}:\n" + (tmp_path / f"log{i}.txt").read_text()[-3000:] for i in range(2))
    assert all(p.returncode == 0 for p in procs), tails
    r0, r1 = (json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2))
    assert r0["devices"] == r1["devices"] == 4 and r0["local_devices"] == 2
    assert sorted([tuple(r0["rows"]), tuple(r1["rows"])]) == [(0, 4), (4, 8)]  # each its own rows
    assert r0["losses"] == r1["losses"]  # the loss is one global value
    assert r0["losses"] == pytest.approx(r0["ref_losses"], rel=1e-5, abs=1e-6)
    assert r0["losses"][-1] < r0["losses"][0]
    assert r0["param_sum"] == r1["param_sum"]


@pytest.mark.slow
def test_train_cli_two_processes(tmp_path):
    """`bstc train --coordinator … --num-processes 2 --process-id i` on localhost: each process
    reads its own examples, they write one sharded checkpoint, and the losses are the one-process ones."""
    from test_shard import _cli, train_losses

    (tmp_path / "run.bst").write_text(RUN_MODEL)
    common = ["--set", "vocab=256", "--batch", "8", "--eval-every", "0", "--preset", "none", "-q", "--steps", "3"]
    _cli(["train", "run.bst", "-o", "one", *common], tmp_path)
    port = free_port()
    pypath = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(pypath),
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 " + FAST_CODEGEN)
    procs = [subprocess.Popen([sys.executable, "-m", "bstc.cli", "train", "run.bst", "-o", "two", *common,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert sorted(x.name for x in (tmp_path / "two" / "checkpoints" / "3" / "data").iterdir()
                  if x.name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5), (s, one, two)
