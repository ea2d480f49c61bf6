"""Host (CPU) time of one eager forward + backward call, fa_inductor against SDPA (cuDNN on an H100).

    python benchmarks/host_overhead.py [--layers]

For each shape: the wall time per call of 20 back-to-back calls without synchronising (the host's cost, as long
as the GPU queue does not fill) and with the final synchronisation (the host's and the GPU's together).  When the
first approaches the second, the call is host-bound.  ``--layers`` also times each layer of the call stack alone
on a tiny shape (host microseconds per call), from the kernel launches up to the public function.
"""

from __future__ import annotations

import argparse
import time

import torch

import fa_inductor

SHAPES = ((128, 4096, 4, 16), (64, 4096, 4, 32))  # head dim, length, batch, heads (16k tokens, model dim 2048)


def timed(fn, calls: int, warmup: int) -> tuple[float, float]:
    """Seconds per call of ``calls`` back-to-back calls: as the host saw them return, and once the GPU is done."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host, (time.perf_counter() - start) / calls


def main() -> None:
    print("| head dim | length | impl | host ms per call | host + GPU ms per call |")
    print("|---|---|---|---|---|")
    for d, length, batch, heads in SHAPES:
        q, k, v = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
        impls = {"fa_inductor": lambda: fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True),
                 "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, fn in impls.items():
            host, total = timed(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad), calls=20, warmup=3)
            print(f"| {d} | {length} | {name} | {host * 1e3:.3f} | {total * 1e3:.3f} |", flush=True)


def layers() -> None:
    from fa_inductor.kernels import op
    from fa_inductor.kernels.common import dot_options, empty_lse, empty_output
    from fa_inductor.kernels.configs import INTERPRETER_CONFIG
    from fa_inductor.kernels.flash_bwd import flash_backward
    from fa_inductor.kernels.gluon_bwd import gluon_backward_kv, gluon_backward_q
    from fa_inductor.kernels.gluon_fwd import _descriptor, gluon_forward
    from fa_inductor.kernels.masking import MaskSpec

    q, k, v, g = (torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = 128 ** -0.5
    out, lse = empty_output(q, v), empty_lse(q)
    spec = MaskSpec(right=0)
    dot = dot_options(q.dtype, interpreted=False)
    fwd_out, fwd_lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, True, False)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    lse_units, delta = torch.zeros(1, 2, 256, device="cuda"), torch.zeros(1, 2, 256, device="cuda")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    @torch.library.custom_op("fa_inductor_bench::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    cases = {
        "torch.empty_like (reference)": lambda: torch.empty_like(q),
        "a no-op torch.library.custom_op": lambda: noop(q),
        "TMA descriptor (one)": lambda: _descriptor(q, 64),
        "gluon_forward (3 descriptors + launch)": lambda: gluon_forward(q, k, v, out, lse, scale, 0, 0),
        "op hopper_attention_forward": lambda: torch.ops.fa_inductor.hopper_attention_forward(q, k, v, scale, 0,
                                                                                            False),
        "op flash_attention_forward (no grad)": lambda: torch.ops.fa_inductor.flash_attention_forward(
            q, k, v, scale, True, False),
        "gluon_backward_kv": lambda: gluon_backward_kv(q, k, v, g, lse_units, delta, grads[1], grads[2], scale, 0,
                                                       0),
        "gluon_backward_q": lambda: gluon_backward_q(q, k, v, g, lse_units, delta, grads[0], scale, 0, 0),
        "flash_backward, Triton passes": lambda: flash_backward(
            g, q, k, v, fwd_out, fwd_lse, None, *grads, None, scale, spec,
            *op._configs(q, v, spec, op.Direction.BACKWARD_KV, op.Direction.BACKWARD_Q),
            dot),
        "flash_backward, preprocess only": lambda: flash_backward(
            g, q, k, v, fwd_out, fwd_lse, None, *grads, None, scale, spec, INTERPRETER_CONFIG, INTERPRETER_CONFIG,
            dot, kv_pass=lambda *a: None, q_pass=lambda *a: None),
        "op hopper_attention_backward": lambda: torch.ops.fa_inductor.hopper_attention_backward(
            g, q, k, v, fwd_out, fwd_lse, None, scale, 0, False),
        "op flash_attention_backward": lambda: torch.ops.fa_inductor.flash_attention_backward(
            g, q, k, v, fwd_out, fwd_lse, None, scale, True, False),
        "scaled_dot_product_attention, forward + backward": lambda: torch.autograd.grad(
            fa_inductor.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), g),
        "SDPA, forward + backward": lambda: torch.autograd.grad(
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), g),
    }
    print("\n| layer (1 x 2 x 256 x 128, causal) | host us per call |\n|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {timed(fn, calls=200, warmup=5)[0] * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", action="store_true")
    if parser.parse_args().layers:
        layers()
    main()
