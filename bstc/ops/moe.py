"""`moe`: a mixture-of-experts feed-forward sublayer (token-choice top-k routing, no dropping).

Each token's router picks its `top_k` experts (softmax over `experts` logits, the chosen
probabilities renormalised, as in Mixtral); the token goes through those experts' MLPs and
their outputs are mixed by the renormalised probabilities. Every token is processed (no
capacity, no dropped tokens), so the layer is position-wise: causal, independent of the other
sequences in the batch, and decoding one token is the layer applied to it.

The experts run as one grouped matrix product (`jax.lax.ragged_dot`) over the token copies
sorted by expert: on GPUs and TPUs that costs the chosen experts only; XLA's CPU backend
computes it densely (every expert for every copy), so there a MoE layer runs at the cost of
`experts / top_k` dense MLPs of its width.

Auxiliary loss (the op contract's `returns_aux`): the Switch-Transformer load-balancing loss
aux_weight · E · Σ_e f_e · P_e, with f_e the fraction of token copies routed to expert e and
P_e the mean router probability of e over the batch; it is 1·aux_weight for perfectly balanced
routing. The layer returns `(y, aux)`; blocks and stages sum it and the trainer adds it to the
loss (`LoweredModel.with_aux`).
"""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from bstc.ops.base import Op, Param, Problem, register
from bstc.ops.mlp import ACT_FLOPS

_ACTS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}


class MoELayer(eqx.Module):
    router: Float[Array, "D E"]
    w_in: Float[Array, "E D M"]
    w_gate: Float[Array, "E D M"] | None
    w_out: Float[Array, "E M D"]
    top_k: int = eqx.field(static=True)
    act: str = eqx.field(static=True)
    aux_weight: float = eqx.field(static=True)
    returns_aux: ClassVar[bool] = True

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key=None):
        B, L, D = x.shape
        E, k = self.router.shape[1], self.top_k
        dt = x.dtype
        xt = x.reshape(B * L, D)
        # Routing in float32: a top-k over bf16 logits ties and flips too easily.
        probs = jax.nn.softmax(xt.astype(jnp.float32) @ self.router.astype(jnp.float32), axis=-1)  # (T, E)
        gates, experts = jax.lax.top_k(probs, k)                                      # (T, k)
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        # Token copies sorted by expert, so each expert's rows are contiguous for ragged_dot.
        flat = experts.reshape(-1)                                                    # (T·k,)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        xs = xt[token]                                                                # (T·k, D)
        h = jax.lax.ragged_dot(xs, self.w_in.astype(dt), sizes)
        if self.act == "swiglu":
            h = jax.nn.silu(jax.lax.ragged_dot(xs, self.w_gate.astype(dt), sizes)) * h
        else:
            h = _ACTS[self.act](h)
        ys = jax.lax.ragged_dot(h, self.w_out.astype(dt), sizes)                      # (T·k, D)
        w = gates.reshape(-1)[order].astype(dt)
        y = jnp.zeros_like(xt).at[token].add(ys * w[:, None])
        frac = sizes.astype(jnp.float32) / flat.shape[0]
        aux = self.aux_weight * E * jnp.sum(frac * jnp.mean(probs, axis=0))
        return y.reshape(B, L, D), aux

    # Position-wise: decoding a token is the layer applied to it (bstc/decode.py's protocol).
    def init_cache(self, batch: int, dtype, length: int | None = None):
        return None

    def decode(self, cache, x_t: Float[Array, "B D"], t, *, context=None):
        return cache, self(x_t[:, None])[0][:, 0]


@register
class MoE(Op):
    kind = "moe"
    role = "mlp"
    axes = {"router": ("embed", None), "w_in": ("experts", "embed", "mlp"), "w_gate": ("experts", "embed", "mlp"),
            "w_out": ("experts", "mlp", "embed")}
    optim = {"router": "weight", "w_in": "weight", "w_gate": "weight", "w_out": "weight"}
    doc = "mixture-of-experts MLP: top-k token-choice routing, every token kept, load-balancing aux loss"
    params = (
        Param("hidden", int, min=1, doc="each expert's hidden width"),
        Param("experts", int, 8, min=1, doc="E: number of experts"),
        Param("top_k", int, 2, min=1, doc="experts per token"),
        Param("act", str, "swiglu", choices=("gelu", "swiglu", "relu")),
        Param("aux_weight", float, 0.01, min=0.0, doc="weight of the load-balancing loss (0: off)"),
    )

    def check(self, args, dims, context):
        if args["top_k"] > args["experts"]:
            return [Problem(f"top_k ({args['top_k']}) is more than experts ({args['experts']})", "top_k",
                            f"use top_k ≤ {args['experts']}")]
        return []

    def _mats(self, args) -> int:
        return 3 if args["act"] == "swiglu" else 2

    def param_count(self, args, dims, context):
        D, M, E = dims.d_model, args["hidden"], args["experts"]
        return D * E + self._mats(args) * E * D * M

    def flops_per_token(self, args, dims, context):
        """Router, softmax and top-k, then `top_k` experts' MLPs and the weighted sum: the work
        of the algorithm (what a grouped GEMM on an accelerator does; see the module doc)."""
        D, M, E, k = dims.d_model, args["hidden"], args["experts"], args["top_k"]
        router = 2 * D * E + 3 * E
        experts = k * (self._mats(args) * 2 * D * M + ACT_FLOPS[args["act"]] * M)
        return router + experts + 2 * k * D

    def activation_bytes_per_token(self, args, dims, context):
        itemsize = 2 if dims.dtype == "bfloat16" else 4
        return (dims.d_model * (1 + 2 * args["top_k"]) + 2 * args["top_k"] * args["hidden"]) * itemsize

    def build(self, args, dims, context, *, key):
        D, M, E = dims.d_model, args["hidden"], args["experts"]
        kr, k1, k2, k3 = jax.random.split(key, 4)
        return MoELayer(
            router=jax.random.normal(kr, (D, E)) / jnp.sqrt(D) * 0.1,
            w_in=jax.random.normal(k1, (E, D, M)) / jnp.sqrt(D),
            w_gate=jax.random.normal(k3, (E, D, M)) / jnp.sqrt(D) if args["act"] == "swiglu" else None,
            w_out=jax.random.normal(k2, (E, M, D)) / jnp.sqrt(M) / jnp.sqrt(2.0),
            top_k=int(args["top_k"]), act=args["act"], aux_weight=float(args["aux_weight"]))
