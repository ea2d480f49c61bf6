"""``fa-inductor tune``: tune kernel configs ahead of time, for shapes on the command line or from a model.

Problems come from ``--head-dims`` x ``--seqlens`` x ``--causal`` x ``--directions``, or from the replaced sites
of a model's explain report (``--model package.module:factory``, a function returning ``(model, args)``).  Each
problem's pruned candidates are timed (``--budget`` seconds each, or all of them with ``--exhaustive``), after
compiling them in ``--jobs`` worker processes so that the timing loop only loads binaries.  Results go to the
persistent cache (unless ``--no-cache``), to a shippable table (``--table``) and, with every candidate's time
and the resource model's estimates, to ``--report``.  ``--model-only`` writes the model's picks without a GPU
(how the sm80 table is made; such a table is marked ``"measured": false``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["add_arguments", "run_tune", "problems_from_args", "problems_from_model"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096], help="query (and key) lengths")
    p.add_argument("--kv-seqlens", type=int, nargs="+", default=None, help="key lengths (default: --seqlens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    p.add_argument("--bias", action="store_true", help="problems that load a bias or mask tensor")
    p.add_argument("--directions", nargs="+", choices=["fwd", "bwd_kv", "bwd_q"],
                   default=["fwd", "bwd_kv", "bwd_q"])
    p.add_argument("--model", default=None, help="module:function returning (model, args); tune its sites")
    p.add_argument("--arch", default=None, help="architecture (default: the GPU's, or FA_INDUCTOR_ARCH)")
    p.add_argument("--budget", type=float, default=None, help="seconds per problem (default: the env budget)")
    p.add_argument("--exhaustive", action="store_true", help="time every candidate (no budget)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile workers (0: none)")
    p.add_argument("--table", default=None, help="write a shippable table file here")
    p.add_argument("--report", default=None, help="write every candidate's time here (JSON)")
    p.add_argument("--no-cache", action="store_true", help="do not write the persistent cache")
    p.add_argument("--model-only", action="store_true", help="no GPU: the resource model's picks")
    p.add_argument("--rep-ms", type=int, default=25, help="milliseconds of timed runs per candidate")


def problems_from_args(args) -> list:
    from .kernels.autotune import problem_for

    causal = {"yes": (True,), "no": (False,), "both": (False, True)}[args.causal]
    problems = []
    for d in args.head_dims:
        for m, n in zip(args.seqlens, args.kv_seqlens or args.seqlens):
            for c in causal:
                for direction in args.directions:
                    problems.append(problem_for(direction, DTYPES[args.dtype], d, d, c, args.bias, m, n))
    return list(dict.fromkeys(problems))


def problems_from_model(spec: str, directions) -> list:
    """Problems of every replaced site of ``module:function``'s model (function returns (model, args))."""
    from . import explain
    from .kernels.autotune import problem_for

    module, _, name = spec.partition(":")
    model, inputs = getattr(importlib.import_module(module), name or "make")()
    report = explain(model, *inputs)
    problems = []
    for site in report.sites:
        s = site.shape
        if not site.replaced or s is None or s["head_d"] is None or s["head_dv"] is None:
            continue
        for direction in directions:
            problems.append(problem_for(direction, s["dtype"], s["head_d"], s["head_dv"], s["causal"], s["bias"],
                                        s["n_queries"], s["n_keys"], s["extras"], s["group"]))
    return list(dict.fromkeys(problems))


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, label: str, ms: Optional[float]) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // max(1, self.total)
        timing = f"{ms:.3f} ms" if ms is not None else "failed"
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:6.1f}s {label} {timing}")
        sys.stderr.write(line[:150].ljust(150))
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _compile_worker(problem_fields: dict, configs: list, device_index: int) -> None:
    """Compile (and run once) each config in a worker process, filling Triton's on-disk cache.  A config that
    fails here fails again, with its message, when the main process times it."""
    import torch

    from .kernels.autotune import kernel_timer
    from .kernels.configs import KernelConfig, Problem

    run = kernel_timer(Problem(**problem_fields), torch.device("cuda", device_index), compile_only=True)
    for values in configs:
        with contextlib.suppress(Exception):
            run(KernelConfig.from_list(values))


def _precompile(jobs: int, work: list, device_index: int) -> None:
    """Compile every (problem, configs) pair in ``jobs`` spawned processes; failures surface again when timed."""
    if jobs <= 0 or not work:
        return
    chunks = []
    step = max(1, -(-sum(len(c) for _, c in work) // (4 * jobs)))  # ~4 chunks per worker balance the load
    for problem, configs in work:
        chunks += [(dataclasses.asdict(problem), [c.as_list() for c in configs[i:i + step]])
                   for i in range(0, len(configs), step)]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_compile_worker, fields, configs, device_index) for fields, configs in chunks]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    print(f"compiled {sum(len(c) for _, c in chunks)} configs in {jobs} workers in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


def run_tune(args) -> dict:
    from .kernels import autotune
    from .kernels.arch import arch_by_name, current_arch
    from .kernels.configs import candidates, model_choice, registers_per_thread, shared_memory_bytes

    problems = problems_from_model(args.model, args.directions) if args.model else problems_from_args(args)
    if not problems:
        raise SystemExit("fa-inductor tune: no problems to tune (the model has no replaced attention site)")
    if args.model_only:
        arch = arch_by_name(args.arch) if args.arch else current_arch()
        device = gpu = None
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("fa-inductor tune: needs a CUDA GPU (or --model-only for the model's picks)")
        if args.arch:
            os.environ["FA_INDUCTOR_ARCH"] = args.arch
        device = torch.device("cuda", torch.cuda.current_device())
        arch, gpu = current_arch(device.index), torch.cuda.get_device_name(device.index)
    budget = None if args.exhaustive else (args.budget if args.budget is not None else autotune._budget())
    cache = None if (args.no_cache or gpu is None) else autotune.default_cache(gpu)
    work = [(p, candidates(p, arch)) for p in problems]
    print(f"fa-inductor tune: {len(problems)} problems on {gpu or arch.name} ({arch.name}), "
          f"{sum(len(c) for _, c in work)} candidates", file=sys.stderr)
    if device is not None:
        _precompile(args.jobs, work, device.index)
    progress = _Progress(sum(len(c) for _, c in work))
    results = []
    meta = _metadata(arch, gpu, args)
    for problem, configs in work:
        key = problem.key(arch)
        model = model_choice(problem, arch)
        if device is None:
            best, ms, timings, complete = model, None, [], False
        else:
            measure = autotune.kernel_timer(problem, device, warmup_ms=5, rep_ms=args.rep_ms)
            out = autotune.tune(problem, arch, measure, budget_s=budget, configs=configs,
                                progress=lambda i, n, cfg, t: progress(f"{key} {cfg}", t))
            best, ms, timings, complete = out["best"], out["ms"], out["timings"], out["complete"]
            if best is not None and cache is not None:
                cache.put(key, best, ms=ms, tried=len(timings), complete=complete)
        model_ms = next((t for c, t, _ in timings if c == model), None)
        results.append({"key": dataclasses.asdict(problem), "name": key,
                        "config": best.as_list() if best else None, "ms": ms, "model_config": model.as_list(),
                        "model_ms": model_ms, "candidates": len(configs), "timed": len(timings),
                        "complete": complete,
                        "timings": [{"config": c.as_list(), "ms": t, "error": e,
                                     "shared_model": shared_memory_bytes(c, problem, arch),
                                     "registers_model": registers_per_thread(c, problem, arch)}
                                    for c, t, e in timings]})
        _write_outputs(args, meta, results, measured=device is not None)  # after each problem: a cut run keeps them
    progress.close()
    _summary(results)
    _write_outputs(args, meta, results, measured=device is not None, announce=True)
    return {"results": results, **meta}


def _write_outputs(args, meta: dict, results: list, measured: bool, announce: bool = False) -> None:
    if args.table:
        _write_json(args.table, {**meta, "measured": measured,
                                 "entries": [{"key": r["key"], "config": r["config"], "ms": r["ms"]}
                                             for r in results if r["config"]]}, announce)
    if args.report:
        _write_json(args.report, {**meta, "results": results}, announce)


def _metadata(arch, gpu, args) -> dict:
    import torch
    import triton

    from . import __version__

    return {"arch": arch.name, "gpu": gpu, "fa_inductor": __version__, "torch": torch.__version__,
            "triton": triton.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": "fa-inductor tune " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["tune"] else sys.argv[1:])}


def _summary(results: list) -> None:
    from .kernels.configs import KernelConfig

    width = max(len(r["name"]) for r in results)
    print(f"{'problem':<{width}}  {'tuned':<20} {'ms':>8}  {'model pick':<20} {'ms':>8}  timed")
    for r in results:
        tuned = "-" if r["config"] is None else str(KernelConfig.from_list(r["config"]))
        model = str(KernelConfig.from_list(r["model_config"]))
        fmt = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}"  # noqa: E731
        print(f"{r['name']:<{width}}  {tuned:<20} {fmt(r['ms'])}  {model:<20} {fmt(r['model_ms'])}  "
              f"{r['timed']}/{r['candidates']}")


def _write_json(path: str, payload: dict, announce: bool) -> None:
    from .kernels.autotune import write_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, json.dumps(payload, indent=1) + "\n")
    if announce:
        print(f"wrote {target}", file=sys.stderr)
