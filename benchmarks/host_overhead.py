"""Host (CPU) time of one eager forward + backward call, fa_inductor against SDPA (cuDNN on an H100).

    python benchmarks/host_overhead.py [--layers [--rounds N]] [--profile] [--profile-forward]

For each shape: the wall time per call of 20 back-to-back calls without synchronising (the host's cost, as long
as the GPU queue does not fill) and with the final synchronisation (the host's and the GPU's together).  When the
first approaches the second, the call is host-bound.  ``--layers`` also times each layer of the call stack alone
on a tiny shape (host microseconds per call), from the kernel launches up to the public function.
``--profile`` runs cProfile over 200 such forward + backward calls and prints the functions with the most time
of their own and the most time below them; ``--profile-forward`` does the same for forward calls alone.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
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


def layers(rounds: int) -> None:
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

    def eager(*qkv):
        """``EagerAttention`` on (q, k, v), causal: the forward op's 16 arguments."""
        return op.EagerAttention.apply(*qkv, scale, True, False, None, -1, -1, None, None, 0.0, 0.0, None, None, 128)

    eager_out = eager(qg, kg, vg)[0]
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
        "registered op with its autograd formula, forward + backward": lambda: torch.autograd.grad(
            torch.ops.fa_inductor.flash_attention_forward(qg, kg, vg, scale, True, False)[0], (qg, kg, vg), g),
        "EagerAttention, forward + backward": lambda: torch.autograd.grad(eager(qg, kg, vg)[0], (qg, kg, vg), g),
        "EagerAttention, forward (no grad)": lambda: eager(q, k, v),
        "EagerAttention, forward (inputs require grad)": lambda: eager(qg, kg, vg),
        "scaled_dot_product_attention, forward (inputs require grad)": lambda: fa_inductor.scaled_dot_product_attention(
            qg, kg, vg, is_causal=True),
        "SDPA, forward (inputs require grad)": lambda: torch.nn.functional.scaled_dot_product_attention(
            qg, kg, vg, is_causal=True),
        "EagerAttention, backward (graph kept)": lambda: torch.autograd.grad(
            eager_out, (qg, kg, vg), g, retain_graph=True),
        "scaled_dot_product_attention, forward + backward": lambda: torch.autograd.grad(
            fa_inductor.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), g),
        "SDPA, forward + backward": lambda: torch.autograd.grad(
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), g),
    }
    # Interleaved rounds, medians: the host's speed drifts (other tenants, clocks) more than some layers differ.
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn, calls=200, warmup=5)[0] * 1e6)
    print(f"\n| layer (1 x 2 x 256 x 128, causal) | host us per call (median of {rounds} rounds) | min | max |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |", flush=True)


def profile(calls: int = 200, forward_only: bool = False) -> None:
    """cProfile over ``calls`` eager calls on a tiny causal shape: forward + backward, or (``forward_only``)
    the forward alone with inputs that require grad, as ``bench_attention.py`` times it."""
    q, k, v = (torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True)
        if not forward_only:
            torch.autograd.grad(out, (q, k, v), grad)

    timed(step, calls=5, warmup=5)
    # The autograd engine runs backward on its own thread, which cProfile would not see.
    torch.autograd.set_multithreading_enabled(False)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    torch.autograd.set_multithreading_enabled(True)
    stats = pstats.Stats(profiler)
    what = "forward" if forward_only else "forward + backward"
    print(f"\ncProfile of {calls} {what} calls (1 x 2 x 256 x 128, causal), by own time:")
    stats.sort_stats("tottime").print_stats(30)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-forward", action="store_true", help="cProfile of eager forward calls alone")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --layers")
    options = parser.parse_args()
    if options.profile or options.profile_forward:
        profile(forward_only=options.profile_forward)
    if options.layers:
        layers(options.rounds)
    main()
