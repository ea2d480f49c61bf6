"""Autotuning: the shipped table against an exhaustive search, tuned against model configs, compile times.

Usage (repository root, fa_inductor installed or ``PYTHONPATH=.``; needs a CUDA GPU):

    python benchmarks/bench_autotune.py --head-dims 64 128 256 --seqlens 4096 16384 --jobs 15
    python benchmarks/bench_autotune.py --compile-time-only        # cold / warm first step of the demo model

For each benchmark shape (bf16, B x L = ``--tokens`` tokens, ``--heads`` heads, head dim D, causal or not) and
each kernel (``fwd``; the backward's ``bwd_kv`` and ``bwd_q`` passes, timed one at a time) it times every
candidate the generator keeps for this GPU (the exhaustive search of the generated space, compiled first in
``--jobs`` processes) and reports three configs: ``exhaustive_best``, ``shipped`` (what the shipped table gives
for the shape: ``autotune.table_lookup``) and ``model`` (the resource model's pick: what a GPU without a table
and with tuning switched off would run).  ``vs_best`` is best time / config time (target: shipped >= 0.95).
``--passes N`` re-times the contenders N - 1 more times and takes each config's median; every timing is kept in
the JSON's ``samples``.
TFLOP/s count 2 matmuls of 2*M*N*D for the forward, 4 for the dK/dV pass and 3 for the dQ pass (half causal).

``--compile-time`` (on by default) runs the demo model's first training step (``fa-inductor demo``'s model, CUDA
size) in fresh processes with empty Inductor, Triton and fa_inductor caches (cold), then again with the caches
they left (warm), for default Inductor and for fa_inductor.  Results: ``<out-dir>/<stem>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness import PlotSpec, collect, environment, markdown_table, write_results

COLUMNS = ("impl", "mode", "head_dim", "causal", "seqlen", "config", "ms", "tflops", "vs_best", "candidates")
MATMULS = {"fwd": 2, "bwd_kv": 4, "bwd_q": 3}

_FIRST_STEP = r"""
import json, sys, time, torch
from fa_inductor.demo import DemoConfig, TinyDecoder, _train_step
cfg = DemoConfig(layers=6, dim=1024, heads=16, kv_heads=4, seq_len=4096, batch=2)
torch.manual_seed(0)
model = TinyDecoder(cfg).to("cuda", torch.bfloat16)
tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), device="cuda")
compiled = torch.compile(model, backend=sys.argv[1])
torch.cuda.synchronize()
start = time.perf_counter()
_train_step(compiled, tokens)
torch.cuda.synchronize()
print(json.dumps({"first_step_s": time.perf_counter() - start}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    p.add_argument("--modes", nargs="+", choices=sorted(MATMULS), default=["fwd", "bwd_kv", "bwd_q"])
    p.add_argument("--tokens", type=int, default=16384, help="batch x sequence length")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (grouped-query attention; default: --heads); the dK/dV problems carry "
                        "the group")
    p.add_argument("--jobs", type=int, default=min(15, os.cpu_count() or 1))
    p.add_argument("--rep-ms", type=int, default=25)
    p.add_argument("--passes", type=int, default=1,
                   help="timing passes: the first over every candidate, the others over the contenders; a config's "
                        "time is the median of its timings")
    p.add_argument("--refine-within", type=float, default=0.15,
                   help="contenders re-timed by the later passes: within this fraction of the first pass's best")
    p.add_argument("--compile-time", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-time-only", action="store_true")
    p.add_argument("--write-table", default=None,
                   help="also write the exhaustive search's winners as a shippable table (the sm90 table's source)")
    p.add_argument("--from-json", default=None, help="with --write-table: take the rows of an earlier run's JSON")
    p.add_argument("--table-arch", default="sm90", help="with --from-json: the architecture the run measured")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--stem", default="autotune")
    return p.parse_args(argv)


def _tflops(mode, batch, heads, seqlen, d, causal, ms):
    flops = MATMULS[mode] * 2 * batch * heads * seqlen * seqlen * d * (0.5 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12 if ms else None


def config_rows(args, samples_out: list):
    """The report rows; every candidate's timings (one per pass that timed it) are appended to ``samples_out``."""
    from fa_inductor.kernels import autotune
    from fa_inductor.kernels.arch import current_arch
    from fa_inductor.kernels.configs import candidates, model_choice
    from fa_inductor.tune import _precompile

    device = torch.device("cuda", torch.cuda.current_device())
    arch = current_arch(device.index)
    table = autotune.shipped_table(arch.name)
    causal_values = {"yes": (True,), "no": (False,), "both": (False, True)}[args.causal]
    plans = []
    for d in args.head_dims:
        for causal in causal_values:
            for seqlen in args.seqlens:
                batch = max(1, args.tokens // seqlen)
                for mode in args.modes:
                    problem = autotune.problem_for(mode, torch.bfloat16, d, d, causal, False, seqlen, seqlen,
                                                   group=args.heads // (args.kv_heads or args.heads))
                    plans.append((problem, (batch, args.heads, seqlen, seqlen), candidates(problem, arch)))
    _precompile(args.jobs, [(p, c) for p, _, c in plans], device.index)
    for problem, shape, configs in plans:
        batch, heads, seqlen, _ = shape
        measure = autotune.kernel_timer(problem, device, warmup_ms=5, rep_ms=args.rep_ms, shape=shape,
                                        kv_heads=args.kv_heads)
        # The first pass times every candidate.  A single timing can be off by 5-15 % now and then (clock and
        # power swings), so each later pass (--passes) re-times the contenders again, one after another: those
        # within --refine-within of the first pass's best, and the shipped and model picks.  A config's time is
        # the median of its timings (None if one failed).
        shipped, model = autotune.table_lookup(table, problem, arch), model_choice(problem, arch)
        first = autotune.tune(problem, arch, measure, configs=configs)["timings"]
        samples = {c: [ms] for c, ms, _ in first}
        first_best = min((ms for _, ms, _ in first if ms is not None), default=None)
        contenders = [c for c, ms, _ in first
                      if c in (shipped, model) or (ms is not None and ms <= first_best * (1 + args.refine_within))]
        for _ in range(args.passes - 1):
            for c, ms, _ in autotune.tune(problem, arch, measure, configs=contenders)["timings"]:
                samples[c].append(ms)
        times = {c: (statistics.median(ms) if None not in ms else None) for c, ms in samples.items()}
        best = min((c for c, ms in times.items() if ms is not None), key=times.get, default=None)
        best_ms = times[best] if best is not None else None
        samples_out += [{"mode": problem.direction, "head_dim": problem.head_d, "causal": problem.causal,
                         "seqlen": seqlen, "config": str(c), "ms": ms} for c, ms in samples.items()]
        picks = {"exhaustive_best": best, "shipped": shipped, "model": model}
        for impl, cfg in picks.items():
            if cfg is None:
                yield {"impl": impl, "mode": problem.direction, "head_dim": problem.head_d, "causal": problem.causal,
                       "seqlen": seqlen, "error": "no entry"}
                continue
            ms = times.get(cfg)
            if ms is None:  # outside the generated space (cannot happen for shipped/model picks, kept honest)
                ms = measure(cfg)
            yield {"impl": impl, "mode": problem.direction, "head_dim": problem.head_d, "causal": problem.causal,
                   "seqlen": seqlen, "config": str(cfg), "ms": ms,
                   "tflops": _tflops(problem.direction, batch, heads, seqlen, problem.head_d, problem.causal, ms),
                   "vs_best": best_ms / ms if best_ms else None, "candidates": len(configs)}


def write_table(rows, path: str, source: dict) -> None:
    """The ``exhaustive_best`` config of every measured (head dim, causal, length, kernel) as a table file; entries
    already in the file at ``path`` for other problems are kept."""
    from fa_inductor.kernels import autotune
    from fa_inductor.kernels.configs import KernelConfig, Problem

    entries = []
    for row in rows:
        if row.get("impl") != "exhaustive_best" or "config" not in row:
            continue
        problem = autotune.problem_for(row["mode"], torch.bfloat16, row["head_dim"], row["head_dim"], row["causal"],
                                       False, row["seqlen"], row["seqlen"])
        m, n, w, s = (int(part[1:]) for part in row["config"].split("/"))
        entries.append({"key": problem.__dict__, "config": KernelConfig(m, n, w, s).as_list(), "ms": row["ms"]})
    # Entries of the file already at ``path`` that this run did not measure (other kernel classes, such as the
    # grouped-query dK/dV one) are kept as they were.
    measured = {Problem(**e["key"]) for e in entries}
    if Path(path).exists():
        entries += [e for e in json.loads(Path(path).read_text())["entries"] if Problem(**e["key"]) not in measured]
    payload = {"arch": source["arch"], "gpu": source.get("gpu"), "measured": True,
               "source": "benchmarks/bench_autotune.py exhaustive search, bf16, B x L = 16k tokens, 16 heads",
               "torch": source.get("torch"), "triton": source.get("triton"), "created": source.get("timestamp"),
               "entries": entries}
    autotune.write_atomic(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path} ({len(entries)} entries)")


def compile_rows():
    for backend in ("inductor", "fa_inductor"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "TRITON_CACHE_DIR": f"{tmp}/triton",
                   "FA_INDUCTOR_CACHE_DIR": f"{tmp}/fa"}
            for state in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", _FIRST_STEP, backend], env=env, capture_output=True,
                                     text=True)
                row = {"impl": backend, "mode": f"first_step_{state}"}
                if out.returncode != 0:
                    row["error"] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
                else:
                    row["seconds"] = json.loads(out.stdout.strip().splitlines()[-1])["first_step_s"]
                print(row, flush=True)
                yield row


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        env = data["environment"]
        write_table(data["rows"], args.write_table, {**env, "arch": args.table_arch})
        return
    samples = []
    rows = [] if args.compile_time_only else collect(config_rows(args, samples))
    compile_times = collect(compile_rows()) if (args.compile_time or args.compile_time_only) else []
    summary = {}
    for row in rows:
        if row.get("impl") == "shipped" and "vs_best" in row:
            summary.setdefault("shipped_vs_best_min", row["vs_best"])
            summary["shipped_vs_best_min"] = min(summary["shipped_vs_best_min"], row["vs_best"])
    seconds = {(r["impl"], r["mode"]): r.get("seconds") for r in compile_times}
    if seconds.get(("fa_inductor", "first_step_cold")) and seconds.get(("inductor", "first_step_cold")):
        summary["cold_first_step_added_s"] = (seconds[("fa_inductor", "first_step_cold")]
                                              - seconds[("inductor", "first_step_cold")])
    if args.write_table and rows:
        from fa_inductor.kernels.arch import current_arch

        write_table(rows, args.write_table, {**environment(), "arch": current_arch().name})
    write_results(rows, args.out_dir, args.stem, "Kernel configs: shipped table, exhaustive search, model pick",
                  PlotSpec(series="impl", panels=("head_dim", "causal", "mode")), table_columns=COLUMNS,
                  extra={"compile_times": compile_times, "summary": summary, "samples": samples})
    if compile_times:
        print(markdown_table(compile_times, ("impl", "mode", "seconds", "error")))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
