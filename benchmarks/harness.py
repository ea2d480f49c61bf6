"""Shared benchmark harness: environment, FLOP counts, timing, memory, robust rows, and result files.

Every benchmark script in this folder builds on these pieces so that all results share one format:

    from harness import PlotSpec, attention_flops, collect, environment, measure, time_ms, write_results

    def rows():
        for seqlen in (512, 1024):
            timing, error = measure(f"my_impl L={seqlen}", lambda: time_ms(step))
            yield {"impl": "my_impl", "seqlen": seqlen, "ms": timing and timing["ms"], "error": error}

    write_results(collect(rows()), "benchmarks/results", "mine", "My benchmark", PlotSpec(y="ms"))

Conventions:
  * Times come from ``triton.testing.do_bench`` quantiles (median, p20, p80) on CUDA; on CPU a plain
    ``time.perf_counter`` loop stands in so that smoke runs work without a GPU.
  * FLOPs follow the FlashAttention papers: 4·B·H·Lq·Lk·D for the forward pass, halved when causal,
    x2.5 for the backward pass and x3.5 for forward plus backward; other masks count the (query, key)
    pairs they keep (``attention_flops_from_pairs``).
  * A failing case (out of memory, no kernel for this backend, compile error) becomes a row with an
    ``error`` string instead of ending the run; ``Skipped`` marks cases deliberately not run.
  * Each run writes ``<stem>.json`` (environment + rows), ``<stem>.md`` (a table) and ``<stem>.png``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ClockLog",
    "PlotSpec",
    "Skipped",
    "attention_flops",
    "attention_flops_from_pairs",
    "collect",
    "environment",
    "free_memory",
    "markdown_table",
    "measure",
    "peak_memory_mib",
    "tflops",
    "time_ms",
    "write_plot",
    "write_results",
]

Row = dict[str, Any]

# Multipliers on the forward FLOP count for each benchmark mode.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
# Environment fields stamped onto every JSON row, so rows stay self-describing when runs are merged.
ROW_ENV_FIELDS = ("gpu", "torch", "triton", "timestamp")
QUANTILES = (0.5, 0.2, 0.8)
MAX_ERROR_CHARS = 400


class Skipped(Exception):
    """Raised by a benchmark case that is deliberately not run; ``measure`` records ``skipped: <reason>``."""


# --------------------------------------------------------------------------------------------------
# Environment and FLOPs


def _is_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment() -> dict[str, Any]:
    """Describe the machine and software of this run (no host name)."""
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def attention_flops(batch: int, heads: int, lq: int, lk: int, d: int, causal: bool, mode: str) -> float:
    """FLOPs of one attention call: 4·B·H·Lq·Lk·D forward (x0.5 causal), x2.5 bwd, x3.5 fwd_bwd."""
    return attention_flops_from_pairs(batch * heads * lq * lk * (0.5 if causal else 1.0), d, mode)


def attention_flops_from_pairs(pairs: float, d: int, mode: str) -> float:
    """FLOPs of attention that computes ``pairs`` (query, key) scores, summed over batch and heads.

    4·pairs·D forward (a QK^T and a PV product, 2 FLOPs per multiply-add), x2.5 bwd, x3.5 fwd_bwd. Masked
    attention counts only the pairs its mask keeps, so its TFLOP/s measures useful work.
    """
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {sorted(MODE_FLOP_FACTOR)}, got {mode!r}")
    return 4.0 * pairs * d * MODE_FLOP_FACTOR[mode]


def tflops(flops: float, ms: float | None) -> float | None:
    """Throughput in TFLOP/s for ``flops`` done in ``ms`` milliseconds."""
    if not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------
# Timing and memory


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _cpu_bench(fn: Callable[[], Any], warmup: int, rep: int) -> list[float]:
    """A do_bench stand-in for CPU: ``warmup``/``rep`` are time budgets in ms, as in do_bench."""
    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup / estimate_ms))):
        fn()
    times = []
    for _ in range(max(3, int(rep / estimate_ms))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [_quantile(times, q) for q in QUANTILES]


def time_ms(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, device: str | torch.device | None = None
) -> dict[str, float]:
    """Median, p20 and p80 run time of ``fn`` in milliseconds.

    ``device`` selects the timer: CUDA (default when available) uses ``triton.testing.do_bench``;
    CPU uses a ``time.perf_counter`` loop.
    """
    if _is_cuda(device):
        from triton.testing import do_bench

        values = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    else:
        values = _cpu_bench(fn, warmup, rep)
    median, p20, p80 = (float(v) for v in values)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def graph_time_ms(
    fn: Callable[[], Any], warmup: int = 25, rep: int = 100, device: str | torch.device | None = None
) -> dict[str, float] | None:
    """``time_ms`` of ``fn`` captured once in a CUDA graph and replayed: the GPU's time without the host's
    (Python, launches), as under ``mode="reduce-overhead"``.  ``fn`` runs once on a side stream first, as
    capture requires.  None on CPU."""
    if not _is_cuda(device):
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, warmup=warmup, rep=rep, device=device)


class ClockLog:
    """The GPU's SM clock and board power, sampled in the background by ``nvidia-smi`` (every ``period_ms``)
    while the ``with`` block runs; ``during(start, end)`` summarises the samples taken between two
    ``time.time()`` readings.  An H100 held at its power cap lowers its clock, and a measurement taken then runs
    slower for every kernel alike: the log tells such a measurement from a slower kernel.  Without
    ``nvidia-smi`` (or with ``enabled`` False) nothing is sampled and ``during`` answers None."""

    FIELDS = "timestamp,clocks.sm,power.draw"

    def __init__(self, enabled: bool = True, device_index: int = 0, period_ms: int = 50) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.device_index = device_index
        self.period_ms = period_ms
        self.samples: list[tuple[float, float, float]] = []
        self._process: subprocess.Popen | None = None
        self._path: str | None = None

    def __enter__(self) -> ClockLog:
        if self.enabled:
            fd, self._path = tempfile.mkstemp(prefix="clocks_", suffix=".csv")
            os.close(fd)
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                 f"-lms={self.period_ms}", f"-i={self.device_index}", f"-f={self._path}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._path is not None:
            with open(self._path) as f:
                self.samples = [s for s in map(self._parse, f) if s is not None]
            os.unlink(self._path)

    @staticmethod
    def _parse(line: str) -> tuple[float, float, float] | None:
        """(seconds since the epoch, MHz, W) of one CSV line; None for a line cut short or unreadable.
        nvidia-smi writes local time, which ``datetime.timestamp`` reads as such."""
        try:
            stamp, mhz, watts = (part.strip() for part in line.split(","))
            return datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(mhz), float(watts)
        except ValueError:
            return None

    def during(self, start: float, end: float) -> dict[str, float] | None:
        """Median SM clock (MHz) and mean power (W) of the samples in [start, end]; None without any."""
        inside = [(mhz, watts) for t, mhz, watts in self.samples if start <= t <= end]
        if not inside:
            return None
        return {"mhz": statistics.median(m for m, _ in inside), "watts": statistics.fmean(w for _, w in inside)}


def peak_memory_mib(fn: Callable[[], Any], device: str | torch.device | None = None) -> float | None:
    """Peak CUDA memory allocated while running ``fn`` once, above what was allocated before; None on CPU."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def free_memory() -> None:
    """Drop unreachable tensors and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Robust rows


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


def measure(name: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run ``fn`` and return ``(result, None)``, or ``(None, error)`` if it raised.

    ``Skipped`` gives ``"skipped: <reason>"``; any other exception (OOM, "No available kernel", a compile
    failure) is summarised in one line, printed with ``name`` to stderr, and GPU memory is freed.
    """
    try:
        return fn(), None
    except Skipped as exc:
        return None, f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001 - a benchmark row must survive any backend failure
        error = _describe(exc)
    # Outside the except block the traceback (and the tensors its frames hold) is released.
    print(f"[{name}] {error}", file=sys.stderr)
    free_memory()
    return None, error


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM (e.g. from ``timeout``) into KeyboardInterrupt so partial results get written."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(row: Row) -> str:
    return " ".join(f"{k}={_format(v)}" for k, v in row.items() if v is not None)


def collect(rows: Iterable[Row]) -> list[Row]:
    """Consume a row generator, printing one progress line per row; stop early on Ctrl-C or SIGTERM."""
    done: list[Row] = []
    with _sigterm_as_interrupt():
        try:
            for row in rows:
                done.append(row)
                print(_progress(row), flush=True)
        except KeyboardInterrupt:
            print(f"interrupted: keeping the {len(done)} rows measured so far", file=sys.stderr)
    return done


# --------------------------------------------------------------------------------------------------
# Tables


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any, max_chars: int = 60) -> str:
    text = _format(value).replace("|", "\\|")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; columns default to every key, in order of first appearance."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _environment_line(env: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)


# --------------------------------------------------------------------------------------------------
# Plot


@dataclass(frozen=True)
class PlotSpec:
    """How ``write_results`` draws rows: ``y`` against ``x``, one line per ``series`` value, one subplot
    per combination of ``panels`` values present (keys that never vary go to the figure title)."""

    x: str = "seqlen"
    y: str = "tflops"
    series: str = "impl"
    panels: tuple[str, ...] = ("dtype", "head_dim", "causal", "mode")
    xlabel: str = "sequence length"
    ylabel: str = "TFLOP/s"
    log2_x: bool = True
    reference_line: float | None = None  # a dashed horizontal line at this y (e.g. 1.0 for ratios)


def _short_number(value: float) -> str:
    return f"{value // 1024:g}k" if value >= 1024 and value % 1024 == 0 else f"{value:g}"


def _draw_panel(ax, rows: Sequence[Row], spec: PlotSpec, colors: dict[Any, Any]) -> None:
    xs = sorted({row[spec.x] for row in rows})
    for series, color in colors.items():
        points = sorted(
            (row[spec.x], row[spec.y]) for row in rows if row.get(spec.series) == series and row.get(spec.y) is not None
        )
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=str(series))
    if spec.log2_x and xs and all(isinstance(x, (int, float)) and x > 0 for x in xs):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_short_number(x) for x in xs])
        ax.minorticks_off()
    if spec.reference_line is not None:
        ax.axhline(spec.reference_line, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _grid_shape(n_panels: int, last_key_values: int) -> tuple[int, int]:
    ncols = last_key_values if 1 < last_key_values <= 4 else min(3, n_panels)
    return math.ceil(n_panels / ncols), ncols


def write_plot(rows: Sequence[Row], path: Path, title: str, spec: PlotSpec) -> bool:
    """Draw ``rows`` per ``spec`` into ``path``; returns False (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}", file=sys.stderr)
        return False
    rows = [row for row in rows if spec.x in row and spec.series in row]
    if not rows:
        return False
    varying = [k for k in spec.panels if len({row.get(k) for row in rows}) > 1]
    fixed = [k for k in spec.panels if k not in varying and k in rows[0]]
    # Panels follow each key's values in order of first appearance, so the grid reads like the run.
    order = {k: list(dict.fromkeys(row.get(k) for row in rows)) for k in varying}
    panels: dict[tuple, list[Row]] = {}
    for row in sorted(rows, key=lambda r: tuple(order[k].index(r.get(k)) for k in varying)):
        panels.setdefault(tuple(row.get(k) for k in varying), []).append(row)
    palette = plt.get_cmap("tab10").colors
    series = list(dict.fromkeys(row[spec.series] for row in rows))
    colors = {s: palette[i % len(palette)] for i, s in enumerate(series)}
    plotted = {row[spec.series] for row in rows if row.get(spec.y) is not None}

    last_values = len(order[varying[-1]]) if varying else 1
    nrows, ncols = _grid_shape(len(panels), last_values)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (key, panel_rows) in zip(axes.flat, panels.items()):
        _draw_panel(ax, panel_rows, spec, colors)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(varying, key)), fontsize=9)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(spec.xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(spec.ylabel)
    subtitle = ", ".join(f"{k}={rows[0][k]}" for k in fixed)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    handles = [plt.Line2D([], [], color=c, marker="o", label=str(s)) for s, c in colors.items() if s in plotted]
    legend_cols = max(1, min(len(handles), 2 * ncols))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=legend_cols, frameon=False)
    legend_inches = 0.15 + 0.25 * math.ceil(len(handles) / legend_cols)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Results


def write_results(
    rows: Sequence[Row],
    out_dir: str | Path,
    stem: str,
    title: str,
    plot_spec: PlotSpec,
    *,
    table_columns: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; print the table.

    The JSON holds ``environment``, ``rows`` (each stamped with GPU, versions and timestamp) and the
    ``extra`` entries. ``table_columns`` limits the markdown table (default: every row key).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    stamp = {k: env[k] for k in ROW_ENV_FIELDS}
    payload = {"title": title, "environment": env, "rows": [{**row, **stamp} for row in rows], **(extra or {})}
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")

    table = markdown_table(rows, table_columns)
    paths["md"].write_text(f"# {title}\n\n{_environment_line(env)}\n\n{table}\n")
    print(f"\n{title} ({_environment_line(env)})\n\n{table}\n")

    if not write_plot(rows, paths["png"], title, plot_spec):
        del paths["png"]
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths

