"""Is an eager benchmark row timed by the GPU or by the host?  For one attention shape (default: the 4k causal
head-dim-128 forward of ``bench_attention.py``, batch 4 x 16 heads) this prints, for the eager
``fa_inductor.scaled_dot_product_attention`` forward, the registered op and the Gluon forward launched directly:
the host time of a call (100 calls queued without waiting), the wall time of those calls, and ``do_bench``'s
time.  A call whose host time is at or above its GPU time is timed by the host.  The last lines time the eager
forward with and without the persistent causal grid (``gluon_fwd.PERSISTENT_CAUSAL_HEAD_DIMS``).  H100 / Hopper
with Gluon only.

    PYTHONPATH=. python benchmarks/host_bound_check.py [--head-dim 128] [--seqlen 4096] [--no-causal]
"""

import argparse

import torch
import triton
from host_overhead import timed

import fa_inductor
from fa_inductor.kernels import gluon_fwd
from fa_inductor.kernels.common import empty_lse, empty_output


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--no-causal", action="store_true")
    args = p.parse_args()
    d, length, causal = args.head_dim, args.seqlen, not args.no_causal
    batch, heads = max(1, 16384 // length), 2048 // d
    q, k, v = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out, lse = empty_output(q, v), empty_lse(q)
    right = 0 if causal else -1
    fns = {
        "eager": lambda: fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "op": lambda: torch.ops.fa_inductor.flash_attention_forward(q, k, v, d ** -0.5, causal, False),
        "gluon direct": lambda: gluon_fwd.gluon_forward(q, k, v, out, lse, d ** -0.5, right, 0),
        "gluon direct, a program per tile": lambda: gluon_fwd.gluon_forward(q, k, v, out, lse, d ** -0.5, right, 0,
                                                                            persistent=False),
    }
    for name, fn in fns.items():
        host, wall = (seconds * 1e3 for seconds in timed(fn, calls=100, warmup=5))
        print(f"{name}: host {host:.3f} ms/call, wall {wall:.3f} ms/call, "
              f"do_bench {triton.testing.do_bench(fn, warmup=25, rep=100):.3f} ms", flush=True)
    shipped = gluon_fwd.PERSISTENT_CAUSAL_HEAD_DIMS
    try:
        for persistent in (shipped, ()):
            gluon_fwd.PERSISTENT_CAUSAL_HEAD_DIMS = persistent
            host, wall = (seconds * 1e3 for seconds in timed(fns["eager"], calls=100, warmup=5))
            print(f"eager, PERSISTENT_CAUSAL_HEAD_DIMS={persistent}: host {host:.3f} ms/call, wall {wall:.3f} "
                  f"ms/call, do_bench {triton.testing.do_bench(fns['eager'], warmup=25, rep=100):.3f} ms", flush=True)
    finally:
        gluon_fwd.PERSISTENT_CAUSAL_HEAD_DIMS = shipped


if __name__ == "__main__":
    main()
