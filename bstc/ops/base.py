"""The contract every layer kind fulfils.

A layer kind is one module in bstc/ops/ that defines a subclass of `Op` and registers a
singleton with `@register`. The op holds, in one place:

* its parameter schema (`params`): the checker validates a layer's arguments against it;
* its shape rule (`out_shape`) and any extra semantic checks (`check`);
* its cost rules (`param_count`, `flops_per_token`), used by `bstc explain`;
* the logical axes of its parameters (`axes`), which `bstc.shard` maps onto a device mesh;
* its lowering (`build`): an `eqx.Module` whose `__call__(x, *, context=None, key=None)` maps
  a batched activation `x: (B, L, D)` to the sublayer output.

Shapes are tuples whose first entry is the symbol "B" (batch); every other entry is an int.
SSM-like ops with `filters > 1` return `(B, L, F, D)`; everything else returns `(B, L, D)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One argument of a layer kind. `type` is int, float, bool or str (an enum symbol)."""

    name: str
    type: type
    default: Any = REQUIRED
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Dims:
    """Model-level sizes every op sees (the resolved top-level parameters)."""

    vocab: int
    d_model: int
    heads: int
    window: int
    seq_len: int
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ContextSpec:
    """What a context-injection edge delivers to the op that consumes it.

    variant: 'sh' | 'mh' | 'mf'
    filters: F, the number of filters (output sets) of the source SSM; the source's output is
             (B, L, D) when F == 1 and (B, L, F, D) otherwise.
    source_kind: the layer kind of the source (for messages).
    """

    variant: str
    filters: int
    source_kind: str = ""


@dataclass(frozen=True)
class OptimRole:
    """How the optimizer treats one kind of parameter (see `ROLES` and `Op.optim`).

    decay: AdamW/Adafactor weight decay applies to it.
    lr_scale: multiplier of the run's learning rate (and of its schedule).
    lr_cap: the learning rate never exceeds this: min(base, cap), as S4 trains A and dt.
    An enclosing module's `lr_multiplier` field (a long-convolution kernel's `lr_mult`
    argument) multiplies lr_scale further."""

    name: str
    decay: bool
    lr_scale: float = 1.0
    lr_cap: float | None = None
    doc: str = ""

    def lr_multiplier(self, base_lr: float) -> float:
        m = self.lr_scale
        if self.lr_cap is not None and base_lr > self.lr_cap:
            m *= self.lr_cap / base_lr
        return m


# The optimizer roles a parameter can have. Decay regularises maps whose scale is free (weight
# matrices); it is wrong for parameters whose scale *is* their meaning: gains, biases, learned
# vectors fed in as tokens, and an SSM's dynamics, where decay pulls log-rates and steps
# towards 0 and so changes the memory length (the S4/S4D reference keeps A and dt out of weight
# decay and trains them with lr min(base, 1e-3)). Long-convolution kernels follow their
# reference (Fu et al. 2023): no decay, their own learning rate.
ROLES: dict[str, OptimRole] = {r.name: r for r in (
    OptimRole("weight", True, doc="projection matrices (attention, MLP, SSM input/output maps and C)"),
    OptimRole("embedding", False, doc="lookup tables and learned vectors used as inputs: token embedding "
                                      "(and so a tied head), learned states, context IDs, first contexts"),
    OptimRole("norm", False, doc="normalisation gains and biases"),
    OptimRole("bias", False, doc="additive biases (projections, gates, relative-position biases)"),
    OptimRole("gain", False, doc="per-channel scales such as an SSM's skip term D"),
    OptimRole("ssm_dynamics", False, lr_cap=1e-3, doc="an SSM's A and step dt (log-parametrised)"),
    OptimRole("conv_kernel", False, doc="explicit long-convolution kernels (lr scaled by the op's lr_mult)"),
)}


@dataclass(frozen=True)
class Problem:
    """A semantic error found by an op's `check`; `arg` names the offending argument (for the caret)."""

    message: str
    arg: str | None = None
    hint: str | None = None


class Op:
    kind: ClassVar[str]
    role: ClassVar[str] = "other"  # cost bucket: 'attn' | 'ssm' | 'mlp' | 'norm' | 'embed' | 'other'
    params: ClassVar[tuple[Param, ...]] = ()
    accepts_context: ClassVar[bool] = False  # may be the target of a context edge
    context_source: ClassVar[bool] = False  # may be the source of a context edge
    doc: ClassVar[str] = ""
    # Logical axis names of the built module's parameters, by field name: {"w_in": ("embed",
    # "mlp"), ...} (see `logical_axes`). Every shipped op declares them; None falls back to
    # guessing from the sizes, which is what a quickly written new op gets.
    axes: ClassVar[Mapping[str, tuple] | None] = None
    # Optimizer role of the built module's parameters, by field name: {"w_in": "weight",
    # "b_in": "bias", ...}, names from `ROLES`. Required: `register` refuses an op without it,
    # and `param_roles` refuses a parameter whose field is missing, so no parameter is decayed
    # or left undecayed by accident (a leaf's shape says nothing about its role, and stacking
    # for lax.scan changes every shape).
    optim: ClassVar[Mapping[str, str] | None] = None

    # ---- checking -------------------------------------------------------------------
    def check(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None) -> list[Problem]:
        """Rules beyond the schema (divisibility, variant/shape fit). Default: none."""
        return []

    def filters(self, args: Mapping[str, Any], dims: Dims) -> int:
        """Number of output filters (1 for everything but multi-filter SSMs)."""
        return int(args.get("filters", 1))

    def out_shape(self, args: Mapping[str, Any], dims: Dims) -> tuple:
        f = self.filters(args, dims)
        if f > 1:
            return ("B", dims.seq_len, f, dims.d_model)
        return ("B", dims.seq_len, dims.d_model)

    # ---- costs ----------------------------------------------------------------------
    def param_count(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None) -> int:
        raise NotImplementedError

    def flops_per_token(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None) -> float:
        """Forward FLOPs per token (a multiply-add counts 2), averaged over a seq_len sequence."""
        raise NotImplementedError

    def activation_bytes_per_token(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None) -> float:
        """Activation memory kept for the backward pass, per token (rough, for explain)."""
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        return 4 * dims.d_model * itemsize

    # ---- sharding -------------------------------------------------------------------
    def logical_axes(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None, module):
        """Logical axis names of the built module's parameters, for `bstc.shard`.

        Returns a pytree shaped like `module` whose array leaves are tuples with one entry per
        array dimension: a logical axis name (batch, seq, embed, mlp, heads, kv, ssm_state,
        vocab, filters) or None (never sharded). `module` may hold jax.ShapeDtypeStruct leaves.
        Default: the class's `axes` table by field name (`named_axes`); without one, inferred
        from the sizes (d_model → embed, vocab → vocab, `hidden` → mlp, heads → heads,
        d_model/heads → kv, `state` or state/2 → ssm_state, `filters` → filters), which cannot
        tell apart two axes of equal size: declare `axes` instead."""
        import jax

        if self.axes is not None:
            return named_axes(module, self.axes)
        return jax.tree.map(lambda a: infer_logical_axes(getattr(a, "shape", None), args, dims)
                            if _is_arraylike(a) else None, module)

    # ---- lowering -------------------------------------------------------------------
    def build(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None, *, key):
        """Return an eqx.Module: module(x, *, context=None, key=None) -> output of out_shape."""
        raise NotImplementedError


def _is_arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def named_axes(module, table: Mapping[str, tuple]):
    """Logical axes by parameter name: `table[field]` for an array held in a field of that name
    (nested modules included), unsharded (all None) otherwise. Names, not sizes: sizes collide
    too easily (S4D's filters and state modes, a BRT's 4·D fused projection and its 4·D MLP,
    32 position buckets and d_model 32) to tell the axes apart."""
    import jax

    def axes(path, a):
        if not _is_arraylike(a):
            return None
        name = next((k.name for k in reversed(path) if isinstance(k, jax.tree_util.GetAttrKey)), None)
        ax = table.get(name)
        return tuple(ax) if ax is not None and len(ax) == len(a.shape) else (None,) * len(a.shape)

    return jax.tree_util.tree_map_with_path(axes, module)


def named_roles(module, table: Mapping[str, str], kind: str = "?"):
    """The `OptimRole` of every array leaf of `module` by the name of the field holding it
    (nested modules included; stacked leaves keep their names, so scanning changes nothing).
    A leaf whose field is not in `table` is an error: roles are never guessed."""
    import jax
    import jax.numpy as jnp

    def role(path, a):
        if not _is_arraylike(a) or not jnp.issubdtype(a.dtype, jnp.inexact):
            return None  # not trained (the optimizer sees inexact arrays only)
        name = next((k.name for k in reversed(path) if isinstance(k, jax.tree_util.GetAttrKey)), None)
        if name not in table:
            raise TypeError(f"layer kind {kind!r}: parameter '{name}' has no optimizer role; add it to the "
                            f"op's `optim` table (one of {', '.join(ROLES)})")
        return ROLES[table[name]]

    return jax.tree_util.tree_map_with_path(role, module)


def infer_logical_axes(shape, args: Mapping[str, Any], dims: Dims) -> tuple:
    """One logical name (or None) per dimension, by matching sizes; a name is used once per array."""
    def arg(name):
        v = args.get(name) if hasattr(args, "get") else None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    # The op's own sizes first (an MLP's hidden width may equal the vocabulary), then the model's.
    table: list[tuple[int, str]] = []
    if arg("hidden"):
        table.append((arg("hidden"), "mlp"))
    if arg("state"):
        table += [(arg("state"), "ssm_state"), (arg("state") // 2, "ssm_state")]
    if arg("filters") and arg("filters") > 1:
        table.append((arg("filters"), "filters"))
    table += [(dims.d_model, "embed"), (dims.heads, "heads"), (dims.d_model // max(dims.heads, 1), "kv"),
              (dims.vocab, "vocab")]
    out: list = []
    for n in tuple(shape or ()):
        name = next((nm for size, nm in table if size == n and size > 1 and nm not in out), None)
        out.append(name)
    return tuple(out)


REGISTRY: dict[str, Op] = {}


def register(cls):
    """Class decorator: register a singleton of an Op subclass under its `kind`."""
    if cls.kind in REGISTRY:
        raise ValueError(f"layer kind {cls.kind!r} registered twice")
    if cls.optim is None:
        raise TypeError(f"layer kind {cls.kind!r} declares no optimizer roles: give {cls.__name__} an "
                        f"`optim` table (parameter field name -> one of {', '.join(ROLES)})")
    unknown = sorted({r for r in cls.optim.values() if r not in ROLES})
    if unknown:
        raise TypeError(f"layer kind {cls.kind!r}: unknown optimizer role(s) {', '.join(unknown)} "
                        f"(choose from {', '.join(ROLES)})")
    REGISTRY[cls.kind] = cls()
    return cls


def fft_len(n: int) -> int:
    """Smallest power of two >= n (FFT convolution length for a causal conv of length n is fft_len(2n))."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
