"""The contract every layer kind fulfils.

A layer kind is one module in bstc/ops/ that defines a subclass of `Op` and registers a
singleton with `@register`. The op holds, in one place:

* its parameter schema (`params`): the checker validates a layer's arguments against it;
* its shape rule (`out_shape`) and any extra semantic checks (`check`);
* its cost rules (`param_count`, `flops_per_token`), used by `bstc explain`;
* the logical axes of its parameters (`axes`), which `bstc.shard_plan` maps onto a device mesh;
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

    An op fed by several edges (`context: [ssm -> mf, conv -> sh]`) receives a tuple of them,
    in the order written, wherever one ContextSpec is passed otherwise.

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
    """A semantic error found by an op's `check`; `arg` names the offending argument (for the caret).
    `edge`: for a layer with several context edges, the index of the edge the problem is about
    (the caret goes under that edge)."""

    message: str
    arg: str | None = None
    hint: str | None = None
    edge: int | None = None


class Op:
    kind: ClassVar[str]
    role: ClassVar[str] = "other"  # cost bucket: 'attn' | 'ssm' | 'mlp' | 'norm' | 'embed' | 'other'
    params: ClassVar[tuple[Param, ...]] = ()
    accepts_context: ClassVar[bool] = False  # may be the target of a context edge
    context_source: ClassVar[bool] = False  # may be the source of a context edge
    doc: ClassVar[str] = ""
    # Logical axis names of the built module's parameters, by field name: {"w_in": ("embed",
    # "mlp"), ...} (see `logical_axes`). Required, like `optim`: a parameter without axes
    # would silently be replicated on every device.
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

    # ---- context sources read only at block ends ------------------------------------
    def context_stride(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None) -> int:
        """For an op fed by a context edge: W if it reads the source's outputs only at positions
        W−1, 2W−1, … (the last position of each block), 1 if it reads every position."""
        return 1

    def block_ends_flops_per_token(self, args: Mapping[str, Any], dims: Dims, window: int) -> float | None:
        """For a context source: the forward FLOPs per token of computing only its outputs at
        positions W−1, 2W−1, … with its module's `block_ends(x, window, *, key=None)`, which the
        lowering calls when every reader has `context_stride` W. None (the default): the kind
        has no such method and computes every position."""
        return None

    # ---- sharding -------------------------------------------------------------------
    def logical_axes(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None, module):
        """Logical axis names of the built module's parameters, for `bstc.shard_plan` (through `bstc.params.param_axes`).

        Returns a pytree shaped like `module` whose array leaves are tuples with one entry per
        array dimension: a logical axis name (batch, seq, embed, mlp, heads, kv, ssm_state,
        vocab, filters, channels, layers) or None (never sharded). `module` may hold
        jax.ShapeDtypeStruct leaves. Default: the class's `axes` table by field name
        (`named_axes`), which must name every parameter."""
        return named_axes(module, self.axes, self.kind)

    # ---- lowering -------------------------------------------------------------------
    def build(self, args: Mapping[str, Any], dims: Dims, context: ContextSpec | None, *, key):
        """Return an eqx.Module: module(x, *, context=None, key=None) -> output of out_shape."""
        raise NotImplementedError


def _is_arraylike(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _field_name(path) -> str | None:
    import jax

    return next((k.name for k in reversed(path) if isinstance(k, jax.tree_util.GetAttrKey)), None)


def named_axes(module, table: Mapping[str, tuple], kind: str = "?"):
    """Logical axes by parameter name: `table[field]` for an array held in a field of that name
    (nested modules included). Names, not sizes: sizes collide too easily (S4D's filters and
    state modes, a BRT's 4·D fused projection and its 4·D MLP, 32 position buckets and d_model
    32) to tell the axes apart. A parameter whose field is missing, or whose entry has the
    wrong number of dimensions, is an error: it would otherwise be replicated unnoticed."""
    import jax

    def axes(path, a):
        if not _is_arraylike(a):
            return None
        name = _field_name(path)
        ax = table.get(name)
        if name not in table:
            raise TypeError(f"layer kind {kind!r}: parameter '{name}' has no logical axes; add it to the op's "
                            "`axes` table")
        if len(ax) != len(a.shape):
            raise TypeError(f"layer kind {kind!r}: parameter '{name}' has {len(a.shape)} dimensions but its "
                            f"logical axes {tuple(ax)} name {len(ax)}")
        return tuple(ax)

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
        name = _field_name(path)
        if name not in table:
            raise TypeError(f"layer kind {kind!r}: parameter '{name}' has no optimizer role; add it to the "
                            f"op's `optim` table (one of {', '.join(ROLES)})")
        return ROLES[table[name]]

    return jax.tree_util.tree_map_with_path(role, module)


REGISTRY: dict[str, Op] = {}


def register(cls):
    """Class decorator: register a singleton of an Op subclass under its `kind`."""
    if cls.kind in REGISTRY:
        raise ValueError(f"layer kind {cls.kind!r} registered twice")
    if cls.axes is None and cls.logical_axes is Op.logical_axes:
        raise TypeError(f"layer kind {cls.kind!r} declares no logical axes: give {cls.__name__} an `axes` "
                        "table (parameter field name -> one logical axis name or None per dimension)")
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
