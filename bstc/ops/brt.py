"""`brt`: the recurrent layer of the Block-Recurrent Transformer (Hutchins et al. 2022).

The layer processes the sequence block by block (blocks of W tokens) while carrying a state of S
vectors of width D (S = W in the paper) from one block to the next:

* vertical (token) path — the tokens of block k do sliding-window self-attention over
  [block k−1; block k] (causal) and cross-attention to the state *entering* block k; the two
  attention outputs are concatenated and projected (2D → D), added to the residual, and
  followed by the token MLP (which this layer owns, as in the paper's recurrent layer);
* horizontal (state) path — the state (RMS-normed, plus learned per-state position embeddings,
  so each state vector can learn to ask different questions) does self-attention among the S
  states and cross-attention to block k's token keys/values; the projected result is gated
  into the state: `fixed` is meliad's "bias" gate `s·σ(b) + r·(1−σ(b))`, `lstm` has input and
  forget gates computed from the attention output, biased to remember
  (`s·σ(W_f h + b_f + 1) + r·σ(W_i h + b_i − 1)`). `skip: true` (the paper's best
  configuration) has no MLP on the state path; `skip: false` adds a gated MLP there too.

Only the state update is inherently sequential; it alone runs in `jax.lax.scan` over the blocks.
Everything that does not depend on the state (token projections, sliding self-attention,
the MLP) and the token→state cross-attention (which only needs each block's incoming state,
emitted by the scan) run for all blocks in parallel afterwards. This is the fastest honest
BRT layer — the sequential part is still L/W dependent steps of O(S²·D + S·W·D + S·D²) work.

The layer includes its own pre-norms and residual inside (x + attention, then the MLP), and
returns the *increment*, so use it with `norm: none` and the block's residual adds it back:
output = x + a + MLP(norm(x + a)).

Choices that differ from meliad: RMS norms (meliad: LayerNorm without mean), standard 1/√dh
scaled dot products (meliad normalises keys and queries with a learned scale), RoPE on the
token self-attention (meliad's default is Fourier/T5 relative positions), and the state
cross-attends to the current block only (meliad: to [previous; current]).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from bstc.ops.base import ContextSpec, Dims, Op, Param, Problem, register
from bstc.ops._common import (GELU_FLOPS, RMS_FLOPS, ROPE_FLOPS, SOFTMAX_FLOPS, check_heads, check_window,
                              dense_init, dropout, fused_heads, fused_init, heads_of, merge_heads, rms_norm)
from bstc.ops.sliding_attention import sliding_mask, with_previous_block

GATES = ("fixed", "lstm")
E, M = ("embed",), ("mlp",)
BRT_AXES = {"norm1": E, "norm2": E, "norm_s": E, "norm": E, "bias": E, "b_i": E, "b_f": E, "mlp_b2": E, "b2": E,
            "w_qkvq": ("embed", None, "heads"), "s_qkvq": ("embed", None, "heads"),
            "w_o": (None, "heads", "embed"), "s_o": (None, "heads", "embed"),
            "w_i": (None, "embed"), "w_f": (None, "embed"), "init_state": (None, "embed"),
            "state_pos": (None, "embed"), "mlp_w1": ("embed", "mlp"), "w1": ("embed", "mlp"), "mlp_b1": M, "b1": M,
            "mlp_w2": ("mlp", "embed"), "w2": ("mlp", "embed")}


def states_of(args, dims: Dims) -> int:
    s = int(args.get("state", 0) or 0)
    return s if s > 0 else int(args["window"])


def hidden_of(args, dims: Dims) -> int:
    h = int(args.get("hidden", 0) or 0)
    return h if h > 0 else 4 * dims.d_model


def project_parts(parts: list[Float[Array, "*b H dh"]], w: Float[Array, "P D E"], dtype) -> Float[Array, "*b E"]:
    """Σ_p merge_heads(parts[p]) @ w[p]: the projection of the concatenated attention outputs,
    with each part (and each part's heads) kept on its own axis so that it shards by heads."""
    h = jnp.stack([merge_heads(t) for t in parts], axis=-2).astype(dtype)  # (*b, P, D)
    return jnp.einsum("...pd,pde->...e", h, w.astype(dtype))


class Gate(eqx.Module):
    """Combine the old value s with the update r: fixed (learned bias) or LSTM-style."""

    bias: Float[Array, "D"] | None
    w_i: Float[Array, "E D"] | None
    b_i: Float[Array, "D"] | None
    w_f: Float[Array, "E D"] | None
    b_f: Float[Array, "D"] | None
    kind: str = eqx.field(static=True)

    @staticmethod
    def make(kind: str, fan_in: int, d: int, key: PRNGKeyArray) -> "Gate":
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # meliad: small but non-zero biases (so an adaptive optimiser scales them), and
        # gate kernels 0.1× the usual scale so the gates start near their biases.
        small = lambda k, n: 0.1 * jax.random.normal(k, (n,), jnp.float32)  # noqa: E731
        if kind == "fixed":
            return Gate(small(k1, d), None, None, None, None, kind)
        return Gate(None, 0.1 * dense_init(k1, fan_in, d), small(k2, d), 0.1 * dense_init(k3, fan_in, d),
                    small(k4, d), kind)

    def __call__(self, s: Array, r: Array, h: Array) -> Array:
        if self.kind == "fixed":
            g = jax.nn.sigmoid(self.bias.astype(s.dtype))
            return s * g + r * (1 - g)
        f = jax.nn.sigmoid(h @ self.w_f.astype(h.dtype) + self.b_f.astype(h.dtype) + 1)  # biased to remember
        i = jax.nn.sigmoid(h @ self.w_i.astype(h.dtype) + self.b_i.astype(h.dtype) - 1)
        return s * f + r * i


class StateMLP(eqx.Module):
    """The optional (skip: false) MLP on the state path, gated into the state."""

    norm: Float[Array, "D"]
    w1: Float[Array, "D F"]
    b1: Float[Array, "F"]
    w2: Float[Array, "F D"]
    b2: Float[Array, "D"]
    gate: Gate

    def __call__(self, s: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
        h = jax.nn.gelu(rms_norm(s, self.norm) @ self.w1.astype(s.dtype) + self.b1.astype(s.dtype))
        r = h @ self.w2.astype(s.dtype) + self.b2.astype(s.dtype)
        return self.gate(s, r, h)


class BlockRecurrent(eqx.Module):
    """x (B, L, D) -> the layer's increment (B, L, D); the state is carried across blocks by a scan."""

    # token (vertical) path
    norm1: Float[Array, "D"]
    # queries, keys, values, and queries for the cross-attention to the state (see fused_init)
    w_qkvq: Float[Array, "D 4 D"]
    w_o: Float[Array, "2 D D"]  # [self; cross] attention outputs -> D, stored per part like w_qkvq
    norm2: Float[Array, "D"]
    mlp_w1: Float[Array, "D F"]
    mlp_b1: Float[Array, "F"]
    mlp_w2: Float[Array, "F D"]
    mlp_b2: Float[Array, "D"]
    # state (horizontal) path
    init_state: Float[Array, "S D"]
    state_pos: Float[Array, "S D"]
    norm_s: Float[Array, "D"]
    s_qkvq: Float[Array, "D 4 D"]
    s_o: Float[Array, "2 D D"]
    gate: Gate
    state_mlp: StateMLP | None
    heads: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    # Unroll the scan over blocks in the compiled program (meliad unrolls by default). Off: the
    # program stays one loop body whatever L/W is. On: what XLA's cost analysis needs to see every
    # block (it counts a loop body once); tests flip it with dataclasses.replace.
    unroll: bool = eqx.field(static=True, default=False)
    rate: float = eqx.field(static=True, default=0.0)  # dropout on the attention and MLP outputs

    # -- the sequential part: one block's state update --------------------------------------------
    def state_kv(self, s: Float[Array, "B S D"]):
        """Keys, values and both query sets of the state (RMS norm + learned state positions)."""
        ns = rms_norm(s, self.norm_s) + self.state_pos.astype(s.dtype)
        return fused_heads(ns, self.s_qkvq, self.heads)

    def state_step(self, s: Float[Array, "B S D"], k_blk: Float[Array, "B W H dh"], v_blk: Float[Array, "B W H dh"]):
        """(state entering block k, block k's token keys/values) -> (next state, the state's keys/values)."""
        from bstc.ops._attention import attend

        rq, rk, rv, rq2 = self.state_kv(s)  # (B, S, H, dh) each
        full = jnp.ones((1, 1), bool)
        a_self = attend(rq, rk, rv, full)  # states attend to each other (no order among states)
        a_cross = attend(rq2, k_blk, v_blk, full)  # the state reads the whole block (it is used by the next one)
        h = merge_heads(jnp.concatenate([a_self, a_cross], axis=-2)).astype(s.dtype)  # (B, S, 2D)
        r = project_parts([a_self, a_cross], self.s_o, s.dtype)
        s = self.gate(s, r, h)
        if self.state_mlp is not None:
            s = self.state_mlp(s)
        return s, (rk, rv)

    # -- the token path -------------------------------------------------------------------------
    def token_qkv(self, x: Float[Array, "B T D"], positions):
        from bstc.ops._attention import apply_rope

        h = rms_norm(x, self.norm1)
        q, k, v, q2 = fused_heads(h, self.w_qkvq, self.heads)
        # The state reads the unrotated keys: RoPE only makes sense between two rotated sides,
        # and the state has no position on the token axis.
        return apply_rope(q, positions), apply_rope(k, positions), k, v, q2

    def finish(self, x: Float[Array, "*b D"], a_self: Array, a_cross: Array, key: PRNGKeyArray | None = None
               ) -> Float[Array, "*b D"]:
        """Project [self; cross] attention, add to the residual, then the MLP; return the increment.
        With a key, dropout on the attention output and on the MLP output (meliad's placement)."""
        k_attn, k_mlp = jax.random.split(key) if key is not None else (None, None)
        a = dropout(project_parts([a_self, a_cross], self.w_o, x.dtype), self.rate, k_attn)
        h = rms_norm(x + a, self.norm2)
        m = jax.nn.gelu(h @ self.mlp_w1.astype(x.dtype) + self.mlp_b1.astype(x.dtype))
        m = m @ self.mlp_w2.astype(x.dtype) + self.mlp_b2.astype(x.dtype)
        return a + dropout(m, self.rate, k_mlp)

    def initial_state(self, batch: int, dtype) -> Float[Array, "B S D"]:
        return jnp.broadcast_to(self.init_state.astype(dtype), (batch, *self.init_state.shape))

    def __call__(self, x: Float[Array, "B L D"], *, context=None, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "B L D"]:
        from bstc.ops._attention import attend

        B, L, D = x.shape
        W, nb = self.window, L // self.window
        q, k, k_raw, v, q2 = (t.reshape(B, nb, W, *t.shape[2:])
                              for t in self.token_qkv(x, jnp.arange(L)))  # (B, nb, W, H, dh)

        # Sequential: the state entering each block (its keys/values are all the tokens need).
        def step(s, kv):
            s, rkv = self.state_step(s, *kv)
            return s, rkv

        blocks_first = lambda t: jnp.moveaxis(t, 1, 0)  # noqa: E731  (nb, B, W, H, dh): scan over blocks
        _, (rk, rv) = jax.lax.scan(step, self.initial_state(B, x.dtype), (blocks_first(k_raw), blocks_first(v)),
                                   unroll=self.unroll)
        rk, rv = jnp.moveaxis(rk, 0, 1), jnp.moveaxis(rv, 0, 1)  # (B, nb, S, H, dh)

        # Parallel over blocks: sliding self-attention and cross-attention to the incoming state.
        a_self = attend(q, with_previous_block(k), with_previous_block(v), sliding_mask(nb, W))
        a_cross = attend(q2, rk, rv, jnp.ones((1, 1), bool))  # (B, nb, W, H, dh)
        merge = lambda t: t.reshape(B, L, *t.shape[3:])  # noqa: E731
        return self.finish(x, merge(a_self), merge(a_cross), key=key)

    # ---- the decoding protocol (bstc/decode.py) ------------------------------------------------
    # The last 2W token keys/values (a ring, for the sliding self-attention), the current block's
    # unrotated keys and values (the state reads them when the block ends), the state, and the
    # keys/values of the state entering the current block.
    def init_cache(self, batch: int, dtype, length: int | None = None) -> dict:
        from bstc.ops._attention import ring_cache

        W, H, (S, D) = self.window, self.heads, self.init_state.shape
        kv = lambda n: jnp.zeros((batch, n, H, D // H), dtype)  # noqa: E731
        return {**ring_cache(batch, 2 * W, H, D // H, dtype), "k_blk": kv(W), "v_blk": kv(W),
                "state": self.initial_state(batch, dtype), "rk": kv(S), "rv": kv(S)}

    def decode(self, c: dict, x_t: Float[Array, "B D"], t, *, context=None):
        from bstc.ops._attention import attend, ring_push, ring_visible

        W = self.window
        p = t % W
        q, k, k_raw, v, q2 = (a[:, 0] for a in self.token_qkv(x_t[:, None], t[None]))  # (B, H, dh)
        # A new block starts: its tokens read the state that enters it.
        rk, rv = jax.lax.cond(p == 0, lambda c: tuple(self.state_kv(c["state"])[1:3]), lambda c: (c["rk"], c["rv"]), c)
        c = {**ring_push(c, k, v, t), "k_blk": c["k_blk"].at[:, p].set(k_raw), "v_blk": c["v_blk"].at[:, p].set(v),
             "rk": rk, "rv": rv}
        visible = ring_visible(c, (t // W - 1) * W, t)  # blocks k−1 and k up to t
        a_self = attend(q[:, None], c["k"], c["v"], visible[None])[:, 0]
        a_cross = attend(q2[:, None], rk, rv, jnp.ones((1, 1), bool))[:, 0]
        # The block is complete: the state reads it (the sequential step of the forward pass).
        state = jax.lax.cond(p == W - 1, lambda c: self.state_step(c["state"], c["k_blk"], c["v_blk"])[0],
                             lambda c: c["state"], c)
        return {**c, "state": state}, self.finish(x_t, a_self, a_cross)

    def call_unrolled(self, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        """The same layer as a Python loop over blocks, each block computed on its own (the test oracle)."""
        from bstc.ops._attention import attend

        B, L, D = x.shape
        W, nb = self.window, L // self.window
        s = self.initial_state(B, x.dtype)
        prev_k = prev_v = None
        outs = []
        for b in range(nb):
            xb = x[:, b * W:(b + 1) * W]
            q, k, k_raw, v, q2 = self.token_qkv(xb, jnp.arange(b * W, (b + 1) * W))
            if prev_k is None:
                a_self = attend(q, k, v, jnp.tril(jnp.ones((W, W), bool)))
            else:
                mask = jnp.concatenate([jnp.ones((W, W), bool), jnp.tril(jnp.ones((W, W), bool))], axis=1)
                a_self = attend(q, jnp.concatenate([prev_k, k], 1), jnp.concatenate([prev_v, v], 1), mask)
            _, rk, rv, _ = self.state_kv(s)
            a_cross = attend(q2, rk, rv, jnp.ones((1, 1), bool))
            outs.append(self.finish(xb, a_self, a_cross))
            s, _ = self.state_step(s, k_raw, v)
            prev_k, prev_v = k, v
        return jnp.concatenate(outs, axis=1)


@register
class BlockRecurrentOp(Op):
    kind = "brt"
    role = "attn"
    axes = BRT_AXES
    # Learned initial state and state positions are inputs, like embeddings; gate kernels are
    # matrices, gate biases biases (meliad keeps them small but non-zero).
    optim = {**{k: "norm" for k in ("norm1", "norm2", "norm_s", "norm")},
             **{k: "bias" for k in ("bias", "b_i", "b_f", "mlp_b1", "mlp_b2", "b1", "b2")},
             **{k: "weight" for k in ("w_qkvq", "s_qkvq", "w_o", "s_o", "w_i", "w_f", "mlp_w1", "mlp_w2", "w1", "w2")},
             "init_state": "embedding", "state_pos": "embedding"}
    params = (
        Param("window", int, doc="block length W (sliding window and recurrence step)"),
        Param("state", int, 0, min=0, doc="number of state vectors S (0 = window, as in the paper)"),
        Param("heads", int, 0, min=0, doc="attention heads (0 = the model's heads)"),
        Param("gate", str, "fixed", choices=GATES, doc="state update gate: fixed (learned bias) or lstm"),
        Param("skip", bool, True, doc="no MLP on the state path (the paper's 'skip' configuration)"),
        Param("hidden", int, 0, min=0, doc="token-path MLP width (0 = 4·d_model); also the state MLP's"),
        Param("dropout", float, 0.0, min=0.0, max=0.99, doc="dropout on the token path's attention and MLP outputs"),
    )
    doc = ("Block-Recurrent Transformer layer: sliding-window attention plus cross-attention to a recurrent "
           "state of S vectors, updated once per block by a gated attention step scanned over the blocks.")

    def check(self, args, dims: Dims, context: ContextSpec | None) -> list[Problem]:
        return check_heads(args, dims) + check_window(args, dims)

    def param_count(self, args, dims: Dims, context) -> int:
        D, S, F = dims.d_model, states_of(args, dims), hidden_of(args, dims)
        token = D + 4 * D * D + 2 * D * D + D + (D * F + F + F * D + D)
        gate = lambda fan_in: D if args.get("gate", "fixed") == "fixed" else 2 * (fan_in * D + D)  # noqa: E731
        state = 2 * S * D + D + 4 * D * D + 2 * D * D + gate(2 * D)
        if not args.get("skip", True):
            state += D + D * F + F + F * D + D + gate(F)
        return token + state

    def flops_per_token(self, args, dims: Dims, context) -> float:
        D, W, H = dims.d_model, int(args["window"]), heads_of(args, dims)
        S, F = states_of(args, dims), hidden_of(args, dims)
        lstm = args.get("gate", "fixed") == "lstm"
        # Token path, per token.
        token = (RMS_FLOPS * D + 2 * D * 4 * D + ROPE_FLOPS * 2 * D
                 + 2 * (2 * W) * D * 2 + SOFTMAX_FLOPS * H * 2 * W  # sliding self-attention (2W keys)
                 + 2 * S * D * 2 + SOFTMAX_FLOPS * H * S  # cross-attention to the state
                 + 2 * 2 * D * D + D + RMS_FLOPS * D  # projection, residual, norm
                 + 2 * D * F * 2 + (GELU_FLOPS + 1) * F + 2 * D)  # MLP (+ biases), the increment
        # State path: every block reads its incoming state's keys/values; the state is updated
        # after every block but the last (whose update nothing reads, so XLA drops it).
        nb = dims.seq_len // W
        kv = S * (RMS_FLOPS * D + D + 2 * D * 4 * D)  # norm, positions, q/k/v/q2
        gate = (2 * 2 * (2 * D) * D + 8 * D) if lstm else 4 * D  # per state vector
        update = S * (2 * S * D * 2 + SOFTMAX_FLOPS * H * S  # self-attention among the states
                      + 2 * W * D * 2 + SOFTMAX_FLOPS * H * W  # cross-attention to the block
                      + 2 * 2 * D * D + gate)
        if not args.get("skip", True):
            gate2 = (2 * 2 * F * D + 8 * D) if lstm else 4 * D
            update += S * (RMS_FLOPS * D + 2 * D * F * 2 + (GELU_FLOPS + 1) * F + D + gate2)
        return float(token + (nb * kv + (nb - 1) * update) / dims.seq_len)

    def activation_bytes_per_token(self, args, dims: Dims, context) -> float:
        item = 2 if dims.dtype == "bfloat16" else 4
        D, W, H = dims.d_model, int(args["window"]), heads_of(args, dims)
        S, F = states_of(args, dims), hidden_of(args, dims)
        return (10 * D + 2 * F) * item + H * (2 * W + S) * 4 + S * 8 * D * item / W

    def build(self, args, dims: Dims, context, *, key):
        D, S, F, W = dims.d_model, states_of(args, dims), hidden_of(args, dims), int(args["window"])
        gate_kind = str(args.get("gate", "fixed"))
        ks = jax.random.split(key, 12)
        # A fresh array per norm: one array in several leaves breaks buffer donation in the train step.
        ones = lambda: jnp.ones((D,), jnp.float32)  # noqa: E731
        state_mlp = None
        if not args.get("skip", True):
            state_mlp = StateMLP(ones(), dense_init(ks[8], D, F), jnp.zeros((F,)), dense_init(ks[9], F, D),
                                 jnp.zeros((D,)), Gate.make(gate_kind, F, D, ks[10]))
        return BlockRecurrent(
            norm1=ones(), w_qkvq=fused_init(ks[0], D, 4, D), w_o=dense_init(ks[1], 2 * D, D).reshape(2, D, D),
            norm2=ones(),
            mlp_w1=dense_init(ks[2], D, F), mlp_b1=jnp.zeros((F,)), mlp_w2=dense_init(ks[3], F, D),
            mlp_b2=jnp.zeros((D,)),
            # meliad: initial state small (0.1) but large enough for Adafactor to scale its updates.
            init_state=0.1 * jax.random.normal(ks[4], (S, D)), state_pos=jax.random.normal(ks[5], (S, D)),
            norm_s=ones(), s_qkvq=fused_init(ks[6], D, 4, D), s_o=dense_init(ks[7], 2 * D, D).reshape(2, D, D),
            gate=Gate.make(gate_kind, 2 * D, D, ks[11]), state_mlp=state_mlp,
            heads=heads_of(args, dims), window=W, rate=float(args.get("dropout", 0.0)))
