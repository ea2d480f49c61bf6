"""Exploration: the Gluon warp-specialised forward (``kernels/gluon_fwd.py``) against the Triton forward and cuDNN.

    python benchmarks/explore_gluon_fwd.py [--check-only] [--configs 128x2 ...]

First checks the Gluon kernel against an fp64 reference on awkward shapes (tails, GQA, strided layouts, causal
with both alignments), then times the forward of the ``bench_attention.py`` shapes (16k tokens, model dim 2048)
for the Gluon kernel (each block_n x stages config given), fa_inductor's shipped forward and SDPA-cuDNN, all in
the same process and interleaved over ``--rounds`` rounds (medians reported).
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch
import torch.nn.functional as F
import triton

from fa_inductor.kernels.gluon_fwd import REGISTERS, gluon_forward
from fa_inductor.kernels.common import empty_lse, empty_output


def reference(q, k, v, scale, causal_right, shift):
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, 1)
    v64 = v.double().repeat_interleave(group, 1)
    s = q.double() @ k64.transpose(-1, -2) * scale
    if causal_right >= 0:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        s = s.masked_fill(j > i + shift + causal_right, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v64, lse


# Register budgets (consumer registers, registers at launch): the kernel's own per consumer count
# (``gluon_fwd.REGISTERS``), or "w" (wide): two programs fit on one SM, for tiles small enough to live in 112
# registers per consumer thread.
WIDE = (112, 80)


CONFIG = re.compile(r"^(\d+)x(\d+)(w?)(?:c(\d))?(l?)(o?)(?:(p)([sd]?))?([tr]?)(?:g(\d+))?$")


def parse_config(cfg):
    """A config name -> keyword arguments of ``gluon_forward``.  "128x2": block_n 128, 2 stages, the register
    budget of the consumer count, 2 consumer warp groups, every other choice the launcher's default.  Suffixes, in
    this order: "w" the two-programs-per-SM budget; "c3" three consumer warp groups (192 query rows a program);
    "l" the consumer loop that converts and sums P in the next iteration (``late=True``); "o" the consumers issue
    their MMAs in turns (``pingpong=True``; without it, ``pingpong=False``); "p" a persistent grid
    (``persistent=True``) on the launcher's default schedule (its programs claim tiles from a counter under a causal
    mask and at ``CLAIMING_HEAD_DIMS``, else take every SM-count-th one), "ps" / "pd" one that always takes every
    SM-count-th tile / always claims (``dynamic=False`` / ``True``); "t" / "r" O stored through shared memory and
    TMA / from registers (``tma_store=True`` / ``False``; without either, the launcher's default); "g4" four heads
    interleaved (``group_heads=4``; "g1" is the one-head-at-a-time order).  Without "l" / "p" the late loop and
    persistence are off."""
    match = CONFIG.match(cfg)
    if match is None:
        raise SystemExit(f"bad config {cfg!r}")
    block_n, stages, wide, consumers, late, ordered, persistent, schedule, store, group = match.groups()
    consumers = int(consumers or 2)
    regs = WIDE if wide else REGISTERS[consumers]
    return dict(block_n=int(block_n), stages=int(stages), consumer_regs=regs[0], maxnreg=regs[1],
                consumers=consumers, late=bool(late), pingpong=bool(ordered), persistent=bool(persistent),
                dynamic={"s": False, "d": True}.get(schedule), tma_store={"t": True, "r": False}.get(store),
                group_heads=int(group) if group else None)


def check(batch, heads, kv_heads, m, n, d, causal, bottom_right, layout, dtype, config):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(h, length):
        if layout == "bmhd":
            return torch.randn(batch, length, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        return torch.randn(batch, h, length, d, device="cuda", dtype=dtype, generator=gen)

    q, k, v = make(heads, m), make(kv_heads, n), make(kv_heads, n)
    scale = d ** -0.5
    shift = n - m if bottom_right else 0
    right = 0 if causal else -1
    out = empty_output(q, v)
    lse = empty_lse(q)
    gluon_forward(q, k, v, out, lse, scale, right, shift, **config)
    torch.cuda.synchronize()
    ref, ref_lse = reference(q, k, v, scale, right, shift)
    # PyTorch's own same-precision math attention, the error budget's yardstick.
    group = heads // kv_heads
    mask = None
    if causal:
        i = torch.arange(m, device="cuda")[:, None]
        j = torch.arange(n, device="cuda")[None, :]
        mask = j <= i + shift
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        math = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=mask, scale=scale)
    math = math.double().nan_to_num(0.0)
    err = (out.double() - ref).abs().max().item()
    math_err = (math - ref).abs().max().item()
    finite = torch.isfinite(ref_lse)
    lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    lse_ok = bool((lse[~finite] == float("-inf")).all())
    ok = err <= 3 * max(math_err, 1e-3) and lse_err < 1e-3 and lse_ok and bool(torch.isfinite(out).all())
    print(f"{'ok ' if ok else 'BAD'} B={batch} H={heads}/{kv_heads} M={m} N={n} D={d} causal={causal} "
          f"br={bottom_right} {layout} {str(dtype)[6:]} {config}: "
          f"err {err:.2e} "
          f"(math {math_err:.2e}) lse {lse_err:.1e}", flush=True)
    return ok


def flops(batch, heads, length, d, causal):
    f = 4 * batch * heads * length * length * d
    return f / 2 if causal else f


def bench(args):
    results = []
    for d in args.head_dims:
        heads = 2048 // d
        for length in args.seqlens:
            batch = max(1, 16384 // length)
            for causal in (False, True):
                q, k, v = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                out = empty_output(q, v)
                lse = empty_lse(q)
                scale = d ** -0.5
                impls = {}
                for cfg in args.configs:
                    impls[f"gluon {cfg}"] = (lambda kw=parse_config(cfg): gluon_forward(
                        q, k, v, out, lse, scale, 0 if causal else -1, 0, **kw))
                impls["fa_inductor"] = lambda: torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, causal,
                                                                                             False)
                def cudnn():
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                impls["cudnn"] = cudnn
                times = {name: [] for name in impls}
                for name, fn in impls.items():
                    fn()  # compile / tune
                for _ in range(args.rounds):
                    for name, fn in impls.items():
                        times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100))
                line = f"D={d} L={length} B={batch} H={heads} causal={causal!s:5}"
                cud = statistics.median(times["cudnn"])
                for name, t in times.items():
                    ms = statistics.median(t)
                    tf = flops(batch, heads, length, d, causal) / ms / 1e9
                    line += f" | {name} {ms:.3f} ms {tf:.0f} TF ({cud / ms:.2f}x cudnn)"
                    results.append((d, length, causal, name, ms))
                print(line, flush=True)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--configs", nargs="+", default=["128x2"],
                   help="block_n x stages, e.g. 128x2, then optional suffixes (see parse_config): w, c3, l, o, p, "
                        "ps, pd, t, r, g<heads>, e.g. 128x2lp, 128x2c3pt or 128x2c3g1")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ok = True
    for cfg in args.configs:
        config = parse_config(cfg)
        for d in args.head_dims:
            for (b, h, hk, m, n, causal, br, layout) in (
                    (2, 4, 4, 256, 256, False, False, "bhmd"),
                    (2, 4, 4, 1000, 1000, True, False, "bhmd"),
                    (1, 8, 2, 333, 777, False, False, "bmhd"),
                    (1, 8, 2, 300, 777, True, True, "bmhd"),
                    (2, 3, 1, 129, 65, False, False, "bhmd"),
                    (1, 2, 2, 700, 600, True, False, "bhmd"),
                    (1, 2, 2, 64, 4096, True, True, "bmhd"),
                    (1, 2, 1, 1, 5, False, False, "bhmd"),
                    # More tiles than SMs: a persistent program runs several, its ring running on across them.
                    (4, 16, 4, 1000, 1000, False, False, "bmhd"),
                    (4, 16, 4, 1000, 1000, True, False, "bhmd")):
                for dtype in ((torch.bfloat16, torch.float16) if m == 1000 else (torch.bfloat16,)):
                    ok &= check(b, h, hk, m, n, d, causal, br, layout, dtype, config)
    print("ALL OK" if ok else "SOME BAD", flush=True)
    if not args.check_only:
        bench(args)


if __name__ == "__main__":
    main()
