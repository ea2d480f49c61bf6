"""One launch each of the Gluon kernels' variants and of cuDNN's kernels on the same shapes, for Nsight Compute.

Everything is compiled and warmed up first; only the measured launches run between cudaProfilerStart/Stop, each
inside an NVTX range named after its case, so

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section InstructionStats --csv --page details \\
        python benchmarks/profile_gluon.py --cases fwd64 fwd64p cudnn_fwd64 ...

profiles those kernels alone.  Shapes as in bench_attention (bf16, 16k tokens, heads x head dim = 2048); the
case name says the kernel (``fwd``; ``kv`` / ``q``: the backward's passes; ``cudnn_fwd`` / ``cudnn_bwd``: SDPA's
cuDNN forward / backward), the head dim and ``c`` for causal.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from profile_kernels import run_profiled


def make(d, length):
    batch, heads = max(1, 16384 // length), 2048 // d
    q, do = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, do


def cases(length):
    from fa_inductor.kernels.common import empty_lse, empty_output
    from fa_inductor.kernels.gluon_bwd import gluon_backward_kv, gluon_backward_q
    from fa_inductor.kernels.gluon_fwd import gluon_forward

    def fwd(d, causal):
        q, k, v, _ = make(d, length)
        out, lse = empty_output(q, v), empty_lse(q)
        return lambda: gluon_forward(q, k, v, out, lse, d ** -0.5, 0 if causal else -1, 0)

    def cudnn(d, causal, backward):
        q, k, v, do = make(d, length)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        def run():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    def bwd(d, causal, which):
        q, k, v, do = make(d, length)
        lse_units = torch.randn(q.shape[:3], device="cuda").abs() + 10  # any finite statistics do for timing
        delta = torch.randn(q.shape[:3], device="cuda")
        grads = [torch.empty_like(t) for t in (q, k, v)]
        right = 0 if causal else -1
        if which == "kv":
            return lambda: gluon_backward_kv(q, k, v, do, lse_units, delta, grads[1], grads[2], d ** -0.5, right, 0)
        return lambda: gluon_backward_q(q, k, v, do, lse_units, delta, grads[0], d ** -0.5, right, 0)

    table = {}
    for d in (64, 128):
        for causal in (False, True):
            c = "c" if causal else ""
            table[f"fwd{d}{c}"] = lambda d=d, causal=causal: fwd(d, causal)
            table[f"cudnn_fwd{d}{c}"] = lambda d=d, causal=causal: cudnn(d, causal, False)
            table[f"cudnn_bwd{d}{c}"] = lambda d=d, causal=causal: cudnn(d, causal, True)
            for which in ("kv", "q"):
                table[f"{which}{d}{c}"] = lambda d=d, causal=causal, which=which: bwd(d, causal, which)
    return table


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", required=True)
    p.add_argument("--seqlen", type=int, default=16384)
    args = p.parse_args()
    table = cases(args.seqlen)
    runs = []
    for name in args.cases:
        fn = table[name]()
        fn()
        runs.append((name, fn))
    run_profiled(runs)


if __name__ == "__main__":
    main()
