"""`bstc compile`: check, lower, and ahead-of-time compile the forward pass and a training step."""
from __future__ import annotations

import time
from pathlib import Path


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", ""): int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def plain_train_step(static, lr: float = 1e-3):
    """The plain training step that `bstc compile` compiles and `bstc bench model` times:
    next-token cross entropy of the model `eqx.combine(params, static)`, AdamW at `lr`.
    Returns (optimizer, step(params, opt_state, tokens) -> (params, opt_state, loss))."""
    import equinox as eqx
    import jax
    import optax

    def loss_fn(params, tokens):
        logits = eqx.combine(params, static)(tokens)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    opt = optax.adamw(lr)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def compile_model(source, *, overrides=None, batch: int = 2, remat: str = "none", scan: bool = True,
                  out_dir: Path | None = None) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from bstc import ir
    from bstc.frontend import parse
    from bstc.lower import Scanned, count_params, lower
    from bstc.passes.report import build_report

    t0 = time.perf_counter()
    m = parse(source, overrides=overrides)
    model = lower(m, key=jax.random.key(0), scan=scan, remat=remat)
    t_lower = time.perf_counter() - t0
    L = m.dims.seq_len
    tokens = jax.ShapeDtypeStruct((batch, L), jnp.int32)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def forward(params, tokens):
        return eqx.combine(params, static)(tokens)

    opt, train_step = plain_train_step(static)
    opt_state = jax.eval_shape(opt.init, params)

    pshape = jax.eval_shape(lambda p: p, params)
    t0 = time.perf_counter()
    fwd_lowered = jax.jit(forward).lower(pshape, tokens)
    fwd = fwd_lowered.compile()
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(pshape, opt_state, tokens)
    train = train_lowered.compile()
    t_train = time.perf_counter() - t0
    rep = build_report(m, batch=batch)
    res = {
        "model": m.name,
        "params": count_params(model),
        "explain_params": rep.params,
        "seq_len": L,
        "batch": batch,
        "lower_s": t_lower,
        "compile_forward_s": t_fwd,
        "compile_train_s": t_train,
        "forward_memory": _memory(fwd),
        "train_memory": _memory(train),
        "xla_forward_flops": _flops(fwd),
        "explain_forward_flops": rep.flops_per_token * batch * L,
        "backend": jax.default_backend(),
        "scanned_stages": sum(isinstance(s, Scanned) for s in model.stages),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.resolved.bst").write_text(ir.to_bst(m))
        (out_dir / "forward.stablehlo.mlir").write_text(fwd_lowered.as_text())
        (out_dir / "train_step.stablehlo.mlir").write_text(train_lowered.as_text())
    return res
