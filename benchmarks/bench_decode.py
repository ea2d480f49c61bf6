"""Decode-step attention: a few new queries (1-16) against a long KV cache, fa_inductor against SDPA.

Usage (from the repository root, with fa_inductor installed or ``PYTHONPATH=.``):

    python benchmarks/bench_decode.py                                   # the grid below, bf16, on CUDA
    python benchmarks/bench_decode.py --device cpu --kv-lens 256 --batches 1 --warmup 1 --rep 3   # smoke run

Each shape is q [B, Hq, Lq, D] and k, v [B, Hkv, Lk, D] (grouped-query, Llama-3.2-1B's 32/8 heads by default),
causal with the diagonal aligned bottom-right (query i is token Lk - Lq + i, as in a decode step with a cache).
Implementations:

  fa_inductor    fa_inductor.scaled_dot_product_attention(..., is_causal=Lq > 1, bottom_right=True, enable_gqa)
  sdpa           torch SDPA as transformers calls it in decode: no mask for one query, else a
                 ``causal_lower_right`` bias; enable_gqa=True; PyTorch picks the backend
  sdpa_flash / sdpa_efficient / sdpa_cudnn   the same, pinned to one backend (an error row where unsupported)

Rows report time, the KV bytes read per second (the bound for decode: ``GB/s``) and ``vs_sdpa`` (time over the
best SDPA time on the same shape).  On CUDA each call is also captured in a CUDA graph and replayed
(``graph_ms``, ``graph_vs_sdpa``): the GPU time without Python and launch overhead, which is how a compiled
decode step runs under ``mode="reduce-overhead"`` (generate's own compile uses CUDA graphs).  Results go to ``<out-dir>/<stem>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from harness import PlotSpec, collect, graph_time_ms, measure, time_ms, write_results

IMPLS = ("fa_inductor", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TABLE_COLUMNS = ("impl", "batch", "q_len", "kv_len", "head_dim", "ms", "gb_s", "vs_sdpa", "graph_ms",
                 "graph_vs_sdpa", "error")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--q-lens", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--kv-lens", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=30)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--stem", default="decode")
    return p.parse_args(argv)


def _call(impl: str, q, k, v):
    lq, lk = q.shape[-2], k.shape[-2]
    if impl == "fa_inductor":
        import fa_inductor

        return lambda: fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=lq > 1, bottom_right=True,
                                                                 enable_gqa=True)
    mask = causal_lower_right(lq, lk) if lq > 1 else None

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    if impl == "sdpa":
        return sdpa

    def pinned():
        with sdpa_kernel(BACKENDS[impl]):
            return sdpa()

    return pinned


def graph_ms(fn, args: argparse.Namespace) -> float | None:
    """Time of ``fn`` captured once in a CUDA graph and replayed (None on CPU)."""
    timing = graph_time_ms(fn, warmup=args.warmup, rep=args.rep, device=args.device)
    return timing["ms"] if timing else None


def bench_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    for d in args.head_dims:
        for batch in args.batches:
            for lk in args.kv_lens:
                k, v = (torch.randn(batch, args.kv_heads, lk, d, device=args.device, dtype=dtype) for _ in range(2))
                for lq in args.q_lens:
                    q = torch.randn(batch, args.heads, lq, d, device=args.device, dtype=dtype)
                    kv_bytes = 2 * k.numel() * k.element_size()
                    for impl in args.impls:
                        base = {"impl": impl, "dtype": args.dtype, "batch": batch, "q_len": lq, "kv_len": lk,
                                "head_dim": d, "heads": args.heads, "kv_heads": args.kv_heads}
                        fn = _call(impl, q, k, v)
                        timing, error = measure(f"{impl} B={batch} Lq={lq} Lk={lk} D={d}", lambda: (
                            fn(), time_ms(fn, warmup=args.warmup, rep=args.rep, device=args.device))[1])
                        gb_s = kv_bytes / (timing["ms"] * 1e6) if timing else None
                        graph = None
                        if timing:
                            graph, graph_error = measure(f"{impl} graph", lambda: graph_ms(fn, args))
                            error = error or graph_error
                        yield {**base, **(timing or {}), "gb_s": gb_s, "graph_ms": graph, "error": error}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    key = ("batch", "q_len", "kv_len", "head_dim")
    for time, ratio in (("ms", "vs_sdpa"), ("graph_ms", "graph_vs_sdpa")):
        best: dict[tuple, float] = {}
        for r in rows:
            if r["impl"].startswith("sdpa") and r.get(time):
                k = tuple(r[c] for c in key)
                best[k] = min(best.get(k, float("inf")), r[time])
        for r in rows:
            other = best.get(tuple(r[c] for c in key))
            if r.get(time) and other:
                r[ratio] = r[time] / other


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = collect(bench_rows(args))
    add_ratios(rows)
    spec = PlotSpec(x="kv_len", y="ms", ylabel="ms", xlabel="KV length", panels=("head_dim", "batch", "q_len"))
    write_results(rows, args.out_dir, args.stem, f"Decode attention ({args.heads}/{args.kv_heads} heads)", spec,
                  table_columns=TABLE_COLUMNS, extra={"args": vars(args)})


if __name__ == "__main__":
    main()
