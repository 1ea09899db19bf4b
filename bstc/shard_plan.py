"""The sharding plan: every parameter's logical axes and PartitionSpec on a mesh, the checks
that each mesh axis divides what it shards, memory per device, and the `explain --mesh` report.

Computed from shapes alone (`jax.eval_shape`), so `bstc explain --mesh tensor=64` works on a
laptop; problems are BstcErrors located at the rule (or the `--mesh` option) that causes them.
Placing arrays by the plan is bstc.placement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import equinox as eqx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from bstc import ir
from bstc.errors import Collector
from bstc.lower import lower
from bstc.ops import REGISTRY
from bstc.params import is_names, param_axes, param_names
from bstc.passes.mesh import LOGICAL_AXES, ResolvedMesh, resolve_mesh
from bstc.passes.report import op_args
from bstc.shard import shards, spec_for


def _arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


@dataclass
class ParamRow:
    name: str
    shape: tuple
    dtype: str
    logical: tuple
    spec: P
    bytes: int
    bytes_per_device: float


@dataclass
class ShardPlan:
    """Everything about how a model is laid out on a mesh, computed from shapes only."""

    model: ir.Model
    mesh: ResolvedMesh
    abstract: Any            # the LoweredModel with ShapeDtypeStruct leaves
    logical: Any             # pytree of logical-name tuples (prefix: arrays of `abstract`)
    specs: Any               # pytree of PartitionSpecs (same structure)
    rows: list[ParamRow]
    batch: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return self.mesh.rule_map

    rule_map = rules  # what bstc.shard.activate reads, as from a ResolvedMesh

    @property
    def sizes(self) -> dict[str, int]:
        return self.mesh.shape

    def spec(self, names: Iterable[str | None]) -> P:
        return spec_for(names, self.rules, self.sizes)

    @property
    def param_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def param_bytes_per_device(self) -> float:
        return sum(r.bytes_per_device for r in self.rows)

    def memory(self, batch: int | None = None, optimizer_moments: int = 2) -> dict[str, float]:
        """Per-device bytes: parameters, gradients, optimizer moments (f32, sharded like the
        parameters), and activations kept for backward at `batch` (sharded over the batch and
        seq axes), from bstc explain's estimate."""
        batch = batch or self.batch or 8
        f32_pd = sum(r.bytes_per_device * 4 / max(np.dtype(r.dtype).itemsize, 1) for r in self.rows)
        out = dict(params=self.param_bytes_per_device, grads=self.param_bytes_per_device,
                   optimizer=optimizer_moments * f32_pd, activations=self.activation_bytes(batch))
        out["total"] = sum(out.values())
        return out


    def activation_bytes(self, batch: int) -> float:
        """Per-device activations kept for backward (bstc explain's per-op estimate): tokens split
        over the batch and seq axes; inside a sublayer, what goes beyond its residual-stream input
        split over its tensor-parallel axis (heads, mlp, channels), the logits over vocab."""
        d = self.model.dims
        item = 2 if d.dtype == "bfloat16" else 4
        split = lambda name: math.prod(shards(self.spec((name,)), self.sizes)) or 1  # noqa: E731
        by_role = {"attn": "heads", "mlp": "mlp", "ssm": "channels"}
        emb = REGISTRY["embedding"]
        per_token = emb.activation_bytes_per_token(op_args("embedding"), d, None)
        for inst in self.model.layers:
            for s in inst.sublayers:
                op = REGISTRY[s.kind]
                a = op.activation_bytes_per_token(s.kwargs, d, s.context_spec)
                resid = d.d_model * item
                k = split(by_role[op.role]) if op.role in by_role else 1
                per_token += min(a, resid) + max(a - resid, 0.0) / k
        per_token += d.vocab * 4 / split("vocab")  # f32 logits
        tokens = batch * d.seq_len / (math.prod(shards(self.spec(("batch", "seq")), self.sizes)) or 1)
        return per_token * tokens


def _display_dtype(a) -> str:
    return str(np.dtype(a.dtype))


def plan(m: ir.Model, mesh: str | Mapping[str, int] | None = None, *, n_devices: int | None = None,
         batch: int | None = None, abstract=None, scan: bool = True) -> ShardPlan:
    """Resolve the mesh and rules for `m`, give every parameter its PartitionSpec, and check
    that each mesh axis divides every dimension it shards (and the batch, and the heads).
    Raises BstcError with the rule's (or --mesh's) location. Touches no device."""
    rm = resolve_mesh(m, mesh, n_devices)
    if abstract is None:
        abstract = jax.eval_shape(lambda: lower(m, key=jax.random.key(0), scan=scan))
    logical = param_axes(m, abstract)
    rules, sizes = rm.rule_map, rm.shape
    specs = jax.tree.map(lambda names: spec_for(names, rules, sizes), logical, is_leaf=is_names)

    errors = Collector(dict(rm.sources))
    bad: dict[str, list] = {}  # logical -> [(display, shape, dim size, shards)]

    def note(logical_name, what, shape, n, k):
        bad.setdefault(logical_name, []).append((what, shape, n, k))

    rows: list[ParamRow] = []
    arrays = jax.tree.leaves(eqx.filter(abstract, _arraylike), is_leaf=_arraylike)
    displays = jax.tree.leaves(param_names(m, abstract))
    for a, display, names, spec in zip(arrays, displays, jax.tree.leaves(logical, is_leaf=is_names),
                                       jax.tree.leaves(specs)):
        split = shards(spec, sizes) + [1] * (len(a.shape) - len(spec))
        for n, k, nm in zip(a.shape, split, names):
            if k > 1 and n % k:
                note(nm, display, tuple(a.shape), n, k)
        nbytes = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        rows.append(ParamRow(display, tuple(a.shape), _display_dtype(a), tuple(names), spec, nbytes,
                             nbytes / math.prod(split)))
    # Semantic sizes: a head must not be split, and the batch must split evenly.
    d = m.dims
    for lname, n in (("heads", d.heads), ("batch", batch)):
        if n is None:
            continue
        k = math.prod(shards(spec_for((lname,), rules, sizes), sizes))
        if k > 1 and n % k:
            what = "the model's heads" if lname == "heads" else "the batch"
            bad.setdefault(lname, []).insert(0, (what, None, n, k))
    order = list(rules) + [k for k in LOGICAL_AXES if k not in rules]
    for lname, items in sorted(bad.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        what, shape, n, k = items[0]
        axes = [a for a in rules.get(lname, ()) if sizes.get(a, 1) > 1]
        over = " × ".join(f"{a}={sizes[a]}" for a in axes)
        where = f"{what} {ir.fmt_shape(shape)}" if shape is not None else what
        default = "" if lname in rm.rule_spans else "the default "
        msg = (f"{default}rule '{lname} -> {_target(rules.get(lname, ()))}' splits '{lname}' of size {n} ({where}) "
               f"into {k} shards ({over}), which does not divide it")
        others = len({it[0] for it in items[1:]} - {what})
        g = math.gcd(*[it[2] for it in items])
        if lname == "batch":
            hint = f"use a batch divisible by {k}, or mesh sizes whose product divides {g}"
        else:
            hint = f"choose mesh sizes that divide {g}, or replicate it with `{lname} -> ()`"
        if others:
            hint += f"; {others} more parameter{'s' if others != 1 else ''} affected"
        errors.error(rm.rule_span(lname), msg, hint)
    errors.raise_if_any()
    return ShardPlan(m, rm, abstract, logical, specs, rows, batch)


def _target(t: tuple[str, ...]) -> str:
    return t[0] if len(t) == 1 else "(" + ", ".join(t) + ")"


def _fmt_spec(spec: P) -> str:
    parts = []
    for e in spec:
        parts.append("·" if e is None else e if isinstance(e, str) else "(" + ",".join(e) + ")")
    return "(" + ", ".join(parts) + ")" if parts else "replicated"


def plan_dict(p: ShardPlan, batch: int | None = None) -> dict:
    """The plan as JSON-able data (for `bstc explain --mesh … --json`)."""
    return dict(
        mesh=dict(p.mesh.axes), origin=p.mesh.origin, devices=p.mesh.size,
        rules={k: list(v) for k, v in p.mesh.rules},
        params=[dict(name=r.name, shape=list(r.shape), dtype=r.dtype, logical=list(r.logical),
                     spec=[None if e is None else e if isinstance(e, str) else list(e) for e in r.spec],
                     bytes=r.bytes, bytes_per_device=r.bytes_per_device) for r in p.rows],
        memory_per_device=p.memory(batch),
    )


def print_plan(p: ShardPlan, batch: int | None = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from bstc.passes.report import bytes_h

    c = console or Console(width=160)
    rules = "; ".join(f"{k} -> {_target(v) if v else '()'}" for k, v in p.mesh.rules)
    c.print(f"[bold]mesh[/] {p.mesh.describe()} = {p.mesh.size} device{'s' if p.mesh.size != 1 else ''} "
            f"(from {p.mesh.origin}) · rules: {rules}")
    t = Table(box=None, header_style="bold")
    for col, just in (("parameter", "left"), ("shape", "left"), ("logical axes", "left"),
                      ("partition spec", "left"), ("per device", "right")):
        t.add_column(col, justify=just)
    for r in p.rows:
        t.add_row(r.name, ir.fmt_shape(r.shape), "(" + ", ".join(n or "·" for n in r.logical) + ")",
                  _fmt_spec(r.spec), bytes_h(r.bytes_per_device))
    c.print(t)
    mem = p.memory(batch)
    c.print(f"per device: params {bytes_h(mem['params'])} · grads {bytes_h(mem['grads'])} · "
            f"AdamW moments {bytes_h(mem['optimizer'])} · activations {bytes_h(mem['activations'])} "
            f"at batch {batch or p.batch or 8} · [bold]total {bytes_h(mem['total'])}[/] "
            f"(params {bytes_h(p.param_bytes)} unsharded)")
