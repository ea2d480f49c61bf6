"""Does the memory layout of Q, K, V change the kernels' speed?  The Llama-3.2-1B attention shape (1 x 32 query
heads over 8 key heads x 16k x 64, causal, bf16) through the op, forward and forward + backward, with contiguous
[B, H, L, D] operands ("bhld") and with transposed views of [B, L, H, D] tensors ("blhd", what Hugging Face
models hand over).  Same configs (the shipped table's), one run.

    PYTHONPATH=. python benchmarks/layout_check.py
"""

import torch
from triton.testing import do_bench

import fa_inductor  # noqa: F401  (registers the ops)

B, H, HK, L, D = 1, 32, 8, 16384, 64


def operands(layout):
    shapes = ((B, H, L, D), (B, HK, L, D), (B, HK, L, D))
    if layout == "bhld":
        made = [torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    else:
        made = [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for b, h, n, d in shapes]
    return [t.requires_grad_() for t in made]


for layout in ("bhld", "blhd", "bhld"):
    q, k, v = operands(layout)
    op = torch.ops.fa_inductor.flash_attention_forward

    def forward():
        return op(q, k, v, D ** -0.5, True, False)[0]

    out = forward()
    grad = torch.randn_like(out)

    def train():
        torch.autograd.grad(forward(), (q, k, v), grad)

    print(f"{layout}: forward {do_bench(forward, rep=200):.3f} ms, forward+backward {do_bench(train, rep=200):.3f} ms",
          flush=True)
