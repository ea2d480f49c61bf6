"""Issue 7 exploration on Hopper: what TMA descriptors, warp specialisation and a one-pass backward with atomic
dQ buy over fa_inductor's current kernels, with SDPA cuDNN / flash timed in the same run.

The kernels here are deliberately minimal (bf16, no masks beyond causal, lengths divisible by the blocks, no GQA):
they measure a feature's worth before it goes into the real kernels.  Each variant's output is checked against
SDPA before it is timed; a variant that fails to compile or is wrong is reported, not timed.

    python benchmarks/explore_hopper.py --part fwd --out results/explore_fwd.json
    python benchmarks/explore_hopper.py --part bwd --out results/explore_bwd.json
    python benchmarks/explore_hopper.py --part ws-check

Findings on the H100 with Triton 3.6 (benchmarks/reference/explore_hopper_h100.md):
- warp specialisation (``tl.range(..., warp_specialize=True)``, device-side descriptors, M128/N128/w4/s2) lifts
  the d=128 non-causal forward from 539 to 604 TFLOP/s at 16k, but it is not correct in every shape: with only
  a few programs in flight (``--part ws-check``: batch 1, 2 heads, 128 queries, 4096 keys) the rows of the
  second consumer warp group come out wrong, and epilogues that store through pointers instead of descriptors
  are wrong everywhere.  So fa_inductor does not use it; rerun ``--part ws-check`` on a newer Triton.
- descriptors without warp specialisation: no gain over the pointer kernel;
- one-pass backward with fp32 atomic dQ: at best equal to the two-pass (dK/dV, then dQ) backward, mostly slower.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend
from triton.testing import do_bench

from bench_attention import sdpa_attention
from harness import attention_flops, tflops

LOG2E = math.log2(math.e)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, kd, vd, lo, hi, offs_m, offs_n, qk_scale, BN: tl.constexpr, MASK: tl.constexpr,
               WS: tl.constexpr):
    for start in tl.range(lo, hi, BN, warp_specialize=WS):
        k = kd.load([start, 0])
        qk = tl.dot(q, k.T)
        if MASK:
            qk = tl.where(offs_m[:, None] >= (start + offs_n)[None, :], qk * qk_scale, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        v = vd.load([start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_desc(Q, K, V, O, n_heads, n_ctx, qk_scale, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):
    n_m = tl.cdiv(n_ctx, BM)
    pid = tl.program_id(0)
    bh = pid // n_m
    mb = pid % n_m
    if CAUSAL:
        mb = n_m - 1 - mb
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    qd = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[n_ctx, D], strides=[sqm, 1], block_shape=[BM, D])
    kd = tl.make_tensor_descriptor(K + b * skb + h * skh, shape=[n_ctx, D], strides=[skn, 1], block_shape=[BN, D])
    vd = tl.make_tensor_descriptor(V + b * svb + h * svh, shape=[n_ctx, D], strides=[svn, 1], block_shape=[BN, D])
    od = tl.make_tensor_descriptor(O + b * sob + h * soh, shape=[n_ctx, D], strides=[som, 1], block_shape=[BM, D])
    start_m = mb * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    q = qd.load([start_m, 0])
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if CAUSAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kd, vd, 0, start_m, offs_m, offs_n, qk_scale, BN, False, False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kd, vd, start_m, start_m + BM, offs_m, offs_n, qk_scale, BN,
                                   True, False)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kd, vd, 0, n_ctx, offs_m, offs_n, qk_scale, BN, False, WS)
    od.store([start_m, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))


def desc_forward(q, k, v, causal, bm, bn, warps, stages, ws):
    out = torch.empty_like(q)
    b, h, n, d = q.shape
    grid = (triton.cdiv(n, bm) * b * h,)
    _fwd_desc[grid](q, k, v, out, h, n, 1 / math.sqrt(d) * LOG2E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    *out.stride()[:3], D=d, BM=bm, BN=bn, CAUSAL=causal, WS=ws, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _bwd_step(dk, dv, k, v, Q, DO, LSE2, DELTA, DQ, row_base, start_m, offs_n, offs_d, qk_scale, sm_scale,
              D: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr):
    offs_m = start_m + tl.arange(0, BM)
    ptrs = row_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    q = tl.load(Q + ptrs)
    qk_t = tl.dot(k, tl.trans(q))
    lse = tl.load(LSE2 + offs_m)
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    if MASK:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    do = tl.load(DO + ptrs)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    delta = tl.load(DELTA + offs_m)
    ds_t = p_t * (dp_t - delta[None, :])
    ds16 = ds_t.to(q.dtype)
    dk = tl.dot(ds16, q, dk)
    dq = tl.dot(tl.trans(ds16), k)
    tl.atomic_add(DQ + ptrs, dq * sm_scale, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_fused(Q, K, V, DO, LSE2, DELTA, DQ, DK, DV, n_ctx, qk_scale, sm_scale,
               D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """One program per (b*h, key block): dK, dV in registers, dQ += dS K through fp32 atomics (contiguous
    [B*H, N, D] tensors)."""
    n_n = n_ctx // BN
    pid = tl.program_id(0)
    bh = pid // n_n
    start_n = (pid % n_n) * BN
    row_base = bh.to(tl.int64) * n_ctx * D
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kv_ptrs = row_base + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    k = tl.load(K + kv_ptrs)
    v = tl.load(V + kv_ptrs)
    dk = tl.zeros([BN, D], dtype=tl.float32)
    dv = tl.zeros([BN, D], dtype=tl.float32)
    LSE2 += bh.to(tl.int64) * n_ctx
    DELTA += bh.to(tl.int64) * n_ctx
    lo = 0
    if CAUSAL:
        for start_m in range(start_n, start_n + BN, BM):
            dk, dv = _bwd_step(dk, dv, k, v, Q, DO, LSE2, DELTA, DQ, row_base, start_m, offs_n, offs_d, qk_scale,
                               sm_scale, D, BM, True)
        lo = start_n + BN
    for start_m in range(lo, n_ctx, BM):
        dk, dv = _bwd_step(dk, dv, k, v, Q, DO, LSE2, DELTA, DQ, row_base, start_m, offs_n, offs_d, qk_scale,
                           sm_scale, D, BM, False)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty))


def fused_backward(q, k, v, out, lse, do, causal, bm, bn, warps, stages):
    b, h, n, d = q.shape
    scale = 1 / math.sqrt(d)
    delta = (out.float() * do.float()).sum(-1)
    lse2 = lse * LOG2E
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    grid = (n // bn * b * h,)
    _bwd_fused[grid](q, k, v, do, lse2, delta, dq, dk, dv, n, scale * LOG2E, scale, D=d, BM=bm, BN=bn,
                     CAUSAL=causal, num_warps=warps, num_stages=stages)
    return dq.to(q.dtype), dk, dv


def _tflops(q, causal, ms, mode):
    b, h, n, d = q.shape
    return tflops(attention_flops(b, h, n, n, d, causal, mode), ms)


def peers(causal):
    """The implementations the variants are measured against, as attention(q, k, v)."""
    import fa_inductor

    return {"cudnn": sdpa_attention(SDPBackend.CUDNN_ATTENTION, is_causal=causal),
            "flash": sdpa_attention(SDPBackend.FLASH_ATTENTION, is_causal=causal),
            "fa_inductor": functools.partial(fa_inductor.scaled_dot_product_attention, is_causal=causal)}


def inputs(n, d, grad=False):
    b, h = max(1, 16384 // n), 2048 // d
    torch.manual_seed(0)
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3)]


def close(a, b):
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)


FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 3), (256, 64, 8, 3), (256, 128, 8, 2)]
BWD_CONFIGS = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 2), (32, 128, 8, 3), (64, 128, 4, 2),
               (128, 128, 8, 2)]
SHAPES = [(128, False, 16384), (128, False, 4096), (128, True, 16384), (128, True, 4096), (64, False, 16384),
          (64, True, 16384)]


def part_fwd(rows, rep):
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    for d, causal, n in SHAPES:
        q, k, v = inputs(n, d)
        implementations = peers(causal)
        ref = implementations["cudnn"](q, k, v)
        for name, fn in implementations.items():
            ms = do_bench(lambda: fn(q, k, v), rep=rep)
            rows.append(dict(part="fwd", impl=name, d=d, causal=causal, n=n, ms=ms,
                             tflops=_tflops(q, causal, ms, "fwd"), err=close(fn(q, k, v), ref)))
            print(rows[-1], flush=True)
        for bm, bn, w, s in FWD_CONFIGS:
            for ws in ([False, True] if not causal else [False]):
                row = dict(part="fwd", impl=f"desc{'_ws' if ws else ''}", d=d, causal=causal, n=n,
                           config=f"M{bm}/N{bn}/w{w}/s{s}")
                try:
                    t0 = time.time()
                    err = close(desc_forward(q, k, v, causal, bm, bn, w, s, ws), ref)
                    row["compile_s"] = time.time() - t0
                    row["err"] = err
                    if err > 2e-2:
                        raise AssertionError(f"wrong result: rel err {err:.3g}")
                    ms = do_bench(lambda: desc_forward(q, k, v, causal, bm, bn, w, s, ws), rep=rep)
                    row.update(ms=ms, tflops=_tflops(q, causal, ms, "fwd"))
                except Exception as exc:  # noqa: BLE001 - a failing variant is a result
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(row, flush=True)


def part_bwd(rows, rep):
    for d, causal, n in SHAPES:
        q, k, v = inputs(n, d, grad=True)
        do = torch.randn_like(q)
        implementations = peers(causal)
        ref = torch.autograd.grad(implementations["cudnn"](q, k, v), (q, k, v), do)
        for name, fn in implementations.items():
            out = fn(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), rep=rep)
            rows.append(dict(part="bwd", impl=name, d=d, causal=causal, n=n, ms=ms,
                             tflops=_tflops(q, causal, ms, "bwd"),
                             err=max(close(g, r) for g, r in zip(grads, ref))))
            print(rows[-1], flush=True)
        qd, kd, vd = (t.detach() for t in (q, k, v))
        out, lse = torch.ops.fa_inductor.flash_attention_forward(qd, kd, vd, 1 / math.sqrt(d), causal, False)
        out = out.contiguous()
        for bm, bn, w, s in BWD_CONFIGS:
            if d == 128 and bm * bn > 64 * 128:
                continue
            row = dict(part="bwd", impl="fused_atomic", d=d, causal=causal, n=n, config=f"M{bm}/N{bn}/w{w}/s{s}")
            try:
                grads = fused_backward(qd, kd, vd, out, lse, do, causal, bm, bn, w, s)
                row["err"] = err = max(close(g, r) for g, r in zip(grads, ref))
                if err > 3e-2:
                    raise AssertionError(f"wrong result: rel err {err:.3g}")
                ms = do_bench(lambda: fused_backward(qd, kd, vd, out, lse, do, causal, bm, bn, w, s), rep=rep)
                row.update(ms=ms, tflops=_tflops(q, causal, ms, "bwd"))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(row, flush=True)


def part_ws_check(rows, rep):
    """Warp-specialised forward against fp32 SDPA on grids from 2 to 2048 programs."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    for b, h, m, n, d in [(1, 2, 128, 4096, 64), (1, 2, 128, 4096, 128), (1, 8, 1024, 1024, 128),
                          (1, 16, 16384, 16384, 128), (1, 32, 16384, 16384, 64)]:
        torch.manual_seed(0)
        q = torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = torch.empty_like(q)
        grid = (triton.cdiv(m, 128) * b * h,)
        _fwd_desc[grid](q, k, v, out, h, n, d ** -0.5 * LOG2E, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                        *out.stride()[:3], D=d, BM=128, BN=128, CAUSAL=False, WS=True, num_warps=4, num_stages=2)
        bad = ((out.float() - ref).abs().amax(-1) > 0.05).sum().item()
        rows.append(dict(part="ws-check", b=b, h=h, m=m, n=n, d=d, max_err=(out.float() - ref).abs().max().item(),
                         bad_rows=bad, rows=b * h * m))
        print(rows[-1], flush=True)


def summary(rows):
    best = {}
    for r in rows:
        if "tflops" not in r or "d" not in r:
            continue
        key = (r["part"], r["d"], r["causal"], r["n"], r["impl"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    print("\npart  d  causal  n  impl  best TFLOP/s  config")
    for key in sorted(best, key=str):
        r = best[key]
        print(*key, f"{r['tflops']:.0f}", r.get("config", ""))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["fwd", "bwd", "ws-check"], required=True)
    p.add_argument("--rep", type=int, default=60)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    try:
        {"fwd": part_fwd, "bwd": part_bwd, "ws-check": part_ws_check}[args.part](rows, args.rep)
    finally:
        summary(rows)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
