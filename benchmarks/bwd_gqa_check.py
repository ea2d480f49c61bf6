"""Backward kernel time for the Llama-3.2-1B attention shape (1 x 32 heads / 8 KV heads x 16k x 64, causal) per
config: does the shipped table (tuned on MHA shapes) fit grouped-query attention?"""
import torch
from triton.testing import do_bench
import fa_inductor  # noqa: F401  (registers the ops)
from fa_inductor.kernels.configs import KernelConfig
from fa_inductor.kernels.common import dot_options
from fa_inductor.kernels.flash_bwd import flash_backward
from fa_inductor.kernels.masking import SPARSE_BLOCK
from fa_inductor.kernels.op import mask_spec

KV = [(128, 128, 8, 4), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3)]
Q = [(64, 128, 4, 3), (128, 64, 8, 2), (128, 64, 4, 4), (64, 64, 4, 2), (128, 128, 8, 3)]
for heads, kv_heads in ((32, 8), (32, 32)):
    n, d = 16384, 64
    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, True, False)
    do = torch.randn_like(out)
    spec = mask_spec(q, k, True, False, None, -1, -1, None, None, 0.0, 0.0, None, None, SPARSE_BLOCK)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dot = dot_options(q.dtype, False)
    flops = 2.5 * 4 * heads * n * n * d / 2
    for name, cfgs, passes in (("kv", KV, ("kv",)), ("q", Q, ("q",))):
        for c in cfgs:
            cfg = KernelConfig(*c)
            fn = lambda: flash_backward(do, q, k, v, out, lse, None, dq, dk, dv, None, scale, spec, cfg, cfg, dot, passes=passes)
            try:
                ms = do_bench(fn, rep=40)
                print(f"H{heads}/HK{kv_heads} {name} {cfg} {ms:.3f} ms", flush=True)
            except Exception as e:
                print(f"H{heads}/HK{kv_heads} {name} {cfg} error {type(e).__name__}", flush=True)
