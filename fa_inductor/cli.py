"""``fa-inductor`` command line.

  fa-inductor demo   run causal attention through fa_inductor and torch's SDPA on the same inputs and print
                     the error against an fp64 reference, time per forward/backward step and peak memory
                     (CUDA when present, otherwise CPU)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _time_ms(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up: compiles the kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeat


def _peak_mib(fn, device: torch.device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def demo(args) -> None:
    import fa_inductor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    length = args.seq_len or (4096 if device.type == "cuda" else 512)
    batch, heads, kv_heads, head_dim = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"fa_inductor {fa_inductor.__version__} demo on {device} ({dtype}): batch {batch}, {heads} query heads, "
          f"{kv_heads} key/value heads, length {length}, head dim {head_dim}, causal")
    q = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(q)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())

    impls = {"fa_inductor": fa_inductor.scaled_dot_product_attention, "torch sdpa": F.scaled_dot_product_attention}
    flops = 4 * batch * heads * length * length * head_dim / 2 * 3.5
    print(f"{'implementation':<14} {'max err out':>12} {'max err grads':>14} {'fwd+bwd ms':>11} {'TFLOP/s':>8} "
          f"{'peak MiB':>9}")
    for name, attn in impls.items():
        def step():
            out = attn(q, k, v, is_causal=True, enable_gqa=True)
            return out, torch.autograd.grad(out, (q, k, v), grad)

        out, grads = step()
        err_out = (out.double() - ref).abs().max().item()
        err_grad = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
        ms = _time_ms(step, device, args.repeat)
        peak = _peak_mib(step, device)
        peak_s = f"{peak:9.0f}" if peak is not None else f"{'n/a':>9}"
        print(f"{name:<14} {err_out:12.2e} {err_grad:14.2e} {ms:11.2f} {flops / ms / 1e9:8.2f} {peak_s}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fa-inductor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compare fa_inductor with torch SDPA on one attention call")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=10)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
