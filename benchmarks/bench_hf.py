"""A Hugging Face Llama-style model end to end: prefill, training step, peak memory and decode speed for the
uncompiled eager and sdpa models, default ``torch.compile`` and ``torch.compile(backend="fa_inductor")``.

Usage (from the repository root, with fa_inductor installed or ``PYTHONPATH=.``; transformers required):

    # the acceptance run (H100, bf16): Llama-3.2-1B-shaped, random weights, batch 1
    python benchmarks/bench_hf.py --seqlens 4096 16384 --stem hf_llama1b
    python benchmarks/bench_hf.py --device cpu --layers 2 --hidden 128 --heads 4 --kv-heads 2 --vocab 512 \\
        --seqlens 64 --decode-context 64 --decode-tokens 4 --warmup 1 --rep 3        # smoke run

The model is ``LlamaForCausalLM`` from a config (default: 16 layers, hidden 2048, 32 heads, 8 KV heads, head dim
64, MLP 8192, vocabulary 128256, tied embeddings: about 1.2B parameters), random weights, built directly on the
device in the benchmark dtype.  Implementations (``--impls``):

  eager          attn_implementation="eager", uncompiled
  sdpa           attn_implementation="sdpa", uncompiled (transformers hands SDPA is_causal=True, no mask)
  compile        the sdpa model under default ``torch.compile`` (the causal mask is built inside the graph)
  fa_inductor    the sdpa model under ``torch.compile(backend="fa_inductor")``

Modes, each timed with the harness (median of repeated runs, CUDA events through ``do_bench``):

  prefill   ``model(ids)`` under ``torch.no_grad()``: logits for a batch of ``--batch`` x L random tokens
  train     one training step: ``model(ids, labels=ids).loss.backward()`` (gradients set to None between steps;
            no optimizer, whose cost does not depend on the attention)
  decode    greedy decoding with a dynamic KV cache after a ``--decode-context`` token prompt: the prompt is
            prefilled untimed, then ``--decode-tokens`` steps (the model on the last token and the cache, argmax)
            are timed together; ms per step (median of ``--decode-reps`` runs) and tokens/s.  Compiled rows
            compile the model with dynamic shapes, so the growing cache does not recompile.

``peak_mib`` is the peak CUDA memory of one call above what the model and its inputs hold.  Compiled variants
compile each (mode, L) once outside the timed region (``compile_s`` is that first call's wall time).  Ratios
``vs_sdpa`` and ``vs_compile`` divide the row's time by the same mode's sdpa and compile times; the issue's
targets (fa_inductor at 16k: at least 1.5x faster than compile, no slower than sdpa, peak memory no higher than
either, prefill and train; at 4k never slower than either) are checked and reported in ``<stem>_targets.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from harness import PlotSpec, collect, free_memory, markdown_table, measure, peak_memory_mib, time_ms, write_results

IMPLS = ("eager", "sdpa", "compile", "fa_inductor")
MODES = ("prefill", "train", "decode")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TABLE_COLUMNS = ("impl", "mode", "seqlen", "ms", "tokens_per_s", "vs_sdpa", "vs_compile", "peak_mib", "compile_s",
                 "replaced", "error")
TARGET_COLUMNS = ("mode", "seqlen", "check", "value", "target", "met")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seqlens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--decode-context", type=int, nargs="+", default=[4096],
                   help="prompt lengths for the decode mode")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--decode-reps", type=int, default=5, help="timed decode runs (the median is reported)")
    p.add_argument("--eager-max-seqlen", type=int, default=8192,
                   help="skip the eager implementation above this length (its L x L weights do not fit)")
    p.add_argument("--warmup", type=int, default=3, help="do_bench warmup (ms on CUDA, calls on CPU)")
    p.add_argument("--rep", type=int, default=20, help="do_bench measurement (ms on CUDA, calls on CPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run one step of each prefill/train row under torch.profiler and print its N most "
                        "expensive GPU kernels (total time per kernel name)")
    p.add_argument("--two-pass-grouped", action="store_true",
                   help="keep attention with grouped query heads on the two-pass backward instead of the one-pass "
                        "Hopper kernel (fa_inductor.kernels.op.ONE_PASS_GROUPED = False), for A/B runs on the model")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--stem", default="hf_llama")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, impl: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(131072, 2 * max(args.seqlens)),
        rope_theta=500000.0, tie_word_embeddings=True,
        attn_implementation="eager" if impl == "eager" else "sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(args.device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _compiled(model, impl: str, dynamic: bool | None = None):
    """The callable a mode runs: the model itself, or ``model.forward`` under torch.compile."""
    if impl in ("eager", "sdpa"):
        return model
    torch._dynamo.reset()
    backend = "fa_inductor" if impl == "fa_inductor" else "inductor"
    return torch.compile(model, backend=backend, dynamic=dynamic)


def _replaced() -> int:
    from torch._dynamo.utils import counters

    return int(counters["fa_inductor"]["replaced"])


def _first_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_rows(args, model, impl: str, mode: str, seqlen: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    ids = torch.randint(0, args.vocab, (args.batch, seqlen), device=args.device)
    counters.clear()
    run = _compiled(model, impl)
    if mode == "prefill":
        model.eval()

        def step():
            with torch.no_grad():
                return run(ids).logits
    else:
        model.train()

        def step():
            for p in model.parameters():
                p.grad = None
            run(ids, labels=ids).loss.backward()

    compile_s = _first_call(step) if impl in ("compile", "fa_inductor") else None
    timing = time_ms(step, warmup=args.warmup, rep=args.rep, device=args.device)
    peak = peak_memory_mib(step, device=args.device)
    if args.profile:
        print_profile(step, f"{impl} {mode} L={seqlen}", args.profile)
    for p in model.parameters():
        p.grad = None
    return {**timing, "peak_mib": peak, "compile_s": compile_s,
            "replaced": _replaced() if impl == "fa_inductor" else None}


def print_profile(step: Callable[[], Any], title: str, top: int) -> None:
    """One ``step`` under torch.profiler: its ``top`` GPU kernels by total time (CPU operators on a CPU run),
    and the sum over all of them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    print(f"--- {title}: {'GPU kernels' if cuda else 'CPU operators'} {sum(map(self_us, events)) / 1e3:.1f} ms "
          "in all", flush=True)
    for e in sorted(events, key=self_us, reverse=True)[:top]:
        print(f"{self_us(e) / 1e3:9.2f} ms {e.count:5d}x  {e.key[:110]}", flush=True)


def _decode_row(args, model, impl: str, context: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    model.eval()
    counters.clear()
    run = _compiled(model, impl, dynamic=True)
    ids = torch.randint(0, args.vocab, (args.batch, context), device=args.device)
    steps = args.decode_tokens

    def decode() -> float:
        """Prefill (untimed), then ``steps`` greedy decode steps with the KV cache: seconds per step."""
        with torch.no_grad():
            out = run(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                out = run(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / steps

    compile_s = _first_call(decode)
    decode()
    reps = max(3, args.decode_reps)
    per_token = sorted(decode() for _ in range(reps))[reps // 2] * 1e3
    return {"ms": per_token, "tokens_per_s": 1e3 * args.batch / per_token,
            "compile_s": compile_s if impl in ("compile", "fa_inductor") else None,
            "replaced": _replaced() if impl == "fa_inductor" else None}


def bench_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for impl in args.impls:
        model = None
        try:
            model, error = measure(f"build {impl}", lambda: build_model(args, impl))
            for mode in args.modes:
                lengths = args.decode_context if mode == "decode" else args.seqlens
                for seqlen in lengths:
                    base = {"impl": impl, "mode": mode, "seqlen": seqlen, "dtype": args.dtype, "batch": args.batch}
                    if model is None:
                        yield {**base, "error": error}
                        continue
                    if impl == "eager" and seqlen > args.eager_max_seqlen and mode != "decode":
                        yield {**base, "error": f"skipped: eager above --eager-max-seqlen {args.eager_max_seqlen}"}
                        continue
                    name = f"{impl} {mode} L={seqlen}"
                    if mode == "decode":
                        result, row_error = measure(name, lambda: _decode_row(args, model, impl, seqlen))
                    else:
                        result, row_error = measure(name, lambda: _step_rows(args, model, impl, mode, seqlen))
                    yield {**base, **(result or {}), "error": row_error}
                    free_memory()
        finally:
            del model
            torch._dynamo.reset()
            free_memory()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    times = {(r["impl"], r["mode"], r["seqlen"]): r.get("ms") for r in rows}
    for row in rows:
        for peer in ("sdpa", "compile"):
            other = times.get((peer, row["mode"], row["seqlen"]))
            if row.get("ms") and other:
                row[f"vs_{peer}"] = row["ms"] / other


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance checks for fa_inductor, where the rows they need exist."""
    by = {(r["impl"], r["mode"], r["seqlen"]): r for r in rows}
    checks = []
    for (impl, mode, seqlen), row in by.items():
        if impl != "fa_inductor" or mode == "decode" or row.get("ms") is None:
            continue
        long = seqlen >= 16384
        for peer in ("compile", "sdpa"):
            other = by.get((peer, mode, seqlen))
            if not other or other.get("ms") is None:
                continue
            speedup = other["ms"] / row["ms"]
            need = 1.5 if long and peer == "compile" else 1.0
            checks.append({"mode": mode, "seqlen": seqlen, "check": f"speedup over {peer}", "value": speedup,
                           "target": f">= {need}", "met": speedup >= need})
            if long and row.get("peak_mib") is not None and other.get("peak_mib") is not None:
                ratio = row["peak_mib"] / other["peak_mib"]
                checks.append({"mode": mode, "seqlen": seqlen, "check": f"peak memory / {peer}", "value": ratio,
                               "target": "<= 1.0", "met": ratio <= 1.0})
    return checks


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_hf.py needs transformers (pip install 'fa_inductor[hf]')")
    from fa_inductor.kernels import op

    saved = op.ONE_PASS_GROUPED
    op.ONE_PASS_GROUPED = saved and not args.two_pass_grouped
    try:
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            rows = collect(bench_rows(args))
    finally:
        op.ONE_PASS_GROUPED = saved
    add_ratios(rows)
    targets = target_rows(rows)
    extra = {"args": vars(args), "targets": targets}
    title = f"Llama-style model ({args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads)"
    spec = PlotSpec(y="ms", ylabel="ms", panels=("mode",))
    write_results(rows, args.out_dir, args.stem, title, spec, table_columns=TABLE_COLUMNS, extra=extra)
    if targets:
        table = markdown_table(targets, TARGET_COLUMNS)
        print(table)
        Path(args.out_dir, f"{args.stem}_targets.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
