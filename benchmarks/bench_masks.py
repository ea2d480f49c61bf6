"""Masked attention: fa_inductor's causal, sliding-window, key-padding and block-sparse attention against
PyTorch's SDPA backends and FlexAttention, each relative to fa_inductor's unmasked kernel on the same shape.

Usage (from the repository root, with fa_inductor installed, e.g. ``pip install -e .``, or ``PYTHONPATH=.``):

    # the acceptance numbers (H100, a few minutes): forward, bf16, head dim 128, 16 heads, 16k tokens
    python benchmarks/bench_masks.py --head-dims 128 --seqlens 8192 16384 --modes fwd --stem masks_d128_bf16
    python benchmarks/bench_masks.py --masks window --window 4096 --seqlens 16384 32768 --compare
    python benchmarks/bench_masks.py --device cpu --head-dims 64 --seqlens 256 --tokens 512 --block-size 64 \\
        --impls fa_inductor sdpa_flash flex --modes fwd --warmup 1 --rep 3       # smoke run

Shapes are bench_attention.py's: q, k, v are (B, H, L, D) with B = max(1, tokens // L), H = model_dim // D.
For every shape, each mask below is measured for each implementation that can express it (``--masks``):

  none          no mask; fa_inductor's row here is the ``dense`` reference of every ratio
  causal        is_causal=True (SDPA), causal mask_mod (Flex)
  window        causal sliding window of W keys including the diagonal (``--window``, default 1024): query i
                sees keys i-W+1 .. i. fa_inductor: window_size=(W-1, 0); SDPA: a boolean (L, L) attn_mask
                (SDPA flash takes no mask, so its row is an error row); Flex: the same predicate as mask_mod
  padding       key padding: batch element b keeps its first n_b keys, n_b drawn (``--seed``) between the
                ``--padding-range`` fractions of L (default 0.5 1.0). fa_inductor: a (B, 1, 1, L) boolean
                attn_mask (impl ``fa_inductor``) and key_lengths=n (impl ``fa_inductor_lengths``); SDPA: the
                boolean mask; Flex: ``kv_idx < n[b]``
  block_sparse  fa_inductor.block_sparse_attention with a random (``--seed``) per-head mask of
                ``--block-size`` blocks keeping each ``--densities`` fraction (the diagonal always kept; the
                kept sets grow with density); Flex: the same blocks as a BlockMask of full blocks
                (BlockMask.from_kv_blocks). Density 1.0 is fa_inductor's block-sparse path at full density.

Masks (boolean tensors, BlockMasks, lengths) are built once per shape, outside the timed region.

FLOPs count only the (query, key) pairs the mask keeps: causal halves the square (as in bench_attention),
window counts sum_i min(i+1, W), padding sum_b L·n_b, block-sparse the kept blocks' area. TFLOP/s is
therefore useful work. Each row's ``vs_dense`` is its time over fa_inductor's unmasked time (same shape
and mode); ``work`` is the fraction of the L x L scores its mask keeps.

Ratios: for every fa_inductor masked row, time and TFLOP/s relative to the dense row, printed as a table
and written to ``<stem>_ratios.md`` and the JSON (``ratios``). Acceptance targets, checked where they apply
(fwd, bf16, head dim 128; stated for an H100):
  causal at L=8k                 time  <= 0.6 x dense
  window 1024 at L=16k           time  <= 0.2 x dense
  block_sparse 25%               time  <= 0.35 x dense
  padding (B,1,1,L) bool mask    TFLOP/s >= 0.85 x dense
Results go to ``<out-dir>/<stem>.{json,md,png}``, ``<stem>_density.png`` (block-sparse time against
density) and ``<stem>_ratios.md``; ``--compare`` adds fa_inductor/peer TFLOP/s ratios (``<stem>_compare.md``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.nn.attention import SDPBackend

from bench_attention import (
    MODES,
    REFERENCE,
    AttentionFn,
    Shape,
    add_common_arguments,
    args_record,
    benchmark_context,
    causal_mask_mod,
    check_common_args,
    compare_rows,
    flex_attention_with,
    make_inputs,
    measure_modes,
    sdpa_attention,
    warn_if_missing,
    write_compare,
)
from harness import (
    PlotSpec,
    attention_flops_from_pairs,
    collect,
    free_memory,
    markdown_table,
    tflops,
    write_plot,
    write_results,
)

Tensor = torch.Tensor

DENSE = "none"
LENGTHS_IMPL = f"{REFERENCE}_lengths"
TABLE_COLUMNS = (
    "impl", "mask", "dtype", "batch", "heads", "seqlen", "head_dim", "mode", "work", "ms", "tflops", "vs_dense",
    "peak_mib", "error",
)  # fmt: skip
RATIO_COLUMNS = ("impl", "mask", "dtype", "head_dim", "seqlen", "mode", "time_ratio", "tflops_ratio", "target", "met")
# Comparison rows: sorted by these keys, masks kept in run order within each group.
COMPARE_ORDER = ("dtype", "head_dim", "mode", "seqlen")
COMPARE_COLUMNS = ("mask", *COMPARE_ORDER)


# --------------------------------------------------------------------------------------------------
# Masks: one class per kind. An instance is one mask on one shape; it knows the pairs it keeps and how
# each implementation is told about it. Tensors are built on first use and shared by the implementations.


class Mask:
    """No mask: the dense reference."""

    kind: ClassVar[str] = DENSE
    causal: ClassVar[bool] = False  # the row's ``causal`` column

    def __init__(self, shape: Shape, device: str, args: argparse.Namespace) -> None:
        self.shape = replace(shape, causal=self.causal)
        self.device, self.args = device, args

    @property
    def label(self) -> str:
        return self.kind

    @property
    def columns(self) -> dict[str, Any]:
        """The mask's parameters as row columns."""
        return {"window": None, "density": None}

    def applies_to(self, impl: str) -> bool:
        return impl != LENGTHS_IMPL

    def visible_pairs(self) -> float:
        """(query, key) pairs kept, summed over batch and heads."""
        s = self.shape
        return float(s.batch * s.heads * s.seqlen * s.seqlen)

    def fa_inductor(self) -> AttentionFn:
        import fa_inductor  # lazy: the other implementations still run when the package is broken

        return fa_inductor.scaled_dot_product_attention

    def fa_inductor_lengths(self) -> AttentionFn:
        raise NotImplementedError(f"{self.kind} has no key_lengths form")

    def sdpa_kwargs(self) -> dict[str, Any]:
        return {}

    def flex_block_mask(self) -> Any:
        return None


class Causal(Mask):
    kind = "causal"
    causal = True

    def visible_pairs(self) -> float:
        return super().visible_pairs() / 2  # bench_attention's convention: half the square

    def fa_inductor(self) -> AttentionFn:
        return functools.partial(super().fa_inductor(), is_causal=True)

    def sdpa_kwargs(self) -> dict[str, Any]:
        return {"is_causal": True}

    def flex_block_mask(self) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        length = self.shape.seqlen
        return create_block_mask(causal_mask_mod, None, None, length, length, device=self.device)


class Window(Mask):
    """Causal sliding window of ``W`` keys including the diagonal: query i sees keys i-W+1 .. i."""

    kind = "window"
    causal = True

    @property
    def width(self) -> int:
        return self.args.window

    @property
    def label(self) -> str:
        return f"window {self.width}"

    @property
    def columns(self) -> dict[str, Any]:
        return {"window": self.width, "density": None}

    def visible_pairs(self) -> float:
        s, w = self.shape, min(self.width, self.shape.seqlen)
        per_head = w * (w + 1) // 2 + (s.seqlen - w) * w  # sum over queries i of min(i + 1, W)
        return float(s.batch * s.heads * per_head)

    def fa_inductor(self) -> AttentionFn:
        return functools.partial(super().fa_inductor(), window_size=(self.width - 1, 0))

    @functools.cached_property
    def bool_mask(self) -> Tensor:
        """(L, L), True where query i may attend to key j."""
        idx = torch.arange(self.shape.seqlen, device=self.device)
        distance = idx[:, None] - idx[None, :]
        return (distance >= 0) & (distance < self.width)

    def sdpa_kwargs(self) -> dict[str, Any]:
        return {"attn_mask": self.bool_mask}

    def flex_block_mask(self) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        width = self.width

        def window_mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < width)

        length = self.shape.seqlen
        return create_block_mask(window_mask_mod, None, None, length, length, device=self.device)


def padding_lengths(batch: int, seqlen: int, fractions: Sequence[float], seed: int) -> list[int]:
    """Kept keys per batch element: deterministic draws between ``fractions`` of ``seqlen`` (at least 1)."""
    low = max(1, math.ceil(fractions[0] * seqlen))
    high = max(low, math.floor(fractions[1] * seqlen))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (batch,), generator=generator).tolist()


class Padding(Mask):
    """Key padding: batch element b attends to its first ``lengths[b]`` keys only."""

    kind = "padding"

    def applies_to(self, impl: str) -> bool:
        return True

    @functools.cached_property
    def lengths(self) -> Tensor:
        s = self.shape
        values = padding_lengths(s.batch, s.seqlen, self.args.padding_range, self.args.seed)
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    @functools.cached_property
    def bool_mask(self) -> Tensor:
        """(B, 1, 1, L), True for the keys a batch element keeps."""
        keys = torch.arange(self.shape.seqlen, device=self.device)
        return (keys[None, :] < self.lengths[:, None])[:, None, None, :]

    def visible_pairs(self) -> float:
        return float(self.shape.heads * self.shape.seqlen * int(self.lengths.sum()))

    def fa_inductor(self) -> AttentionFn:
        return functools.partial(super().fa_inductor(), attn_mask=self.bool_mask)

    def fa_inductor_lengths(self) -> AttentionFn:
        return functools.partial(super().fa_inductor(), key_lengths=self.lengths)

    def sdpa_kwargs(self) -> dict[str, Any]:
        return {"attn_mask": self.bool_mask}

    def flex_block_mask(self) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        lengths = self.lengths

        def padding_mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        length = self.shape.seqlen
        return create_block_mask(padding_mask_mod, self.shape.batch, None, length, length, device=self.device)


def random_blocks(heads: int, n_blocks: int, density: float, seed: int) -> Tensor:
    """(heads, n, n) bool: per head, the round(density·n²) blocks of lowest seeded random rank, diagonal first.

    The ranks depend only on ``seed`` and the sizes, so a higher density keeps a superset of the blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    rank = torch.rand(heads, n_blocks, n_blocks, generator=generator)
    rank.diagonal(dim1=-2, dim2=-1).fill_(-1.0)  # below every draw: the diagonal always comes first
    keep = max(n_blocks, round(density * n_blocks * n_blocks))
    order = rank.flatten(1).argsort(dim=1)[:, :keep]
    blocks = torch.zeros(heads, n_blocks * n_blocks, dtype=torch.bool)
    blocks.scatter_(1, order, True)
    return blocks.view(heads, n_blocks, n_blocks)


def flex_block_mask_from_blocks(blocks: Tensor, block_size: int, seqlen: int) -> Any:
    """A FlexAttention BlockMask keeping exactly ``blocks`` ((B, H, n, n) bool), all as full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = blocks.sum(dim=-1, dtype=torch.int32)
    # Kept block indices first, in ascending order (a stable sort of "not kept").
    indices = (~blocks).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        torch.zeros_like(indices),
        counts,
        indices,
        BLOCK_SIZE=block_size,
        seq_lengths=(seqlen, seqlen),
    )


class BlockSparse(Mask):
    """A random per-head mask of ``block_size`` square blocks keeping a ``density`` fraction."""

    kind = "block_sparse"

    def __init__(self, shape: Shape, device: str, args: argparse.Namespace, density: float) -> None:
        super().__init__(shape, device, args)
        self.density = density

    @property
    def label(self) -> str:
        return f"block_sparse {self.density:.0%}"

    @property
    def columns(self) -> dict[str, Any]:
        return {"window": None, "density": self.density}

    def applies_to(self, impl: str) -> bool:
        # SDPA would need the (1, H, L, L) dense expansion of the blocks: not a block-sparse peer.
        return impl in (REFERENCE, "flex")

    @functools.cached_property
    def blocks(self) -> Tensor:
        """(1, H, n, n) bool, broadcast over the batch."""
        n_blocks = math.ceil(self.shape.seqlen / self.args.block_size)
        blocks = random_blocks(self.shape.heads, n_blocks, self.density, self.args.seed)
        return blocks[None].to(self.device)

    def visible_pairs(self) -> float:
        size, length = self.args.block_size, self.shape.seqlen
        extent = torch.full((self.blocks.shape[-1],), size, dtype=torch.float64)
        extent[-1] = length - size * (len(extent) - 1)  # the last block may be partial
        area = extent[:, None] * extent[None, :]
        return float(self.shape.batch * (self.blocks.cpu().double() * area).sum())

    def fa_inductor(self) -> AttentionFn:
        import fa_inductor

        return functools.partial(
            fa_inductor.block_sparse_attention, block_mask=self.blocks, block_size=self.args.block_size
        )

    def sdpa_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError("SDPA has no block-sparse form")

    def flex_block_mask(self) -> Any:
        return flex_block_mask_from_blocks(self.blocks, self.args.block_size, self.shape.seqlen)


MASKS: dict[str, type[Mask]] = {cls.kind: cls for cls in (Mask, Causal, Window, Padding, BlockSparse)}


def _masks(shape: Shape, args: argparse.Namespace) -> Iterator[Mask]:
    """The masks to measure on ``shape``, the dense reference first."""
    for kind in dict.fromkeys([DENSE, *args.masks]):
        if kind == BlockSparse.kind:
            for density in args.densities:
                yield BlockSparse(shape, args.device, args, density)
        else:
            yield MASKS[kind](shape, args.device, args)


# --------------------------------------------------------------------------------------------------
# Implementations: each maps a mask to attention(q, k, v); Mask.applies_to says which pairs exist.

IMPLS: dict[str, Callable[[Mask], AttentionFn]] = {
    REFERENCE: lambda mask: mask.fa_inductor(),
    LENGTHS_IMPL: lambda mask: mask.fa_inductor_lengths(),
    "sdpa_flash": lambda mask: sdpa_attention(SDPBackend.FLASH_ATTENTION, **mask.sdpa_kwargs()),
    "sdpa_cudnn": lambda mask: sdpa_attention(SDPBackend.CUDNN_ATTENTION, **mask.sdpa_kwargs()),
    "sdpa_efficient": lambda mask: sdpa_attention(SDPBackend.EFFICIENT_ATTENTION, **mask.sdpa_kwargs()),
    "flex": lambda mask: flex_attention_with(mask.flex_block_mask()),
}


# --------------------------------------------------------------------------------------------------
# Rows


def _row(impl: str, mask: Mask, mode: str, result: dict | None, error: str | None) -> dict[str, Any]:
    result = result or {}
    s = mask.shape
    pairs = mask.visible_pairs()
    return {
        "impl": impl,
        "mask": mask.label,
        "kind": mask.kind,
        **mask.columns,
        **asdict(s),
        "mode": mode,
        "work": pairs / (s.batch * s.heads * s.seqlen * s.seqlen),
        "ms": result.get("ms"),
        "ms_p20": result.get("ms_p20"),
        "ms_p80": result.get("ms_p80"),
        "tflops": tflops(attention_flops_from_pairs(pairs, s.head_dim, mode), result.get("ms")),
        "vs_dense": None,  # filled in by add_dense_ratios once the dense row is known
        "peak_mib": result.get("peak_mib"),
        "error": error,
    }


def _shapes(args: argparse.Namespace) -> Iterator[Shape]:
    """Unmasked shapes; each mask sets ``causal`` on its own copy."""
    for dtype, head_dim, seqlen in itertools.product(args.dtype, args.head_dims, args.seqlens):
        yield Shape(dtype, max(1, args.tokens // seqlen), args.model_dim // head_dim, seqlen, head_dim, False)


def bench_rows(args: argparse.Namespace) -> Iterator[dict]:
    """One row per (shape, mask, implementation, mode); one set of inputs per shape."""
    requires_grad = any(mode != "fwd" for mode in args.modes)
    for shape in _shapes(args):
        inputs = make_inputs(shape, args.device, requires_grad)
        for mask in _masks(shape, args):
            for impl in filter(mask.applies_to, args.impls):
                build = functools.partial(IMPLS[impl], mask)
                label = f"{impl} {mask.label} {mask.shape}"
                for mode, result, error in measure_modes(label, build, inputs, args):
                    yield _row(impl, mask, mode, result, error)
                free_memory()
            del mask
            free_memory()
        del inputs
        free_memory()


# --------------------------------------------------------------------------------------------------
# Ratios to the dense kernel and acceptance targets

GEOMETRY_KEYS = ("dtype", "batch", "heads", "seqlen", "head_dim", "mode")


def _dense_rows(rows: Sequence[dict]) -> dict[tuple, dict]:
    return {
        tuple(r[k] for k in GEOMETRY_KEYS): r for r in rows if r["impl"] == REFERENCE and r["kind"] == DENSE and r["ms"]
    }


def add_dense_ratios(rows: Sequence[dict]) -> None:
    """Set each row's ``vs_dense``: its time over fa_inductor's unmasked time on the same shape and mode."""
    dense = _dense_rows(rows)
    for row in rows:
        reference = dense.get(tuple(row[k] for k in GEOMETRY_KEYS))
        row["vs_dense"] = row["ms"] / reference["ms"] if reference and row["ms"] else None


@dataclass(frozen=True)
class Target:
    """An acceptance bound on one ratio, checked on the rows matching ``mask`` and ``where``."""

    name: str
    mask: str  # Mask.kind
    metric: str  # "time_ratio" (lower is better) or "tflops_ratio" (higher is better)
    bound: float
    impl: str = REFERENCE
    where: dict[str, Any] = field(default_factory=dict)

    # Every target is stated for the forward pass in bf16 with head dim 128 (on an H100).
    CONDITIONS: ClassVar[dict[str, Any]] = {"mode": "fwd", "dtype": "bf16", "head_dim": 128}

    def applies(self, row: dict) -> bool:
        conditions = {**self.CONDITIONS, **self.where}
        return (
            row["impl"] == self.impl
            and row["kind"] == self.mask
            and all(row.get(k) == v for k, v in conditions.items())
        )

    def describe(self) -> str:
        compare = "<=" if self.metric == "time_ratio" else ">="
        return f"{self.metric.removesuffix('_ratio')} {compare} {self.bound:g}"

    def met(self, row: dict) -> bool | None:
        value = row[self.metric]
        if value is None:
            return None
        return (operator.le if self.metric == "time_ratio" else operator.ge)(value, self.bound)


TARGETS = (
    Target("causal, L=8k", "causal", "time_ratio", 0.6, where={"seqlen": 8192}),
    Target("window 1k, L=16k", "window", "time_ratio", 0.2, where={"seqlen": 16384, "window": 1024}),
    Target("block-sparse 25%", "block_sparse", "time_ratio", 0.35, where={"density": 0.25}),
    Target("padding bool mask", "padding", "tflops_ratio", 0.85),
)


def ratio_rows(rows: Sequence[dict]) -> list[dict]:
    """fa_inductor's masked rows against its dense row: time and TFLOP/s ratios, with any target checked."""
    dense = _dense_rows(rows)
    ratios = []
    for row in rows:
        reference = dense.get(tuple(row[k] for k in GEOMETRY_KEYS))
        if not row["impl"].startswith(REFERENCE) or row["kind"] == DENSE or reference is None:
            continue
        ratio = {
            **{k: row[k] for k in ("impl", "mask", "kind", "window", "density", *GEOMETRY_KEYS)},
            "time_ratio": row["ms"] / reference["ms"] if row["ms"] else None,
            "tflops_ratio": row["tflops"] / reference["tflops"] if row["tflops"] else None,
            "target": None,
            "target_name": None,
            "met": None,
            "error": row["error"],
        }
        for target in TARGETS:
            if target.applies(ratio):
                ratio["target"], ratio["target_name"], ratio["met"] = target.describe(), target.name, target.met(ratio)
        ratios.append(ratio)
    ratios.sort(key=lambda r: (r["dtype"], r["head_dim"], MODES.index(r["mode"]), r["seqlen"]))
    return ratios


def _ratio_table(ratios: Sequence[dict]) -> str:
    def cell(key: str, value: Any) -> Any:
        if key.endswith("_ratio") and value is not None:
            return f"{value:.3f}x"
        if key == "met" and value is not None:
            return "yes" if value else "NO"
        return value

    return markdown_table([{k: cell(k, v) for k, v in r.items()} for r in ratios], RATIO_COLUMNS)


def write_ratios(ratios: Sequence[dict], out_dir: Path, stem: str) -> None:
    """Print the ratio table with the targets met and missed, and write ``<stem>_ratios.md``."""
    if not ratios:
        print(f"no ratios: {REFERENCE} has no dense row or no masked rows")
        return
    table = _ratio_table(ratios)
    checked = [r for r in ratios if r["target"]]
    summary = f"targets met: {sum(bool(r['met']) for r in checked)} of {len(checked)} checked"
    missed = [f"{r['target_name']} (L={r['seqlen']})" for r in checked if not r["met"]]
    if missed:
        summary += "; missed or not measured: " + ", ".join(missed)
    title = f"{REFERENCE} masked / unmasked (time_ratio: lower is faster; tflops_ratio counts kept pairs only)"
    path = out_dir / f"{stem}_ratios.md"
    path.write_text(f"# {title}\n\n{table}\n\n{summary}\n")
    print(f"\n{title}\n\n{table}\n\n{summary}\nwrote {path}")


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, list(IMPLS), head_dims=(128,), seqlens=(8192, 16384))
    kinds = [kind for kind in MASKS if kind != DENSE]
    p.add_argument("--masks", nargs="+", choices=kinds, default=kinds, help="the dense reference always runs")
    p.add_argument("--window", type=int, default=1024, help="sliding-window keys, diagonal included")
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--block-size", type=int, default=128, help="block-sparse block edge, queries and keys")
    p.add_argument(
        "--padding-range", nargs=2, type=float, default=[0.5, 1.0], metavar=("MIN", "MAX"),
        help="fractions of L between which each batch element's kept key count is drawn",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the padding lengths and block-sparse masks")
    p.add_argument("--compare", action="store_true", help=f"print and write {REFERENCE}/peer TFLOP/s ratios")
    args = p.parse_args(argv)
    check_common_args(p, args, "masks")
    if args.window < 1:
        p.error("--window must be at least 1")
    if not all(0.0 < d <= 1.0 for d in args.densities):
        p.error("every density must be in (0, 1]")
    if args.block_size < 16:
        p.error("--block-size must be at least 16")
    low, high = args.padding_range
    if not 0.0 < low <= high <= 1.0:
        p.error("--padding-range needs 0 < MIN <= MAX <= 1")
    return args


def _density_plot(rows: Sequence[dict], out_dir: Path, stem: str) -> None:
    sparse = [r for r in rows if r["density"] is not None]
    spec = PlotSpec(
        x="density", y="vs_dense", panels=("dtype", "head_dim", "seqlen", "mode"), log2_x=False,
        xlabel="fraction of blocks kept", ylabel=f"time / {REFERENCE} unmasked",
    )  # fmt: skip
    path = out_dir / f"{stem}_density.png"
    if sparse and write_plot(sparse, path, "Block-sparse attention: time against density", spec):
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warn_if_missing(args.impls)
    with benchmark_context():
        rows = collect(bench_rows(args))
    add_dense_ratios(rows)
    ratios = ratio_rows(rows)
    keys = ("mask", *GEOMETRY_KEYS)
    compared = compare_rows(rows, keys=keys, order=COMPARE_ORDER)
    padding = {
        length: padding_lengths(max(1, args.tokens // length), length, args.padding_range, args.seed)
        for length in args.seqlens
    }
    extra = {"args": args_record(args), "ratios": ratios, "compare": compared, "padding_lengths": padding}
    title = "Masked attention: " + ", ".join(args.impls)
    spec = PlotSpec(panels=("mask", "dtype", "head_dim", "mode"))
    write_results(rows, args.out_dir, args.stem, title, spec, table_columns=TABLE_COLUMNS, extra=extra)
    _density_plot(rows, args.out_dir, args.stem)
    write_ratios(ratios, args.out_dir, args.stem)
    if args.compare:
        write_compare(compared, args.out_dir, args.stem, COMPARE_COLUMNS)


if __name__ == "__main__":
    main()
