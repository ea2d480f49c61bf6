"""One forward + backward of fa_inductor per benchmark shape, for Nsight Compute.

Kernels are compiled and warmed up first; only the measured step runs between cudaProfilerStart/Stop, so

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section ComputeWorkloadAnalysis python benchmarks/profile_kernels.py

profiles exactly one launch of each kernel per shape (the forward, the backward's preprocess, dK/dV and dQ
passes).  Shapes: bf16, batch x length = 16k tokens, heads x head dim = 2048, as in bench_attention.
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {"d128": (128, False), "d128c": (128, True), "d64": (64, False), "d64c": (64, True),
          "d256": (256, False), "d256c": (256, True)}


def main() -> None:
    import fa_inductor

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["d128", "d128c", "d64c"])
    p.add_argument("--seqlen", type=int, default=16384)
    args = p.parse_args()
    steps = []
    for name in args.shapes:
        d, causal = SHAPES[name]
        b, h, n = max(1, 16384 // args.seqlen), 2048 // d, args.seqlen
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

        def step(q=q, k=k, v=v, grad=grad, causal=causal):
            out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), grad)

        step()
        steps.append((name, step))
    run_profiled(steps)


def run_profiled(steps) -> None:
    """Run each (name, warmed-up function) once between cudaProfilerStart/Stop, inside an NVTX range named after
    it: what ``ncu --profile-from-start off`` sees."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, step in steps:
        torch.cuda.nvtx.range_push(name)
        step()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
