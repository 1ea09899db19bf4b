"""Lower the checked IR to an Equinox module.

* Each block occurrence becomes a `Block` of sublayers; the residual stream, norm placement
  and context edges follow the IR exactly.
* Repeating runs of blocks (a single block repeated, or a repeating pattern of several, like
  `repeat 3 { local; bst; local; local }`) are built once with `filter_vmap` (stacked weights)
  and run with `jax.lax.scan`, so compile time stays nearly flat as depth grows.
* Blocks in a `share` group hold one set of weights, stored once in `shared`.
* dtype policy: parameters are stored in `param_dtype` and cast to the compute `dtype` at call
  time; ops that must stay in float32 (SSM kernels, FFTs, softmax) upcast internally; logits are
  returned in float32.

One module, longer than most, because its parts are one concern that must change together:
the block walk (forward and decode step), the stages that run blocks, and the builder that
makes them from the IR.
"""
from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bstc import ir
from bstc.ops import REGISTRY
from bstc.ops.base import ContextSpec
from bstc.passes.report import block_end_window, norm_kind, op_args
from bstc.shard import ACTIVATION, SOURCE, constrain  # identity unless a sharded step is being traced

REMAT_POLICIES = ("none", "full", "dots")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Sub(eqx.Module):
    """One sublayer: optional norm + op, with its place in the residual stream."""

    norm: eqx.Module | None
    op: eqx.Module
    name: str = eqx.field(static=True)
    placement: str = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    # the sublayer whose output is this op's context; several (a tuple) with several edges
    context_source: str | tuple[str, ...] | None = eqx.field(static=True)
    keep_output: bool = eqx.field(static=True)  # another sublayer reads this one's output
    kind: str = eqx.field(static=True, default="")  # the registered layer kinds that built
    norm_kind: str | None = eqx.field(static=True, default=None)  # `op` and `norm`
    # W: the op's readers take only its outputs at positions W−1, 2W−1, … (an 'mf' context), so
    # it computes just those with `op.block_ends` (report.block_end_window); 0: every position.
    block_ends: int = eqx.field(static=True, default=0)
    # The op's arguments and context, as its kind built it: what the kind's `logical_axes`
    # needs to name each parameter's axes (bstc.params.param_axes).
    args: tuple = eqx.field(static=True, default=())
    context: ContextSpec | tuple[ContextSpec, ...] | None = eqx.field(static=True, default=None)


def split_aux(out):
    """An op's output and its auxiliary loss: ops whose class sets `returns_aux` return
    `(y, aux)` with aux a float32 scalar, already weighted (a router's load-balancing loss);
    every other op returns y alone."""
    return out if isinstance(out, tuple) else (out, None)


class Block(eqx.Module):
    """One block occurrence. `_walk` is the only place where norm placement, the residual
    stream and context edges are written: the forward pass and the one-token decode step
    differ only in how a norm and an op are applied."""

    subs: tuple[Sub, ...]

    def _walk(self, x, apply_norm, apply_op):
        outputs: dict[str, Any] = {}
        aux = jnp.zeros((), jnp.float32)
        for i, sub in enumerate(self.subs):
            h = apply_norm(i, sub, x) if (sub.norm is not None and sub.placement == "pre") else x
            src = sub.context_source  # several edges: their outputs, in the order written
            ctx = None if src is None else outputs[src] if isinstance(src, str) else tuple(outputs[n] for n in src)
            y, a = apply_op(i, sub, h, ctx)
            if a is not None:
                aux = aux + a
            if sub.keep_output:
                outputs[sub.name] = y
            if sub.residual:
                x = x + y.astype(x.dtype)
                if sub.norm is not None and sub.placement == "post":
                    x = apply_norm(i, sub, x)
        return x, aux

    def forward(self, x: Float[Array, "B L D"], *, key=None) -> tuple[Float[Array, "B L D"], Array]:
        """(output, auxiliary loss of this block's ops)."""
        keys = jax.random.split(key, len(self.subs)) if key is not None else [None] * len(self.subs)

        def apply_op(i, sub, h, ctx):
            if sub.block_ends:
                y, a = sub.op.block_ends(h, sub.block_ends, key=keys[i]), None
            else:
                y, a = split_aux(sub.op(h, context=ctx, key=keys[i]))
            if sub.keep_output:  # a context source (SSM): its FFT convolution splits over channels
                y = constrain(y, SOURCE.get(y.ndim, ()))
            return y, a

        x, aux = self._walk(x, lambda i, sub, x: sub.norm(x), apply_op)
        return constrain(x, ACTIVATION), aux  # block boundary: (batch, seq, embed) per the mesh rules

    def __call__(self, x: Float[Array, "B L D"], *, key=None) -> Float[Array, "B L D"]:
        return self.forward(x, key=key)[0]

    # ---- decoding (bstc.decode): the same walk, one token at a time with a cache per layer ----
    def decodable(self) -> list[str]:
        """Names of the op classes here that have no decode step."""
        return [type(m).__name__ for sub in self.subs for m in (sub.op, sub.norm)
                if m is not None and not hasattr(m, "decode")]

    def init_cache(self, batch: int, dtype, length: int | None) -> tuple:
        return tuple((sub.norm.init_cache(batch, dtype, length) if sub.norm is not None else None,
                      sub.op.init_cache(batch, dtype, length)) for sub in self.subs)

    def step(self, cache: tuple, x: Float[Array, "B D"], t) -> tuple[tuple, Float[Array, "B D"]]:
        new = [list(c) for c in cache]

        def apply_norm(i, sub, x):
            new[i][0], y = sub.norm.decode(new[i][0], x, t)
            return y

        def apply_op(i, sub, h, ctx):
            new[i][1], y = sub.op.decode(new[i][1], h, t, context=ctx)
            return y, None

        x, _ = self._walk(x, apply_norm, apply_op)
        return tuple(tuple(c) for c in new), x


# ---- stages: every stage runs, caches and steps its blocks behind the same three methods ----


# The fewest repetitions planned as a lax.scan over stacked weights. A shorter run is planned as
# single blocks with weights of their own: a scan's loop costs a fixed compile time that only
# pays off from about five repetitions (the zoo's 4-block unit, AdamW step, CPU: a scan of 3
# compiled 1.5x slower than unrolled, 4: 1.15x, 5: the same, 6: 0.8x), and even a Python loop
# over stacked weights compiled 1.06-1.28x slower than the blocks unrolled, for the copies of
# weight slices it makes (docs/benchmarks.md, "Compile time against depth").
SCAN_MIN_COUNT = 5


class Scanned(eqx.Module):
    """`count` repetitions of a unit of blocks; every array leaf has a leading axis of size count."""

    unit: tuple[Block, ...]
    count: int = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    stacked: ClassVar[bool] = True  # every array has a leading layer axis

    def blocks(self, shared) -> tuple[Block, ...]:
        return self.unit

    def run(self, x, aux, *, key, pos: int, shared):
        keys = None
        if key is not None:  # block occurrence i gets fold_in(key, i), as unrolled
            n = self.count * len(self.unit)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(pos + jnp.arange(n))
            keys = keys.reshape(self.count, len(self.unit), *keys.shape[1:])
        params, static = eqx.partition(self.unit, eqx.is_array)

        def body(carry, inp):
            x, aux = carry
            p, ks = inp
            unit = eqx.combine(p, static)
            for j, blk in enumerate(unit):
                x, a = blk.forward(x, key=None if ks is None else ks[j])
                aux = aux + a
            return (x, aux), None

        body = _remat(body, self.remat)
        (x, aux), _ = jax.lax.scan(body, (x, aux), (params, keys))
        return x, aux

    def init_cache(self, batch, dtype, length, shared):
        # Layer by layer: a cache may start from learned parameters (a BRT's initial state),
        # so layer 0's cache broadcast to the others would be wrong.
        return tuple(eqx.filter_vmap(lambda b: b.init_cache(batch, dtype, length))(b) for b in self.unit)

    def step(self, cache, x, t, shared):
        params, static = eqx.partition(self.unit, eqx.is_array)

        def body(x, pc):
            p, c = pc
            unit = eqx.combine(p, static)
            out = []
            for blk, bc in zip(unit, c):
                bc, x = blk.step(bc, x, t)
                out.append(bc)
            return x, tuple(out)

        x, cache = jax.lax.scan(body, x, (params, cache))
        return cache, x


class _OneBlock(eqx.Module):
    """A stage of one block occurrence: its own (Single) or a share group's (SharedRef)."""

    stacked: ClassVar[bool] = False

    def block_of(self, shared) -> Block:
        raise NotImplementedError

    def blocks(self, shared) -> tuple[Block, ...]:
        return (self.block_of(shared),)

    def run(self, x, aux, *, key, pos: int, shared):
        k = None if key is None else jax.random.fold_in(key, pos)
        block = self.block_of(shared)
        # a shared block has no remat policy of its own (as before: it is never rematerialised)
        x, a = _remat(lambda x, k: block.forward(x, key=k), getattr(self, "remat", "none"))(x, k)
        return x, aux + a

    def init_cache(self, batch, dtype, length, shared):
        return self.block_of(shared).init_cache(batch, dtype, length)

    def step(self, cache, x, t, shared):
        return self.block_of(shared).step(cache, x, t)


class SharedRef(_OneBlock):
    group: str = eqx.field(static=True)

    def block_of(self, shared) -> Block:
        return shared[self.group]


class Single(_OneBlock):
    block: Block
    remat: str = eqx.field(static=True)

    def block_of(self, shared) -> Block:
        return self.block


def _remat(f, policy: str):
    if policy == "none":
        return f
    if policy == "full":
        return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "dots":
        return jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat policy {policy!r}; choose from {', '.join(REMAT_POLICIES)}")


class LoweredModel(eqx.Module):
    """tokens (B, L) int32 → logits (B, L, vocab) float32."""

    embed: eqx.Module
    stages: tuple
    shared: dict
    final_norm: eqx.Module | None
    head: eqx.Module
    dtype: str = eqx.field(static=True)
    positions: tuple = eqx.field(static=True)  # first instance index of each stage (for dropout keys)
    name: str = eqx.field(static=True)
    final_norm_kind: str | None = eqx.field(static=True, default=None)
    vocab: int = eqx.field(static=True, default=0)
    block_len: int = eqx.field(static=True, default=1)  # lengths are padded to a multiple of this

    def __call__(self, tokens: Int[Array, "B L"], *, key=None) -> Float[Array, "B L V"]:
        """Any length L ≥ 1: the sequence is padded to the next multiple of the block length
        and the logits sliced back. Every layer is causal, so the padding cannot change them."""
        return self.with_aux(tokens, key=key)[0]

    def with_aux(self, tokens: Int[Array, "B L"], *, key=None) -> tuple[Float[Array, "B L V"], Array]:
        """(logits, auxiliary loss): the sum of the ops' auxiliary losses (a router's load
        balance, already weighted), a float32 scalar; 0 for a model without such ops. The
        training loss adds it (bstc.runtime.trainer)."""
        tokens = check_tokens(tokens, self.vocab)
        length = tokens.shape[1]
        pad = -length % self.block_len
        if pad:
            tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
        logits, aux = self._forward(tokens, key=key)
        return logits[:, :length], aux

    def _forward(self, tokens, *, key=None):
        dt = _DTYPES[self.dtype]
        m = cast_floating(self, dt)
        x = constrain(m.embed(tokens).astype(dt), ACTIVATION)
        aux = jnp.zeros((), jnp.float32)
        for stage, pos in zip(m.stages, m.positions):
            x, aux = stage.run(x, aux, key=key, pos=pos, shared=m.shared)
        if m.final_norm is not None:
            x = m.final_norm(x)
        logits = m.head(x, embedding=m.embed)
        return logits.astype(jnp.float32), aux

    def blocks(self):
        """Every distinct block module (a scanned unit's blocks hold stacked weights)."""
        for stage in self.stages:
            if not isinstance(stage, SharedRef):
                yield from stage.blocks(self.shared)
        yield from self.shared.values()

    @property
    def has_aux(self) -> bool:
        return any(getattr(sub.op, "returns_aux", False) for blk in self.blocks() for sub in blk.subs)


def check_tokens(tokens, vocab: int):
    """Shape and dtype are checked at once (also while tracing); the range of the ids with
    `eqx.error_if`, which raises in an eager call and makes a jitted call raise when it runs
    (an XlaRuntimeError carrying the same message), so an id outside the vocabulary can never
    give silent garbage (NaN logits for ids ≥ vocab, a wrapped row for negative ones)."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"tokens must be an integer array of shape (batch, length), got {type(tokens).__name__}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {dtype}")
    if len(shape) != 2:
        raise ValueError(f"tokens must have shape (batch, length), got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"tokens must have batch ≥ 1 and length ≥ 1, got shape {tuple(shape)}")
    if vocab:
        tokens = eqx.error_if(tokens, (tokens < 0) | (tokens >= vocab),
                              f"token ids must be in [0, {vocab}) (the model's vocab)")
    return tokens


def cast_floating(tree, dtype):
    return jax.tree.map(lambda p: p.astype(dtype) if eqx.is_inexact_array(p) and p.dtype != dtype else p, tree)


# ---- building --------------------------------------------------------------------------------
def _build_block(inst: ir.BlockInstance, dims, key) -> Block:
    consumed = {e.source for s in inst.sublayers for e in s.edges}
    keys = jax.random.split(key, 2 * len(inst.sublayers))
    subs = []
    for i, s in enumerate(inst.sublayers):
        op = REGISTRY[s.kind]
        ctx = s.context_spec
        sources = tuple(e.source for e in s.edges)
        module = op.build(s.kwargs, dims, ctx, key=keys[2 * i])
        nk = norm_kind(s.norm)
        norm = REGISTRY[nk].build(op_args(nk), dims, None, key=keys[2 * i + 1]) if nk else None
        subs.append(Sub(norm, module, s.name, s.placement, s.residual,
                        sources[0] if len(sources) == 1 else sources or None, s.name in consumed, s.kind, nk,
                        block_end_window(inst, s, dims), args=s.args, context=ctx))
    return Block(tuple(subs))


def plan_stages(layers: tuple[ir.BlockInstance, ...], scan: bool = True) -> list[tuple[str, int, int, int]]:
    """Cover the stack with stages: ('scan', start, unit_len, count) | ('single', i, 1, 1) | ('shared', i, 1, 1).

    At each position take the repeating unit, repeated at least SCAN_MIN_COUNT times, that covers
    the most blocks (ties: the shortest unit); where there is none, a single block."""
    sigs = [inst.signature for inst in layers]
    n, i, out = len(layers), 0, []
    while i < n:
        if layers[i].share is not None:
            out.append(("shared", i, 1, 1))
            i += 1
            continue
        best = (1, 1)
        if scan:
            for p in range(1, (n - i) // 2 + 1):
                unit = sigs[i:i + p]
                if any(layers[j].share is not None for j in range(i, i + p)):
                    break
                c = 1
                while i + (c + 1) * p <= n and sigs[i + c * p:i + (c + 1) * p] == unit:
                    c += 1
                if c >= SCAN_MIN_COUNT and p * c > best[0] * best[1]:
                    best = (p, c)
        p, c = best
        if c >= SCAN_MIN_COUNT:
            out.append(("scan", i, p, c))
            i += p * c
        else:
            out.append(("single", i, 1, 1))
            i += 1
    return out


def memory_budget() -> int:
    """Bytes the parameters may take: the local accelerators' memory, or the host's RAM on CPU."""
    import os

    limits = [(dev.memory_stats() or {}).get("bytes_limit", 0) if dev.platform != "cpu" else 0
              for dev in jax.local_devices()]
    if all(limits):
        return int(sum(limits))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def check_buildable(m: ir.Model) -> None:
    """Refuse, before any array is allocated, a model whose parameters cannot fit in memory."""
    from bstc.errors import BstcError, Diagnostic
    from bstc.passes.report import build_report, bytes_h

    rep = build_report(m, batch=1)
    budget = memory_budget()
    if rep.param_bytes > budget:
        raise BstcError([Diagnostic(
            None, f"model {m.name} is too large to build: {rep.params:.3g} params, "
                  f"{rep.param_bytes:.3g} bytes, more than the {bytes_h(budget)} of memory here",
            "check the sizes with `bstc explain`")])


def lower(m: ir.Model, *, key, scan: bool = True, remat: str = "none") -> LoweredModel:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {', '.join(REMAT_POLICIES)}")
    check_buildable(m)
    d = m.dims
    k_embed, k_head, k_norm, k_layers = jax.random.split(key, 4)
    # Every block occurrence gets the key fold_in(k_layers, position), scanned or not, so the
    # scanned and unrolled lowerings of one model file have identical weights.
    layer_key = lambda i: jax.random.fold_in(k_layers, i)  # noqa: E731
    embed = REGISTRY["embedding"].build(op_args("embedding"), d, None, key=k_embed)
    head = REGISTRY["head"].build(op_args("head", {"tied": m.head_tied}), d, None, key=k_head)
    nk = norm_kind(m.final_norm) if m.final_norm else None
    final_norm = REGISTRY[nk].build(op_args(nk), d, None, key=k_norm) if nk else None

    stages, positions, shared = [], [], {}
    for kind, start, p, c in plan_stages(m.layers, scan):
        positions.append(start)
        if kind == "scan":
            unit_insts = m.layers[start:start + p]
            keys = jnp.stack([jnp.stack([layer_key(start + u * p + j) for j in range(p)]) for u in range(c)])

            def build_unit(ks, unit_insts=unit_insts):
                return tuple(_build_block(inst, d, ks[j]) for j, inst in enumerate(unit_insts))

            unit = eqx.filter_vmap(build_unit)(keys)
            stages.append(Scanned(unit, c, remat))
        elif kind == "shared":
            inst = m.layers[start]
            if inst.share not in shared:
                shared[inst.share] = _build_block(inst, d, layer_key(start))
            stages.append(SharedRef(inst.share))
        else:
            stages.append(Single(_build_block(m.layers[start], d, layer_key(start)), remat))
    model = LoweredModel(embed, tuple(stages), shared, final_norm, head, d.dtype, tuple(positions), m.name, nk,
                         d.vocab, d.window)
    pdt = _DTYPES[d.param_dtype]
    return cast_floating(model, pdt)


def load(source, *, key, overrides=None, scan: bool = True, remat: str = "none") -> LoweredModel:
    from bstc.frontend import parse

    return lower(parse(source, overrides=overrides), key=key, scan=scan, remat=remat)


def count_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(module, eqx.is_inexact_array)))
