"""Choosing a kernel config for each launch: memo, persistent cache, shipped table, tuning, verified baseline.

``select_config(problem, arch, ...)`` answers, in order:
  1. this process's memo;
  2. the persistent cache (``ConfigCache``): one JSON file per (package, triton, torch, GPU name) in
     ``FA_INDUCTOR_CACHE_DIR`` or the user cache directory (``$XDG_CACHE_HOME/fa_inductor``);
  3. the shipped table of the architecture (``tables/<arch>.json``), nearest length bucket, for the kernel class
     its entries were measured on (no bias tensor, no dropout / softcap / block-sparse / per-sequence lengths);
  4. tuning (``tune``), when allowed: the pruned candidates are timed on real tensors of the problem's bucket
     lengths that the tuner allocates itself, in the model's order, until ``FA_INDUCTOR_TUNE_BUDGET`` seconds
     (default 30) are spent; the winner goes to the memo and the cache;
  5. the baseline configs every kernel variant was verified with (``configs.baseline_config``); the resource
     model's ranking (``configs.model_choice`` first) only orders what tuning tries.
Tuning is allowed unless ``FA_INDUCTOR_AUTOTUNE=0``; it never runs on the tensors it was called with (at trace
time those are fake), never inside a CUDA-graph capture and never on the CPU.  When the op is traced, the tuner
steps out of the tracing modes to allocate and time its own tensors, as Inductor's own autotuning does, and the
compiled graph then holds the tuned constants: nothing runs at launch, so Inductor's rules for user-defined
Triton kernels (no autotune hooks) are not involved.

Cache files are replaced atomically (write a temporary file, fsync, ``os.replace``) under an advisory lock,
merging what other processes wrote in between; a corrupt or unreadable file is ignored with a warning (and
rewritten on the next save), an unwritable directory leaves the cache in memory with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .arch import Arch
from .configs import (Direction, KernelConfig, Problem, baseline_config, candidates, dtype_class, group_bucket,
                      length_bucket, padded_head_dim, rejections)

__all__ = ["ConfigCache", "select_config", "shipped_table", "load_table", "table_lookup", "tune", "default_cache",
           "problem_for", "tuning_allowed", "clear_memo", "kernel_timer", "write_atomic", "AUTOTUNE_ENV", "BUDGET_ENV",
           "CACHE_DIR_ENV", "cache_fingerprint", "TABLE_DIR"]

log = logging.getLogger("fa_inductor")

AUTOTUNE_ENV = "FA_INDUCTOR_AUTOTUNE"
BUDGET_ENV = "FA_INDUCTOR_TUNE_BUDGET"
CACHE_DIR_ENV = "FA_INDUCTOR_CACHE_DIR"
TABLE_DIR = Path(__file__).with_name("tables")
FORMAT_VERSION = 1


def _counters():
    from torch._dynamo.utils import counters

    return counters["fa_inductor"]


# --- the persistent cache --------------------------------------------------------------------------------

def cache_fingerprint(gpu_name: str) -> dict:
    """What a cached timing depends on besides the problem: the package, Triton and torch versions and the GPU."""
    import torch
    import triton

    from .. import __version__

    return {"format": FORMAT_VERSION, "fa_inductor": __version__, "triton": triton.__version__,
            "torch": torch.__version__, "gpu": gpu_name}


def _cache_directory() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fa_inductor"


@contextlib.contextmanager
def _locked(path: Path):
    """An advisory exclusive lock on ``path`` + ".lock" (POSIX); elsewhere, no lock (writes stay atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(str(path) + ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ConfigCache:
    """Tuned configs of one fingerprint, in ``directory/autotune-<hash>.json``."""

    def __init__(self, directory: Path | str, fingerprint: dict):
        self.fingerprint = dict(fingerprint)
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory) / f"autotune-{digest}.json"
        self._entries: Optional[dict] = None
        self._lock = threading.Lock()
        self._warned: set = set()

    def _warn(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("fa_inductor: autotune cache %s (%s): %s; continuing without it", what, self.path, exc)

    def _read(self) -> dict:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn("unreadable", exc)
            return {}
        try:
            data = json.loads(text)
            if data.get("fingerprint") != self.fingerprint or not isinstance(data.get("entries"), dict):
                raise ValueError("fingerprint or layout does not match")
            entries = {}
            for key, entry in data["entries"].items():
                entries[key] = {**entry, "config": KernelConfig.from_list(entry["config"]).as_list()}
            return entries
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._warn("corrupt", exc)
            return {}

    def entries(self) -> dict:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return dict(self._entries)

    def get(self, key: str) -> Optional[KernelConfig]:
        entry = self.entries().get(key)
        return KernelConfig.from_list(entry["config"]) if entry else None

    def put(self, key: str, cfg: KernelConfig, **info) -> None:
        """Record ``cfg`` for ``key`` in memory and on disk (merged with what is on disk now)."""
        entry = {"config": cfg.as_list(), **info}
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            self._entries[key] = entry
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with _locked(self.path):
                    merged = {**self._read(), key: entry}
                    self._write(merged)
                    self._entries = {**merged, **self._entries}
            except OSError as exc:
                self._warn("unwritable", exc)

    def _write(self, entries: dict) -> None:
        write_atomic(self.path, json.dumps({"fingerprint": self.fingerprint, "entries": entries}, indent=1,
                                           sort_keys=True))


def write_atomic(path: Path | str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a temporary file beside it, fsync, ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def _default_cache(directory: str, gpu_name: str) -> ConfigCache:
    return ConfigCache(directory, cache_fingerprint(gpu_name))


def default_cache(gpu_name: str) -> ConfigCache:
    return _default_cache(str(_cache_directory()), gpu_name)


# --- shipped tables ----------------------------------------------------------------------------------------

def load_table(path: Path | str) -> dict:
    """A table file: {"arch", "measured", "source", "entries": [{"key": {...Problem fields}, "config": [...]}]}."""
    data = json.loads(Path(path).read_text())
    table = {}
    for entry in data["entries"]:
        problem = Problem(**entry["key"])
        table[problem] = KernelConfig.from_list(entry["config"])
    return {"arch": data["arch"], "measured": bool(data.get("measured")), "entries": table}


@functools.lru_cache(maxsize=None)
def shipped_table(arch_name: str) -> dict:
    path = TABLE_DIR / f"{arch_name}.json"
    if not path.exists():
        return {"arch": arch_name, "measured": False, "entries": {}}
    return load_table(path)


def table_lookup(table: dict, problem: Problem, arch: Optional[Arch] = None) -> Optional[KernelConfig]:
    """The entry for ``problem``, else the one of the nearest length bucket (log distance).  With ``arch``,
    entries that fail a hard predicate for this very problem (a block longer than a short sequence) are passed
    over."""

    def usable(cfg: KernelConfig) -> bool:
        return arch is None or not any(not p.soft for p in rejections(cfg, problem, arch))

    same = [(p, c) for p, c in table["entries"].items()
            if dataclasses.replace(p, m_bucket=0, n_bucket=0) == dataclasses.replace(problem, m_bucket=0, n_bucket=0)]

    def distance(item):
        p = item[0]
        return (abs(p.m_bucket.bit_length() - problem.m_bucket.bit_length())
                + abs(p.n_bucket.bit_length() - problem.n_bucket.bit_length()))

    return next((cfg for _, cfg in sorted(same, key=distance) if usable(cfg)), None)


# --- tuning ------------------------------------------------------------------------------------------------

def _budget() -> float:
    try:
        return float(os.environ.get(BUDGET_ENV, "30"))
    except ValueError:
        return 30.0


def tuning_allowed() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def tune(problem: Problem, arch: Arch, measure: Callable[[KernelConfig], float], budget_s: Optional[float] = None,
         configs: Optional[Iterable[KernelConfig]] = None,
         progress: Optional[Callable[[int, int, KernelConfig, Optional[float]], None]] = None) -> dict:
    """Time ``configs`` (default: the pruned candidates, model order) with ``measure`` (milliseconds; may raise
    for a config that fails to compile or run) until ``budget_s`` seconds pass (None: no limit).  Returns
    {"best": KernelConfig or None, "ms": best time, "timings": [(config, ms or None, error)], "complete": bool}."""
    todo = list(configs) if configs is not None else candidates(problem, arch)
    start = time.perf_counter()
    timings, best, best_ms = [], None, float("inf")
    for i, cfg in enumerate(todo):
        if budget_s is not None and i > 0 and time.perf_counter() - start > budget_s:
            break
        try:
            ms, error = float(measure(cfg)), None
        except Exception as exc:  # a config that does not compile or run is skipped, not fatal
            ms, error = None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        timings.append((cfg, ms, error))
        if ms is not None and ms < best_ms:
            best, best_ms = cfg, ms
        if progress is not None:
            progress(i + 1, len(todo), cfg, ms)
    return {"best": best, "ms": best_ms if best is not None else None, "timings": timings,
            "complete": len(timings) == len(todo)}


# --- selection --------------------------------------------------------------------------------------------

_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()


def clear_memo() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()


def select_config(problem: Problem, arch: Arch, gpu_name: Optional[str],
                  measure_factory: Optional[Callable[[], Callable[[KernelConfig], float]]] = None) -> KernelConfig:
    """The config for ``problem`` (see the module docstring for the order).  ``gpu_name`` None skips the
    persistent cache; ``measure_factory`` None (or tuning switched off) skips tuning."""
    key = problem.key(arch)
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
    counters = _counters()
    cfg, source = None, None
    cache = default_cache(gpu_name) if gpu_name is not None else None
    if cache is not None:
        cfg, source = cache.get(key), "cache"
    if cfg is None:
        cfg, source = table_lookup(shipped_table(arch.name), problem, arch), "table"
    if cfg is None and measure_factory is not None and tuning_allowed():
        try:
            measure = measure_factory()
        except Exception:  # noqa: BLE001 - tuning is an optimisation: never let it break a launch
            log.warning("fa_inductor: could not set up tuning for %s; using the baseline config", key, exc_info=True)
            measure = None
        result = tune(problem, arch, measure, budget_s=_budget()) if measure is not None else {"best": None}
        if result["best"] is not None:
            cfg, source = result["best"], "tuned"
            log.info("fa_inductor: tuned %s in %d configs: %s (%.3f ms)", key, len(result["timings"]), cfg,
                     result["ms"])
            if cache is not None:
                cache.put(key, cfg, ms=result["ms"], tried=len(result["timings"]), complete=result["complete"])
    if cfg is None:
        cfg, source = baseline_config(problem, arch), "baseline"
    counters[f"config_{source}"] += 1
    with _MEMO_LOCK:
        _MEMO[key] = cfg
    return cfg


def _hint(n) -> Optional[int]:
    """A length as an int without guarding on it: symbolic lengths give their hint (None when there is none)."""
    if isinstance(n, int):
        return n
    node = getattr(n, "node", None)
    hint = getattr(node, "hint", None)
    return int(hint) if hint is not None else None


def problem_for(direction: str, dtype, head_d: int, head_dv: int, causal: bool, bias: bool, n_queries,
                n_keys, extras: bool = False, group: int = 1) -> Problem:
    """The problem of one launch; lengths may be symbolic (their hints pick the bucket, without a guard).
    ``group`` (query heads per key head) counts for the dK/dV kernel only."""
    return Problem(direction, dtype_class(dtype), padded_head_dim(head_d), padded_head_dim(head_dv), bool(causal),
                   bool(bias), length_bucket(_hint(n_queries)), length_bucket(_hint(n_keys)), bool(extras),
                   group_bucket(_hint(group) or 1) if direction == Direction.BACKWARD_KV else 1)


# --- timing the kernels on tensors of the problem's shape ---------------------------------------------------

@contextlib.contextmanager
def real_tensors():
    """Step out of every tracing mode (fake tensors, functionalization, proxies) and autograd, so that tensors
    made inside are real and kernels launched inside really run."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        yield


def _shape(problem: Problem) -> tuple[int, int, int, int]:
    """(batch, heads, query length, key length) for timing: the bucket lengths with batch x length = 16k tokens
    and 16 heads (the benchmark's convention), at most 2^26 bias elements for biased problems."""
    m, n = problem.m_bucket, problem.n_bucket
    if problem.bias:
        while m * n > 1 << 26:
            m, n = max(128, m // 2), max(128, n // 2)
    return max(1, 16384 // max(m, n)), 16, m, n


def kernel_timer(problem: Problem, device, warmup_ms: int = 10, rep_ms: int = 40, compile_only: bool = False,
                 shape: Optional[tuple[int, int, int, int]] = None,
                 kv_heads: Optional[int] = None) -> Callable[[KernelConfig], float]:
    """``measure(cfg)``: median milliseconds of the problem's kernel (one pass of the backward) with ``cfg`` on
    fresh random tensors allocated here, on ``device``: ``shape`` = (batch, heads, M, N), by default one of the
    problem's bucket lengths (``_shape``), with ``kv_heads`` key heads (default: heads / the problem's group).
    With ``compile_only`` it runs the kernel once (compiling it) and returns 0."""
    import torch
    from triton.testing import do_bench

    from .common import dot_options, empty_lse, empty_output
    from .flash_bwd import flash_backward
    from .flash_fwd import flash_forward
    from .op import mask_spec

    dtype = torch.float32 if problem.dtype == "fp32" else torch.bfloat16
    arch = _arch_of(device)
    batch, heads, m, n = shape if shape is not None else _shape(problem)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    with real_tensors():
        kv_heads = kv_heads or heads // problem.group
        q, k, v = (randn(batch, heads, m, problem.head_d), randn(batch, kv_heads, n, problem.head_d),
                   randn(batch, kv_heads, n, problem.head_dv))
        bias = randn(1, 1, m, n) if problem.bias else None
        spec = mask_spec(q, k, problem.causal, True, bias, -1, -1, None, None, 0.0, 0.0, None, None, 128)
        dot = dot_options(dtype, interpreted=False)
        scale = problem.head_d ** -0.5
        out, lse = empty_output(q, v), empty_lse(q)
        flash_forward(q, k, v, out, lse, scale, spec,
                      baseline_config(dataclasses.replace(problem, direction=Direction.FORWARD), arch), dot)
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        grad_out = randn(*out.shape)
        fixed = {d: baseline_config(dataclasses.replace(problem, direction=d), arch)
                 for d in (Direction.BACKWARD_KV, Direction.BACKWARD_Q)}

    def run(cfg: KernelConfig) -> None:
        if problem.direction == Direction.FORWARD:
            flash_forward(q, k, v, out, lse, scale, spec, cfg, dot)
            return
        cfg_kv = cfg if problem.direction == Direction.BACKWARD_KV else fixed[Direction.BACKWARD_KV]
        cfg_q = cfg if problem.direction == Direction.BACKWARD_Q else fixed[Direction.BACKWARD_Q]
        flash_backward(grad_out, q, k, v, out, lse, None, *grads, None, scale, spec, cfg_kv, cfg_q, dot,
                       passes=("kv",) if problem.direction == Direction.BACKWARD_KV else ("q",))

    def measure(cfg: KernelConfig) -> float:
        with real_tensors():
            run(cfg)  # compile (and fail) outside the timed region
            torch.cuda.synchronize(device)
            if compile_only:
                return 0.0
            return float(do_bench(lambda: run(cfg), warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return measure


def _arch_of(device) -> Arch:
    from .arch import current_arch

    return current_arch(getattr(device, "index", None))
