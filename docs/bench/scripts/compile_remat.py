"""Train-step (AdamW) compile time of the zoo's bst_sh_s4 at d_model 64, seq_len 256, window 64:
4 layers, and 24 layers scanned under each rematerialisation policy and unrolled; one compile
each, with the number of fused computations in the optimised HLO.

    python docs/bench/scripts/compile_remat.py"""
import time, jax, jax.numpy as jnp, equinox as eqx, optax
import bstc
from bstc.lower import lower
from bstc.runtime.model import resolve_model
from bstc.compile import plain_train_step
for groups, scan, remat in ((1,True,'none'),(6,True,'none'),(6,True,'dots'),(6,True,'full'),(6,False,'none')):
    ov={"d_model": 64, "heads": 2, "seq_len": 256, "window": 64, "groups": groups}
    m=bstc.parse(str(resolve_model('bst_sh_s4')), overrides=ov)
    model=lower(m, key=jax.random.key(0), scan=scan, remat=remat)
    p,s=eqx.partition(model, eqx.is_inexact_array)
    opt, step = plain_train_step(s, 1e-3); os_=opt.init(p)
    tok=jnp.zeros((1,256),jnp.int32)
    best=1e9
    for r in range(1):
        lo=jax.jit(step).lower(p,os_,tok)
        t=time.time(); c=lo.compile(); best=min(best,time.time()-t)
    txt=c.as_text()
    print(groups*4, 'scan' if scan else 'unrolled', remat, 'compile %.2f'%best, 'fused comps', txt.count('fused_computation'), flush=True)
