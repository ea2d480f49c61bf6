"""Exploration: the backward with its dK/dV and dQ passes on the Gluon kernels (``kernels/gluon_bwd.py``) or on
the Triton kernels, against SDPA-cuDNN.

    python benchmarks/explore_gluon_bwd.py [--dq-blocks 64 128] [--stages 2 3]

For each ``bench_attention.py`` shape (16k tokens, model dim 2048) it times the whole backward (preprocess, dK/dV,
dQ) for: Triton dK/dV + Triton dQ (the portable path), Gluon dK/dV + Triton dQ, and Gluon dK/dV + Gluon dQ and
Triton dK/dV + Gluon dQ with each dQ key block and ring depth given; each variant's gradients are compared with
the Triton path's first.  All variants of a shape are timed in interleaved rounds (medians).  ``--order-ab`` adds
each variant with its programs ordered one head at a time (the order before ``common.head_group``), ``--only``
keeps the named variants (and the Triton path), ``--causal yes|no`` one kind of call.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton

from fa_inductor.kernels import common, gluon_bwd, op
from fa_inductor.kernels.common import dot_options
from fa_inductor.kernels.configs import Direction
from fa_inductor.kernels.flash_bwd import flash_backward
from fa_inductor.kernels.gluon_bwd import gluon_backward_kv, gluon_backward_q
from fa_inductor.kernels.masking import MaskSpec


def with_setting(module, name, value, fn):
    """``fn`` run with ``module.<name>`` set to ``value`` (restored afterwards)."""
    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            fn()
        finally:
            setattr(module, name, saved)
    return run


def one_head_at_a_time(fn):
    """``fn`` with every launch's programs ordered one head at a time (``common.head_group`` capped at 1): the
    order before heads were interleaved under a causal mask."""
    return with_setting(common, "MAX_HEAD_GROUP", 1, fn)


def private_dq(fn):
    """``fn`` with the one-pass consumers each adding both dQ column halves over their own keys under a causal mask
    too (``gluon_bwd.ONE_PASS_SHARED_DQ_CAUSAL`` off): the kernel before the consumers shared their dS^T tiles."""
    return with_setting(gluon_bwd, "ONE_PASS_SHARED_DQ_CAUSAL", False, fn)


def variants(q, k, v, do, out, lse, scale, causal, args):
    spec = MaskSpec(right=0 if causal else -1)
    right = 0 if causal else -1
    cfg_kv, cfg_q = op._configs(q, v, spec, Direction.BACKWARD_KV, Direction.BACKWARD_Q)
    dot = dot_options(q.dtype, interpreted=False)
    grads = [torch.empty_like(t) for t in (q, k, v)]

    def make(kv_pass, q_pass):
        return lambda: flash_backward(do, q, k, v, out, lse, None, *grads, None, scale, spec, cfg_kv, cfg_q, dot,
                                      kv_pass=kv_pass, q_pass=q_pass)

    def kv(stages):
        return lambda lse_units, delta: gluon_backward_kv(q, k, v, do, lse_units, delta, grads[1], grads[2], scale,
                                                          right, 0, stages=stages)

    def qp(block, stages, consumers=2):
        return lambda lse_units, delta: gluon_backward_q(q, k, v, do, lse_units, delta, grads[0], scale, right, 0,
                                                         block_keys=block, stages=stages, consumers=consumers)

    def one_pass(stages):
        def run():
            # As the op calls it: its small Triton kernels launch directly, not through wrap_triton.
            with common.direct_launches():
                op._one_pass_backward(do, q, k, v, out, lse, None, *grads, scale, spec, right, False, stages=stages)
        return run

    result = {"triton": make(None, None), "gluon kv + triton q": make(kv(2), None)}
    for stages in args.one_pass:
        result[f"one-pass s{stages}"] = one_pass(stages)
        if args.one_pass_private:
            result[f"one-pass s{stages} private"] = private_dq(one_pass(stages))
    for stages in args.stages:
        for block in args.dq_blocks:
            result[f"gluon kv s{stages} + q{block} s{stages}"] = make(kv(stages), qp(block, stages))
            result[f"triton kv + gluon q{block} s{stages}"] = make(None, qp(block, stages))
            for consumers in args.dq_consumers:
                result[f"triton kv + gluon q{block} s{stages} c{consumers}"] = make(None, qp(block, stages, consumers))
    if args.order_ab:
        for name in list(result):
            result[name + " g1"] = one_head_at_a_time(result[name])
    return result, grads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dq-blocks", nargs="+", type=int, default=[64, 128])
    p.add_argument("--stages", nargs="+", type=int, default=[2])
    p.add_argument("--dq-consumers", nargs="*", type=int, default=[],
                   help="also time the Gluon dQ pass with this many consumer warp groups (3: 192 query rows)")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--group", type=int, default=1, help="query heads per key head (GQA)")
    p.add_argument("--order-ab", action="store_true",
                   help="also time every variant with its programs one head at a time (suffix g1)")
    p.add_argument("--only", nargs="*", default=None,
                   help="time only these variants (names as printed) and the Triton path, the gradients' reference")
    p.add_argument("--one-pass", nargs="*", type=int, default=[],
                   help="also time the one-pass backward (dQ by TMA reductions) with these ring depths")
    p.add_argument("--one-pass-private", action="store_true",
                   help="also time each one-pass variant with private dQ halves per consumer (suffix private)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    args = p.parse_args()
    for d in args.head_dims:
        heads = 2048 // d
        for length in args.seqlens:
            batch = max(1, 16384 // length)
            for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
                q, do = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
                         for _ in range(2))
                k, v = (torch.randn(batch, heads // args.group, length, d, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
                scale = d ** -0.5
                out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, causal, False)
                impls, grads = variants(q, k, v, do, out, lse, scale, causal, args)
                if args.only is not None:
                    impls = {name: fn for name, fn in impls.items() if name in args.only or name == "triton"}
                impls["triton"]()
                reference = [g.clone() for g in grads]
                errors = {}
                for name, fn in list(impls.items()):
                    for g in grads:
                        g.fill_(float("nan"))
                    try:
                        fn()
                    except triton.runtime.errors.OutOfResources as exc:  # e.g. a ring too deep for this head dim
                        print(f"  {name}: skipped ({exc})", flush=True)
                        del impls[name]
                        continue
                    # torch's max keeps a NaN (Python's max() of floats could drop it).
                    errors[name] = torch.stack([(g.float() - r.float()).abs().max()
                                                for g, r in zip(grads, reference)]).max().item()

                def cudnn():
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, scale=scale)
                    torch.autograd.grad(o, (qr, kr, vr), do)
                # cuDNN gets K and V repeated to every query head (its time includes no repeat).
                qr, kr, vr = (t.detach().repeat_interleave(heads // t.shape[1], 1).requires_grad_()
                              for t in (q, k, v))
                times = {name: [] for name in list(impls) + ["cudnn fwd+bwd"]}
                impls["cudnn fwd+bwd"] = cudnn
                for _ in range(args.rounds):
                    for name, fn in impls.items():
                        times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100))
                flops = 2.5 * 4 * batch * heads * length * length * d / (2 if causal else 1)
                line = f"D={d} L={length} causal={causal!s:5}"
                for name, t in times.items():
                    ms = statistics.median(t)
                    err = f" err {errors[name]:.1e}" if name in errors else ""
                    line += f" | {name} {ms:.3f} ms {flops / ms / 1e9:.0f} TF{err}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
