"""`block_attention`: the Block Transformer sublayer of the Block-State Transformer.

The sequence is split into L/W blocks of `window` tokens. Each block's queries attend causally
within the block and fully to a set of S context vectors; with no context edge it is plain
block-local attention. Keys and values of the context come from the same K/V projections as
the tokens'. Context variants (Pal et al. 2023, §3), given by the edge `context: ssm -> V`:

* `sh` — single head: the context of block k is the SSM output Y (B, L, D) over block k−1
  (S = W vectors), shared by all heads; block 0 gets a learned (W, D) context (or zeros).
* `mh` — multi head: the SSM has F = H filters, Y (B, L, H, D); head h of block k attends to
  filter h's outputs over block k−1, projected by K/V and sliced to head h (S = W per head).
* `mf` — multi filter: the SSM has F = S filters, Y (B, L, S, D); the context of block k is the
  last SSM output before the block (position k·W − 1) of each filter, plus learned context IDs
  (S, D); block 0 gets a learned (S, D) context.

`context_block: own` (sh, mh) takes the context of block k from the block's own window instead,
as the BST paper's appendix writes it: the source's outputs at positions kW … kW+W−1, slot i
from position kW + i, and query i of the block sees context slots 0..i only (a causal cross
mask). The source is causal, so the layer stays causal, and no block needs a learned context.

Several edges (`context: [ssm -> mf, conv -> sh]`): each gives a `ContextSet` built by its own
variant's rule, with its own learned first context and IDs; the sets are concatenated along the
slot axis (S = S_1 + S_2 + …) before the block's tokens, and an own-window set's causal mask
covers its own slots only. The layer is then called with one source output per edge, in order.

Positions (`rope: true`): rotary embedding on queries and block keys with the position *within
the block* (t mod W). Inside a block RoPE is relative, so this equals absolute positions there;
what it fixes is the context: context keys carry no rotation (they summarise the past as a set),
so a query–context score depends only on the query's offset in its block, the same in every
block and at every sequence length (length generalisation, exact block-by-block decoding).

One file (about 430 lines), as for every layer kind: the forward pass, the decoding step and
the cost rule of the three context variants must agree set by set, and keeping them side by
side is what lets a reader check that they do.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops._attention import apply_rope, attend, blockwise_attention
from bstc.ops._common import KV_HEADS_PARAM_DOC, SOFTMAX_FLOPS, check_kv_heads, dropout, grouped_axes, named_axes
from bstc.ops.base import ContextSpec, Op, Param, Problem, register


class ContextSet(eqx.Module):
    """One context edge's set of slots: its variant, which block's source outputs fill it
    (`context_block`) and its learned vectors. A layer with several edges attends to their sets
    side by side; each keeps its own rules."""

    ctx_first: Float[Array, "S D"] | None  # block 0's learned context
    ctx_ids: Float[Array, "S D"] | None  # MF: learned context IDs
    variant: str = eqx.field(static=True)
    n_context: int = eqx.field(static=True)
    context_block: str = eqx.field(static=True, default="previous")

    @property
    def own(self) -> bool:
        return self.context_block == "own"

    def first(self, window: int, heads: int, d: int, dtype):
        """Block 0's context (learned, or zeros): (S, D), or for mh (W, H, D), each head its copy."""
        first = self.ctx_first if self.ctx_first is not None else jnp.zeros((self.n_context, d), dtype)
        first = first.astype(dtype)
        if self.variant == "mh":
            return jnp.broadcast_to(first[:, None, :], (window, heads, first.shape[-1]))
        return first

    def vectors(self, y, B: int, nb: int, window: int, heads: int, dtype):
        """The set of every block, before projection: (B, nb, S, D) or, for mh, (B, nb, W, H, D)."""
        W = window
        if self.own:  # block k's own window; the mask keeps it causal
            per_head = (heads,) if self.variant == "mh" else ()
            return y.reshape(B, nb, W, *per_head, -1).astype(dtype)
        first = self.first(W, heads, y.shape[-1], dtype)
        if self.variant in ("sh", "mh"):
            per_head = (heads,) if self.variant == "mh" else ()
            prev = y.reshape(B, nb, W, *per_head, -1)[:, :-1]  # block k−1 for k ≥ 1
            return jnp.concatenate([jnp.broadcast_to(first, (B, 1) + first.shape), prev.astype(dtype)], axis=1)
        if self.variant == "mf":
            # The source's outputs at every position, or (when the lowering had it compute only
            # those, `Sub.block_ends`) at the block ends alone: (B, nb, S, D) either way here.
            ends = y if y.shape[1] == nb else y[:, W - 1::W]
            last = ends[:, :-1]  # (B, nb−1, S, D): last output before blocks 1..nb−1
            ctx = jnp.concatenate([jnp.broadcast_to(first, (B, 1) + first.shape), last.astype(dtype)], axis=1)
            return ctx + self.ctx_ids.astype(dtype)[None, None]
        raise ValueError(self.variant)


class BlockAttentionLayer(eqx.Module):
    wq: Float[Array, "D D"]
    wk: Float[Array, "D GK"]  # GK = kv_heads·dh (= D unless grouped-query attention)
    wv: Float[Array, "D GK"]
    wo: Float[Array, "D D"]
    # The first (or only) context edge's set is held in the layer's own fields, so a layer with
    # one edge keeps the layout (and checkpoints) it had before several edges were possible;
    # the sets of further edges, in the order written, are `more_context`.
    ctx_first: Float[Array, "S D"] | None  # block 0's learned context
    ctx_ids: Float[Array, "S D"] | None  # MF: learned context IDs
    window: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    rope: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    variant: str | None = eqx.field(static=True)
    n_context: int = eqx.field(static=True)
    # "previous": block k's context is the source over block k−1; "own": over block k itself,
    # seen causally (sh, mh only).
    context_block: str = eqx.field(static=True, default="previous")
    # None, not (), with fewer than two edges: an empty tuple would read as a leaf of logical
    # axis names (a tuple of names) in the trees of `bstc.params`.
    more_context: tuple[ContextSet, ...] | None = None

    def _proj(self, x, w):
        """(B, L, heads, dh) for wq; (B, L, kv_heads, dh) for wk and wv."""
        B, L, D = x.shape
        return (x @ w.astype(x.dtype)).reshape(B, L, -1, D // self.heads)

    def _kv_heads(self) -> int:
        return self.wk.shape[1] // (self._d() // self.heads)

    def context_sets(self) -> tuple[ContextSet, ...]:
        """Every context edge's set, in the order the edges are written (none without an edge)."""
        if self.variant is None:
            return ()
        return (ContextSet(self.ctx_first, self.ctx_ids, self.variant, self.n_context, self.context_block),
                ) + tuple(self.more_context or ())

    def project_context(self, c, dtype, variant: str | None = None):
        """Context keys and values (..., S, H, dh) from context vectors (..., S, D) shared by the
        heads, or for mh (..., W, H, D), each head projecting its own filter's vectors."""
        D, H = self._d(), self.heads
        if (variant or self.variant) == "mh":
            wk, wv = (w.astype(dtype).reshape(D, H, D // H) for w in (self.wk, self.wv))
            return jnp.einsum("...whd,dhe->...whe", c, wk), jnp.einsum("...whd,dhe->...whe", c, wv)
        return tuple((c @ w.astype(dtype)).reshape(*c.shape[:-1], -1, D // H) for w in (self.wk, self.wv))

    def _d(self):
        return self.wq.shape[0]

    def _contexts(self, context, sets) -> tuple:
        """The edges' source outputs, one per set: a layer with one edge gets the array itself."""
        if context is None:
            raise ValueError("this block_attention expects a context (its edge's source output)")
        contexts = (context,) if len(sets) == 1 else tuple(context)
        if len(contexts) != len(sets):
            raise ValueError(f"this block_attention has {len(sets)} context edges but got {len(contexts)} contexts")
        return contexts

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None) -> Float[Array, "B L D"]:
        B, L, D = x.shape
        W, nb = self.window, L // self.window
        q, k, v = self._proj(x, self.wq), self._proj(x, self.wk), self._proj(x, self.wv)
        if self.rope:
            pos = jnp.arange(L) % W  # position within the block (see the module docstring)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        ck = cv = sizes = None
        sets = self.context_sets()
        if sets:
            proj = [self.project_context(cs.vectors(y, B, nb, W, self.heads, x.dtype), x.dtype, cs.variant)
                    for cs, y in zip(sets, self._contexts(context, sets))]
            sizes = tuple(pk.shape[2] for pk, _ in proj)
            # The sets side by side along the slot axis: (B, nb, S1 + S2 + …, G, dh).
            ck, cv = (jnp.concatenate([p[i] for p in proj], axis=2) if len(proj) > 1 else proj[0][i] for i in (0, 1))
        o = blockwise_attention(q, k, v, W, ck, cv, causal_context=tuple(cs.own for cs in sets) or False,
                                context_sizes=sizes)
        o = o.reshape(B, L, D) @ self.wo.astype(x.dtype)
        return dropout(o, self.dropout, key)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    # One token at a time: the keys/values of the current block so far (W slots, position t mod
    # W), and for every context set its projected context of the current block and its source's
    # outputs over the current block (they become the next block's context). O((S + W)·D + D²)
    # per token, and no limit on the length: positions are taken within the block. With
    # `context_block: own` the context of position t is the source's output at t: projected and
    # written to context slot t mod W as it arrives, so no source outputs are kept. One set's
    # cache entries sit beside "k" and "v"; with several edges "ctx" holds one dict per set.
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        W, H, D = self.window, self.heads, self._d()
        G = self._kv_heads()  # grouped-query attention caches G ≤ H key/value heads
        kv = jnp.zeros((batch, W, G, D // H), dtype)
        sets = []
        for cs in self.context_sets():
            S = W if cs.variant == "mh" else cs.n_context
            ckv = jnp.zeros((batch, S, G, D // H), dtype)
            if cs.own:
                sets.append({"ck": ckv, "cv": ckv})
                continue
            src = {"sh": (batch, W, D), "mh": (batch, W, H, D), "mf": (batch, S, D)}[cs.variant]
            sets.append({"ck": ckv, "cv": ckv, "src": jnp.zeros(src, dtype)})
        return self._with_sets({"k": kv, "v": kv}, sets)

    def _with_sets(self, cache: dict, sets) -> dict:
        if not self.more_context:
            return {**cache, **(sets[0] if sets else {})}
        return {**cache, "ctx": tuple(sets)}

    def _cached_sets(self, cache: dict) -> tuple:
        if not self.more_context:
            return ({k: cache[k] for k in ("ck", "cv", "src") if k in cache},)
        return cache["ctx"]

    def _block_context(self, cs: ContextSet, src, k_block, dtype):
        """Projected context keys/values of block k_block from the source's outputs over the
        block before it (`src`): the decoding twin of `ContextSet.vectors`."""
        first = cs.first(self.window, self.heads, self._d(), dtype)
        c = jnp.where(k_block == 0, jnp.broadcast_to(first, src.shape), src)
        if cs.variant == "mf":
            c = c + cs.ctx_ids.astype(dtype)[None]
        return self.project_context(c, dtype, cs.variant)

    def _decode_set(self, cs: ContextSet, c: dict, y_t, t, dtype):
        """One set's cache after the source's output y_t at position t, and which slots t sees."""
        W = self.window
        p = t % W
        if cs.own:
            # Slot p gets position t's context; slots after p still hold the last block's and
            # are masked like the block's keys.
            ck_t, cv_t = self.project_context(y_t.astype(dtype)[:, None], dtype, cs.variant)
            return {"ck": c["ck"].at[:, p].set(ck_t[:, 0]), "cv": c["cv"].at[:, p].set(cv_t[:, 0])}, jnp.arange(W) <= p
        # A new block starts: its context comes from the source's outputs over the last block.
        ck, cv = jax.lax.cond(p == 0, lambda c: self._block_context(cs, c["src"], t // W, dtype),
                              lambda c: (c["ck"], c["cv"]), c)
        src = y_t.astype(dtype)
        src = src if cs.variant == "mf" else c["src"].at[:, p].set(src)
        return {"ck": ck, "cv": cv, "src": src}, jnp.ones((ck.shape[1],), bool)

    def decode(self, cache: dict, x_t: Float[Array, "B D"], t, *, context=None):
        B, D = x_t.shape
        W = self.window
        p = t % W
        q, k, v = (self._proj(x_t[:, None], w)[:, 0] for w in (self.wq, self.wk, self.wv))  # (B, H|G, dh)
        if self.rope:
            q, k = (apply_rope(a[:, None], p[None])[:, 0] for a in (q, k))
        kv = {"k": cache["k"].at[:, p].set(k), "v": cache["v"].at[:, p].set(v)}
        keys, values, visible = [], [], []
        sets = self.context_sets()
        new_sets = []
        if sets:
            for cs, c, y_t in zip(sets, self._cached_sets(cache), self._contexts(context, sets)):
                c, vis = self._decode_set(cs, c, y_t, t, x_t.dtype)
                new_sets.append(c)
                keys.append(c["ck"])
                values.append(c["cv"])
                visible.append(vis)
        keys, values = jnp.concatenate(keys + [kv["k"]], 1), jnp.concatenate(values + [kv["v"]], 1)
        visible = jnp.concatenate(visible + [jnp.arange(W) <= p])
        o = attend(q[:, None], keys, values, visible[None]).reshape(B, D)
        return self._with_sets(kv, new_sets), o @ self.wo.astype(x_t.dtype)


def _heads(args, dims) -> int:
    return args["heads"] or dims.heads


def _kv_width(args, dims) -> int:
    """Width of the K (and V) projection: kv_heads·dh, D without grouped-query attention."""
    H = _heads(args, dims)
    return dims.d_model // H * (args.get("kv_heads", 0) or H)


def _specs(context) -> tuple[ContextSpec, ...]:
    """The context edges as a tuple: none, one (a ContextSpec) or several (a tuple of them)."""
    if context is None:
        return ()
    return (context,) if isinstance(context, ContextSpec) else tuple(context)


def _learned_first(args, spec) -> bool:
    """Whether block 0 gets learned context vectors: with an own-window context it has its own."""
    return spec is not None and args["first_context"] == "learned" and args["context_block"] == "previous"


def _n_context(args, dims, spec) -> int:
    """S of one edge's set: mf's filters, else one slot per position of a block."""
    if spec is None:
        return 0
    return spec.filters if spec.variant == "mf" else args["window"]


def _slots(args, dims, context) -> int:
    """Context slots of a block, every edge's set counted."""
    return sum(_n_context(args, dims, c) for c in _specs(context))


def _edge_problems(spec: ContextSpec, i: int, several: bool, H: int, grouped: bool, args) -> list[Problem]:
    """Problems of edge i (of several, or the only one) alone: its variant against its source's
    filters and the layer's arguments."""
    F, out = spec.filters, []
    if spec.variant == "sh" and F != 1:
        out.append(Problem(f"context variant 'sh' needs a source with 1 filter, but it has {F}", "context",
                           "use `-> mf` for several filters, or give the source `filters: 1`", edge=i))
    elif spec.variant == "mh" and grouped:
        # mh gives every head its own filter's keys and values; grouped K/V heads are shared by
        # heads/kv_heads query heads, so there is no per-head key to give.
        out.append(Problem(f"context variant 'mh' gives each head its own context keys and values, but "
                           f"kv_heads ({args['kv_heads']}) < heads ({H}) shares them between heads",
                           "kv_heads", "drop `kv_heads` (or set it to heads) with `-> mh`, or use the "
                           "`-> sh` or `-> mf` context", edge=i))
    elif spec.variant == "mh" and F != H:
        out.append(Problem(f"context variant 'mh' needs one source filter per head ({H}), but the source has {F}",
                           "context", f"give the source `filters: {H}` (= heads)", edge=i))
    elif spec.variant == "mf" and F < 2:
        out.append(Problem(f"context variant 'mf' needs a source with several filters, but it has {F}", "context",
                           "give the source e.g. `filters: 16` (S context vectors per block)", edge=i))
    if args["context_block"] == "own" and spec.variant == "mf":
        # mf's context is each filter's last output before the block: one position, so there is
        # no window of the block's own positions to attend to causally.
        hint = ("use `-> sh` or `-> mh` for an own-window context, or drop `context_block` (mf reads the "
                "state entering the block)")
        if several:
            out.append(Problem(f"`context_block: own` applies to every context edge of the layer, and edge {i + 1} "
                               "is 'mf' (own applies to the 'sh' and 'mh' variants only)", "context_block",
                               "feed the mf source to a block_attention of its own, use `-> sh` or `-> mh` for "
                               "an own-window context, or drop `context_block`",
                               edge=i))
        else:
            out.append(Problem("`context_block: own` applies to the 'sh' and 'mh' context variants, not 'mf'",
                               "context_block", hint, edge=i))
    return out


@register
class BlockAttention(Op):
    kind = "block_attention"
    role = "attn"
    # Projections stored (in, out), heads·dh on the `heads` side; the learned context vectors are
    # (slots, embed), in the layer or in one of its `more_context` sets alike.
    axes = {"wq": ("embed", "heads"), "wk": ("embed", "heads"), "wv": ("embed", "heads"), "wo": ("heads", "embed"),
            "ctx_first": (None, "embed"), "ctx_ids": (None, "embed")}
    optim = {"wq": "weight", "wk": "weight", "wv": "weight", "wo": "weight",
             "ctx_first": "embedding", "ctx_ids": "embedding"}  # learned context vectors are inputs

    def logical_axes(self, args, dims, context, module):
        # With kv_heads < heads the K/V projections are replicated over the tensor axis (see
        # _common.grouped_axes).
        return named_axes(module, grouped_axes(self.axes, args, dims, ("wk", "wv")))
    accepts_context = True
    doc = "causal attention within blocks of `window` tokens, plus full attention to a context set"
    params = (
        Param("window", int, doc="W: block length; must divide seq_len", min=1),
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("rope", bool, True, doc="rotary positions (within the block) on queries and block keys"),
        Param("dropout", float, 0.0, min=0.0, max=0.99),
        Param("first_context", str, "learned", choices=("learned", "zero"), doc="block 0's context"),
        Param("context_block", str, "previous", choices=("previous", "own"),
              doc="block k's context: the source over block k−1, or over block k itself seen causally (sh, mh); "
                  "with several context edges it applies to each"),
        Param("kv_heads", int, 0, min=0, doc=KV_HEADS_PARAM_DOC),
    )

    def check(self, args, dims, context):
        out = []
        H = _heads(args, dims)
        if dims.seq_len % args["window"]:
            out.append(Problem(f"seq_len ({dims.seq_len}) is not divisible by window ({args['window']})", "window",
                               "the sequence is split into blocks of `window` tokens"))
        if dims.d_model % H:
            out.append(Problem(f"d_model ({dims.d_model}) is not divisible by heads ({H})", "heads" if args["heads"] else None,
                               "choose heads that divide d_model"))
        elif args["rope"] and (dims.d_model // H) % 2:
            out.append(Problem(f"rope needs an even head width, got d_model/heads = {dims.d_model // H}", "rope",
                               "use `rope: false` or change heads"))
        grouped = False
        if not dims.d_model % H:
            kv = check_kv_heads(args, dims)
            out += kv
            grouped = not kv and (args.get("kv_heads", 0) or H) < H
        specs = _specs(context)
        for i, spec in enumerate(specs):
            out += _edge_problems(spec, i, len(specs) > 1, H, grouped, args)
        if args["context_block"] == "own" and not specs:
            out.append(Problem("`context_block: own` needs a context edge", "context_block",
                               "add `context: SOURCE -> sh` (or `-> mh`), or drop `context_block`"))
        return out

    def context_stride(self, args, dims, context):
        # Asked per edge: mf reads one output per block, the last before it; sh and mh read every
        # position.
        specs = _specs(context)
        return args["window"] if specs and all(c.variant == "mf" for c in specs) else 1

    def param_count(self, args, dims, context):
        D = dims.d_model
        n = 2 * D * D + 2 * D * _kv_width(args, dims)  # q, o; k, v
        for spec in _specs(context):  # each set's learned first context and mf IDs: S·D each
            S = _n_context(args, dims, spec)
            n += S * D * (_learned_first(args, spec) + (spec.variant == "mf"))
        return n

    def flops_per_token(self, args, dims, context):
        D, W, H = dims.d_model, args["window"], _heads(args, dims)
        DK = _kv_width(args, dims)
        S = _slots(args, dims, context)  # every edge's set
        proj = 2 * 2 * D * D + 2 * 2 * D * DK  # q, o; k, v
        proj += 2 * 2 * D * DK * S / W  # K/V of the context: S vectors per block of W tokens
        scores = 2 * 2 * D * (S + W)  # q·k and w·v over S + W keys, for every query head
        softmax = SOFTMAX_FLOPS * H * (S + W)
        rope = 3.0 * (D + DK) if args["rope"] else 0.0  # q and the block keys
        return proj + scores + softmax + rope

    def activation_bytes_per_token(self, args, dims, context):
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        S = _slots(args, dims, context)
        H = _heads(args, dims)
        return (3 * dims.d_model + 2 * _kv_width(args, dims)) * itemsize + H * (S + args["window"]) * 4

    def build(self, args, dims, context, *, key):
        D = dims.d_model
        H = _heads(args, dims)
        ks = jax.random.split(key, 6)
        init = lambda k, n=D: jax.random.normal(k, (D, n)) / jnp.sqrt(D)  # noqa: E731
        DK = _kv_width(args, dims)

        def context_set(spec, k_first, k_ids) -> ContextSet:
            S = _n_context(args, dims, spec)
            first = jax.random.normal(k_first, (S, D)) * 0.02 if _learned_first(args, spec) else None
            ids = jax.random.normal(k_ids, (S, D)) * 0.02 if spec.variant == "mf" else None
            return ContextSet(first, ids, spec.variant, S, str(args["context_block"]))

        specs = _specs(context)
        # Edge 0 draws from the keys a one-edge layer always used; edge i ≥ 1 from key folded with i.
        sets = [context_set(spec, *(ks[4:6] if i == 0 else jax.random.split(jax.random.fold_in(key, i))))
                for i, spec in enumerate(specs)]
        first = sets[0] if sets else ContextSet(None, None, None, 0)
        return BlockAttentionLayer(wq=init(ks[0]), wk=init(ks[1], DK), wv=init(ks[2], DK), wo=init(ks[3]) / jnp.sqrt(2.0),
                                   ctx_first=first.ctx_first, ctx_ids=first.ctx_ids, window=int(args["window"]), heads=H,
                                   rope=bool(args["rope"]), dropout=float(args["dropout"]), variant=first.variant,
                                   n_context=first.n_context, context_block=str(args["context_block"]),
                                   more_context=tuple(sets[1:]) or None)
