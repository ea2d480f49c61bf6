"""Compare fa_inductor's attention with PyTorch's SDPA backends, FlexAttention and a compiled naive attention.

Usage (from the repository root, with fa_inductor installed, e.g. ``pip install -e .``, or ``PYTHONPATH=.``):

    python benchmarks/bench_attention.py                        # full grid, writes benchmarks/results/
    python benchmarks/bench_attention.py --head-dims 128 --causal yes --seqlens 1024 4096 --compare
    python benchmarks/bench_attention.py --head-dims 64 128 --seqlens 4096 16384 --compare --rounds 3
    python benchmarks/bench_attention.py --device cpu --dtype fp16 --head-dims 64 --seqlens 128 \\
        --tokens 256 --impls naive_inductor sdpa_efficient --modes fwd --warmup 1 --rep 3   # smoke run

Shapes: q, k, v are (B, H, L, D) with B = max(1, tokens // L) and H = model_dim // D, so every point does
about the same amount of work. Each (shape, implementation) gives one row per mode:
  fwd      forward under no_grad
  bwd      backward only (one forward with grad, then ``out.backward(grad, retain_graph=True)``)
  fwd_bwd  forward and backward together; ``peak_mib`` is the peak memory above the inputs
A failing implementation (no kernel for this shape, out of memory, package not importable) gives a row
with ``error`` set; the run carries on.  ``--rounds N`` times the implementations of a shape in N interleaved
rounds and reports medians over the rounds (``round_ms`` holds each round's time), so that a drift of the GPU's
clocks does not land on one implementation only. Results go to ``<out-dir>/<stem>.{json,md,png}``; with
``--compare`` the fa_inductor/peer TFLOP/s ratios also go to ``<stem>_compare.md`` (they are always
in the JSON under ``compare``).  ``--graph`` also times each forward (fwd mode) captured in a CUDA graph and
replayed (``graph_ms``): the GPU's time alone, for shapes whose eager calls the host may time (an eager
fa_inductor forward costs the host 0.2-0.6 ms, SDPA's about 0.03 ms); its ratios go to
``<stem>_graph_compare.md`` and to the JSON under ``graph_compare``.  ``--clocks`` samples the GPU's SM
clock and power with ``nvidia-smi`` during the run and gives each row the median clock and mean power of its
timings (``mhz``, ``watts``; per round ``round_mhz``, ``round_watts``): an H100 at its power cap slows every
kernel by lowering its clock, which this tells apart from a slower kernel.

``bench_masks.py`` builds on this script's pieces (inputs, timed steps, SDPA/Flex callers, comparisons,
command-line options) for causal, sliding-window, key-padding and block-sparse attention.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness import (
    ClockLog,
    PlotSpec,
    Skipped,
    attention_flops,
    collect,
    free_memory,
    graph_time_ms,
    markdown_table,
    measure,
    peak_memory_mib,
    tflops,
    time_ms,
    write_plot,
    write_results,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}
MODES = ("fwd", "bwd", "fwd_bwd")
REFERENCE = "fa_inductor"
# naive_inductor materialises B·H·L·L scores; beyond this many bytes (at 2 bytes each) it is skipped.
NAIVE_SCORES_LIMIT_BYTES = 8 * 2**30
TABLE_COLUMNS = (
    "impl", "dtype", "batch", "heads", "seqlen", "head_dim", "causal", "mode", "ms", "tflops", "graph_ms",
    "peak_mib", "error",
)  # fmt: skip

Tensor = torch.Tensor
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Shape:
    dtype: str
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal, mode)

    def __str__(self) -> str:
        causal = "causal" if self.causal else "full"
        return f"{self.dtype} B={self.batch} H={self.heads} L={self.seqlen} D={self.head_dim} {causal}"


SHAPE_KEYS = tuple(f.name for f in fields(Shape))


# --------------------------------------------------------------------------------------------------
# Implementations: each maps (shape, device) to attention(q, k, v), or raises Skipped.
# Per-shape setup (block masks, size checks) happens here, outside the timed region.


def _fa_inductor(shape: Shape, device: str) -> AttentionFn:
    import fa_inductor  # lazy: the other implementations still run when the package is broken

    return functools.partial(fa_inductor.scaled_dot_product_attention, is_causal=shape.causal)


def sdpa_attention(backend: SDPBackend, **kwargs: Any) -> AttentionFn:
    """torch's SDPA restricted to ``backend``, called with ``kwargs`` (``is_causal``, ``attn_mask``)."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return attention


def _sdpa(backend: SDPBackend, shape: Shape, device: str) -> AttentionFn:
    return sdpa_attention(backend, is_causal=shape.causal)


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_with(block_mask: Any) -> AttentionFn:
    """Compiled FlexAttention with a prebuilt ``BlockMask`` (None: no mask); the mask is built by the caller,
    outside the timed region."""
    flex = _compiled_flex()
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _flex(shape: Shape, device: str) -> AttentionFn:
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(causal_mask_mod, None, None, shape.seqlen, shape.seqlen, device=device)
    return flex_attention_with(block_mask)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Attention as model code writes it: explicit scores, additive causal mask, fp32 softmax.

    Compiled, this is stock Inductor's answer to such code; note that Inductor's own ``fuse_attention``
    pass may rewrite some forms (seen: the non-causal one under no_grad) into SDPA.
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.full((lq, lk), float("-inf"), device=q.device, dtype=scores.dtype)
        scores = scores + torch.triu(mask, diagonal=1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@functools.cache
def _compiled_naive() -> Callable[..., Tensor]:
    return torch.compile(naive_attention, dynamic=False)


def _naive_inductor(shape: Shape, device: str) -> AttentionFn:
    if shape.batch * shape.heads * shape.seqlen**2 * 2 > NAIVE_SCORES_LIMIT_BYTES:
        raise Skipped("O(L^2) memory")
    return functools.partial(_compiled_naive(), causal=shape.causal)


IMPLS: dict[str, Callable[[Shape, str], AttentionFn]] = {
    "fa_inductor": _fa_inductor,
    "sdpa_flash": functools.partial(_sdpa, SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": functools.partial(_sdpa, SDPBackend.CUDNN_ATTENTION),
    "sdpa_efficient": functools.partial(_sdpa, SDPBackend.EFFICIENT_ATTENTION),
    "flex": _flex,
    "naive_inductor": _naive_inductor,
}


# --------------------------------------------------------------------------------------------------
# Measuring one implementation on one shape


def make_inputs(shape: Shape, device: str, requires_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Random q, k, v of (B, H, L, D) for ``shape`` (its ``causal`` flag plays no part)."""
    size = (shape.batch, shape.heads, shape.seqlen, shape.head_dim)
    dtype = DTYPES[shape.dtype]
    return tuple(
        torch.randn(size, device=device).to(dtype).requires_grad_(requires_grad) for _ in range(3)
    )  # type: ignore[return-value]


def _clear_grads(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _mode_step(attention: AttentionFn, inputs: Sequence[Tensor], mode: str) -> Callable[[], Any]:
    """The callable to time for ``mode``; grads are reset inside so accumulation never costs extra."""
    q, k, v = inputs
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return attention(q, k, v)

    elif mode == "bwd":
        out = attention(q, k, v)
        grad = torch.randn_like(out)

        def step():
            _clear_grads(inputs)
            out.backward(grad, retain_graph=True)

    else:
        grad = torch.randn_like(q)

        def step():
            _clear_grads(inputs)
            attention(q, k, v).backward(grad)

    return step


def run_mode(attention: AttentionFn, inputs: Sequence[Tensor], mode: str, args: argparse.Namespace,
             memory: bool = True) -> dict:
    """Time ``attention`` in ``mode`` (after one untimed call) and, with ``memory``, measure its peak memory.
    With ``args.graph`` (``--graph``) a forward is also timed as a CUDA graph replay (``graph_ms``)."""
    step = _mode_step(attention, inputs, mode)
    step()  # compile and autotune outside the timed region
    start = time.time()
    timing = time_ms(step, warmup=args.warmup, rep=args.rep, device=args.device)
    timing["span"] = (start, time.time())  # when it was timed, for --clocks
    _clear_grads(inputs)
    graph = None
    if getattr(args, "graph", False) and mode == "fwd":
        # A call that cannot be captured loses its graph time only (the error is printed), not its row.
        graph, _ = measure("CUDA graph", lambda: graph_time_ms(step, warmup=args.warmup, rep=args.rep,
                                                               device=args.device))
    return {**timing, "graph_ms": graph["ms"] if graph else None,
            "peak_mib": peak_memory_mib(step, device=args.device) if memory else None}


def _row(impl: str, shape: Shape, mode: str, result: dict | None, error: str | None) -> dict[str, Any]:
    result = result or {}
    return {
        "impl": impl,
        **asdict(shape),
        "mode": mode,
        "ms": result.get("ms"),
        "ms_p20": result.get("ms_p20"),
        "ms_p80": result.get("ms_p80"),
        "tflops": tflops(shape.flops(mode), result.get("ms")),
        "graph_ms": result.get("graph_ms"),
        "graph_tflops": tflops(shape.flops(mode), result.get("graph_ms")),
        "peak_mib": result.get("peak_mib"),
        "error": error,
        "spans": [result["span"]] if "span" in result else [],
    }


def measure_modes(
    label: str, build: Callable[[], AttentionFn], inputs: Sequence[Tensor], args: argparse.Namespace
) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(mode, result, error)`` for each of ``args.modes``: ``build`` makes the attention callable once (its
    failure or ``Skipped`` becomes every mode's error), then each mode is timed by ``run_mode``."""
    attention, error = measure(label, build)
    for mode in args.modes:
        if error:
            yield mode, None, error
            continue
        result, mode_error = measure(f"{label} {mode}", lambda: run_mode(attention, inputs, mode, args))
        yield mode, result, mode_error


def _impl_rows(impl: str, shape: Shape, inputs: Sequence[Tensor], args: argparse.Namespace) -> Iterator[dict]:
    build = functools.partial(IMPLS[impl], shape, args.device)
    for mode, result, error in measure_modes(f"{impl} {shape}", build, inputs, args):
        yield _row(impl, shape, mode, result, error)


def _shapes(args: argparse.Namespace) -> Iterator[Shape]:
    for dtype, head_dim, causal, seqlen in itertools.product(
        args.dtype, args.head_dims, CAUSAL[args.causal], args.seqlens
    ):
        yield Shape(dtype, max(1, args.tokens // seqlen), args.model_dim // head_dim, seqlen, head_dim, causal)


def _interleaved_rows(shape: Shape, inputs: Sequence[Tensor], args: argparse.Namespace) -> Iterator[dict]:
    """``args.rounds`` rounds over every (implementation, mode) of ``shape``, each timed once per round; a row
    reports the median over rounds of each quantile, so that a drift of the GPU's clocks during the run falls on
    every implementation alike instead of on whichever was timed at the wrong moment.  ``round_ms`` keeps each
    round's median; the peak memory comes from the first round."""
    built = {impl: measure(f"{impl} {shape}", functools.partial(IMPLS[impl], shape, args.device))
             for impl in args.impls}
    # A failed build fails every mode of its implementation; a failed timing drops that mode from later rounds.
    errors = {(impl, mode): error for impl, (_, error) in built.items() if error for mode in args.modes}
    results: dict[tuple[str, str], list[dict]] = {(impl, mode): [] for impl in args.impls for mode in args.modes}
    for first in [True] + [False] * (args.rounds - 1):
        for impl in args.impls:
            attention = built[impl][0]
            for mode in args.modes:
                if (impl, mode) in errors:
                    continue
                result, error = measure(f"{impl} {shape} {mode}",
                                        lambda: run_mode(attention, inputs, mode, args, memory=first))
                if error:
                    errors[(impl, mode)] = error
                else:
                    results[(impl, mode)].append(result)
            free_memory()
    for impl in args.impls:
        for mode in args.modes:
            done = results[(impl, mode)]
            if (impl, mode) in errors:
                yield _row(impl, shape, mode, None, errors[(impl, mode)])
                continue
            combined = {key: statistics.median(r[key] for r in done) for key in ("ms", "ms_p20", "ms_p80")}
            graphs = [r["graph_ms"] for r in done if r.get("graph_ms") is not None]
            combined["graph_ms"] = statistics.median(graphs) if graphs else None
            combined["peak_mib"] = done[0]["peak_mib"]
            yield {**_row(impl, shape, mode, combined, None), "round_ms": [r["ms"] for r in done],
                   "spans": [r["span"] for r in done]}


def add_clocks(rows: Sequence[dict], clocks: ClockLog) -> None:
    """Give each timed row the GPU's median SM clock and mean power while it was timed (``round_mhz`` /
    ``round_watts`` per round, ``mhz`` / ``watts`` their medians), from ``clocks``' samples."""
    for row in rows:
        during = [clocks.during(*span) for span in row.get("spans", [])]
        if not during or None in during:
            continue
        row["round_mhz"] = [d["mhz"] for d in during]
        row["round_watts"] = [round(d["watts"], 1) for d in during]
        row["mhz"] = statistics.median(row["round_mhz"])
        row["watts"] = statistics.median(row["round_watts"])


def bench_rows(args: argparse.Namespace) -> Iterator[dict]:
    """One row per (shape, implementation, mode); inputs are shared by the implementations of a shape.  With
    ``args.rounds`` > 1 the implementations of a shape are timed in interleaved rounds (``_interleaved_rows``)."""
    requires_grad = any(mode != "fwd" for mode in args.modes)
    for shape in _shapes(args):
        inputs = make_inputs(shape, args.device, requires_grad)
        if args.rounds > 1:
            yield from _interleaved_rows(shape, inputs, args)
        else:
            for impl in args.impls:
                yield from _impl_rows(impl, shape, inputs, args)
                free_memory()
        del inputs
        free_memory()


# --------------------------------------------------------------------------------------------------
# fa_inductor against its peers


COMPARE_KEYS = (*SHAPE_KEYS, "mode")
COMPARE_ORDER = ("dtype", "head_dim", "causal", "mode", "seqlen")


def compare_rows(
    rows: Sequence[dict],
    reference: str = REFERENCE,
    keys: Sequence[str] = COMPARE_KEYS,
    order: Sequence[str] = COMPARE_ORDER,
    value: str = "tflops",
) -> list[dict]:
    """Per case (the values of ``keys``): ``reference`` TFLOP/s divided by each peer's (None where either
    failed), sorted by the ``order`` keys (``mode`` in ``MODES`` order), otherwise in order of appearance.
    ``value`` names the throughput column (``graph_tflops``: the CUDA-graph times); rows without it are skipped."""
    throughput: dict[tuple, dict[str, float | None]] = {}
    for row in rows:
        if value == "tflops" or row.get(value) is not None:
            throughput.setdefault(tuple(row[k] for k in keys), {})[row["impl"]] = row[value]
    peers = [impl for impl in dict.fromkeys(row["impl"] for row in rows) if impl != reference]
    compared = []
    for key, by_impl in throughput.items():
        if reference not in by_impl:
            continue
        ours = by_impl[reference]
        ratios = {f"vs_{p}": ours / by_impl[p] if ours and by_impl.get(p) else None for p in peers}
        compared.append({**dict(zip(keys, key)), **ratios})
    compared.sort(key=lambda r: tuple(MODES.index(r[k]) if k == "mode" else r[k] for k in order))
    return compared


def _compare_table(compared: Sequence[dict], columns: Sequence[str]) -> str:
    columns = [*columns, *(k for k in compared[0] if k.startswith("vs_"))]
    shown = [{k: f"{v:.2f}x" if isinstance(v, float) else v for k, v in row.items()} for row in compared]
    return markdown_table(shown, columns)


def write_compare(compared: Sequence[dict], out_dir: Path, stem: str, columns: Sequence[str] = COMPARE_ORDER,
                  what: str = "") -> None:
    """Print the ``compare_rows`` table (``columns``, then the ratios), write ``<stem>_compare.md`` and plot
    the ratios against sequence length, one line per peer, in ``<stem>_compare.png``.  ``what`` qualifies the
    times in the titles (e.g. "CUDA-graph")."""
    if not compared:
        print(f"--compare: no {REFERENCE} rows to compare", file=sys.stderr)
        return
    table = _compare_table(compared, columns)
    path = out_dir / f"{stem}_compare.md"
    kind = f"{what} " if what else ""
    path.write_text(f"# {REFERENCE} {kind}TFLOP/s relative to peers (>1 means {REFERENCE} is faster)\n\n"
                    f"{table}\n")
    print(f"\n{REFERENCE} {kind}TFLOP/s / peer {kind}TFLOP/s\n\n{table}\n\nwrote {path}")
    long_rows = [{**{k: v for k, v in row.items() if not k.startswith("vs_")}, "peer": k[3:], "ratio": v}
                 for row in compared for k, v in row.items() if k.startswith("vs_")]
    spec = PlotSpec(y="ratio", series="peer", ylabel=f"{REFERENCE} / peer {kind}TFLOP/s", reference_line=1.0,
                    panels=tuple(k for k in columns if k != "seqlen"))
    plot = out_dir / f"{stem}_compare.png"
    if write_plot(long_rows, plot, f"{REFERENCE} relative to peers{f' ({what} times)' if what else ''} (above 1: "
                  "faster)", spec):
        print(f"wrote {plot}")


# --------------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(
    p: argparse.ArgumentParser, impls: Sequence[str], *, head_dims: Sequence[int], seqlens: Sequence[int]
) -> None:
    """The options every attention benchmark shares: shapes, implementations, modes, timing, output."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16"])
    p.add_argument("--head-dims", nargs="+", type=int, default=list(head_dims))
    p.add_argument("--seqlens", nargs="+", type=int, default=list(seqlens))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch; batch = max(1, tokens // seqlen)")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--impls", nargs="+", choices=list(impls), default=list(impls))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms (do_bench)")
    p.add_argument("--rep", type=int, default=100, help="timed repetitions per measurement, ms (do_bench)")
    p.add_argument("--device", default=default_device, help=f"default: {default_device}")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", help="output file stem (default: <benchmark>_<UTC timestamp>)")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace, stem_prefix: str) -> None:
    """Reject impossible shapes or devices (``p.error`` exits) and fill in the default ``--stem``."""
    if any(d <= 0 or args.model_dim // d == 0 for d in args.head_dims):
        p.error("every head dim must be positive and at most --model-dim")
    if any(length <= 0 for length in args.seqlens):
        p.error("every sequence length must be positive")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    args.stem = args.stem or f"{stem_prefix}_{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def warn_if_missing(impls: Sequence[str]) -> None:
    """Say so up front when fa_inductor rows are asked for but the package cannot be imported."""
    if any(impl.startswith(REFERENCE) for impl in impls) and importlib.util.find_spec(REFERENCE) is None:
        print(f"warning: {REFERENCE} is not importable; install it or set PYTHONPATH=.", file=sys.stderr)


@contextmanager
def benchmark_context():
    """Seeded, with torch settings for benchmarking many shapes in one process.

    Every shape and grad mode compiles its own graph (dynamic=False), so the recompile limits are lifted;
    bwd mode calls backward with retain_graph=True, which donated buffers forbid.
    """
    torch.manual_seed(0)
    with (
        torch._dynamo.config.patch(recompile_limit=4096, accumulated_recompile_limit=4096),
        torch._functorch.config.patch(donated_buffer=False),
    ):
        yield


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line arguments as JSON-ready values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, list(IMPLS), head_dims=(64, 128, 256), seqlens=(512, 1024, 2048, 4096, 8192, 16384))
    p.add_argument("--causal", choices=list(CAUSAL), default="both")
    p.add_argument("--compare", action="store_true", help=f"print and write {REFERENCE}/peer TFLOP/s ratios")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every implementation of a shape this many times, interleaved, and report medians")
    p.add_argument("--graph", action="store_true",
                   help="also time each forward as a CUDA graph replay (the GPU's time without the host's)")
    p.add_argument("--clocks", action="store_true",
                   help="sample the GPU's SM clock and power (nvidia-smi) and give each row those of its timing")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    check_common_args(p, args, "attention")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warn_if_missing(args.impls)
    with benchmark_context(), ClockLog(enabled=args.clocks) as clocks:
        rows = collect(bench_rows(args))
    add_clocks(rows, clocks)
    compared = compare_rows(rows)
    graph_compared = compare_rows(rows, value="graph_tflops") if args.graph else []
    extra = {"args": args_record(args), "compare": compared, "graph_compare": graph_compared}
    title = "Attention: " + ", ".join(args.impls)
    columns = TABLE_COLUMNS + (("mhz", "watts") if clocks.samples else ())
    write_results(rows, args.out_dir, args.stem, title, PlotSpec(), table_columns=columns, extra=extra)
    if args.compare:
        write_compare(compared, args.out_dir, args.stem)
        if graph_compared:
            write_compare(graph_compared, args.out_dir, f"{args.stem}_graph", what="CUDA-graph")


if __name__ == "__main__":
    main()
