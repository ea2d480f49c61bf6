"""What the kernels compute beyond plain attention, in one place: the mask/bias/softcap/dropout semantics.

For q [B, H, M, D], k [B, HK, N, D], v [B, HK, N, DV] (query head h reads key head h // (H / HK)):

    s[b,h,i,j] = scale * q_i . k_j                       (fp32 accumulation)
    if softcap > 0:      s = softcap * tanh(s / softcap)  (Gemma 2 logit capping)
    if attn_bias float:  s = s + bias[b,h,i,j]            (additive; any float dtype; -inf allowed)
    if attn_bias bool:   s = -inf where not bias[b,h,i,j] (True = attend, SDPA's convention)
    s = -inf where not visible(b, i, j)
    P = softmax_j(s); a row whose scores are all -inf gives P = 0 (out 0, lse -inf, no gradient)
    if dropout_p > 0:    P = P * keep[b,h,i,j] / (1 - dropout_p)   (keep from ``rng.keep_mask``)
    out = P @ v;  lse[b,h,i] = logsumexp_j s[b,h,i,j]  (natural log, before dropout)

``visible`` combines the structured masks, which never exist as tensors:

    Lk_b = clamp(seqlens_k[b], 0, N) if given else N      (key padding: keys j >= Lk_b are invisible)
    Lq_b = clamp(seqlens_q[b], 0, M) if given else M      (query padding: rows i >= Lq_b see nothing)
    shift_b = Lk_b - Lq_b if bottom_right else 0          (alignment of the diagonal)
    visible(b, i, j) = j < Lk_b and i < Lq_b
                       and (left < 0  or j >= i + shift_b - left)
                       and (right < 0 or j <= i + shift_b + right)
                       and block_mask[b, h, i // S, j // S]            (block-sparse, block size S)

``is_causal`` is the window right extent 0 (``right = 0``); a sliding window of W keys including the
diagonal, as Mistral defines it, is ``left = W - 1, right = 0``.  ``-1`` means unbounded.

Bias/mask tensors are 4-D with every dim either 1 (broadcast: read with stride 0, never expanded in memory)
or full size; the gradient of a float bias is returned in the bias's own shape, summed over its broadcast dims.

Fully masked rows: with -inf (bool masks, structured masks, -inf biases) the row gives 0, as PyTorch's math
attention does.  A *finite* additive mask such as ``torch.finfo(dtype).min`` leaves every score finite, so the
row is an ordinary softmax (in eager, usually uniform over the keys); the kernels keep such rows exact by
doing the max subtraction in natural units whenever a float bias is present (``natural_units``), where
multiplying scores of about -3.4e38 by log2(e) first would overflow to -inf.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import LOG2E

__all__ = ["MaskSpec", "KernelArguments", "kernel_arguments", "window_extents", "bias_strides", "block_lists",
           "bias_key_bounds", "sparse_masked", "SPARSE_BLOCK"]

SPARSE_BLOCK = 128  # default block-sparse block size (query and key rows per block)


def window_extents(is_causal: bool, window_left: int, window_right: int) -> tuple[int, int]:
    """(left, right) extents with -1 for unbounded; ``is_causal`` caps the right extent at 0."""
    left = window_left if window_left >= 0 else -1
    right = window_right if window_right >= 0 else -1
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def bias_strides(bias: Tensor) -> tuple[int, int, int, int]:
    """Strides that read a 4-D bias as [B, H, M, N]: 0 along size-1 (broadcast) dims."""
    return tuple(0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride()))


def block_lists(block_mask: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    """From a boolean [Bm, Hm, QB, KB] block mask: with ``rows``, for each query block the ascending list of its
    key blocks (index [Bm, Hm, QB, KB] int32, the first ``count`` entries valid; count [Bm, Hm, QB] int32);
    otherwise the same per key block over query blocks (index [Bm, Hm, KB, QB], count [Bm, Hm, KB])."""
    mask = block_mask.bool()
    if not rows:
        mask = mask.transpose(-1, -2)
    count = mask.sum(-1, dtype=torch.int32)
    # A stable sort of "not kept" puts the kept blocks first, in ascending order.
    index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return index.contiguous(), count.contiguous()


@triton.jit
def _key_bounds_kernel(Bias, Bounds, stride_b, stride_h, stride_n, n_heads, n_keys, dead_value,
                       IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (b, h) row of a row-broadcast bias: (lo, hi, pure) as ``bias_key_bounds`` defines."""
    pid = tl.program_id(0)
    row_ptr = Bias + (pid // n_heads).to(tl.int64) * stride_b + (pid % n_heads).to(tl.int64) * stride_h
    first = n_keys
    stop = n_keys * 0
    count = n_keys * 0
    nonzero_live = n_keys * 0
    normal = n_keys * 0
    for start in range(0, n_keys, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < n_keys
        v = tl.load(row_ptr + idx.to(tl.int64) * stride_n, mask=inside, other=0)
        if IS_BOOL:
            live = inside & (v != 0)
        else:
            v = v.to(tl.float32)
            live = inside & (v != float("-inf")) & (v != dead_value)
            normal += tl.sum((inside & (v > -1e30)).to(tl.int32), 0)
            nonzero_live += tl.sum((live & (v != 0)).to(tl.int32), 0)
        first = tl.minimum(first, tl.min(tl.where(live, idx, n_keys), 0))
        stop = tl.maximum(stop, tl.max(tl.where(live, idx + 1, 0), 0))
        count += tl.sum(live.to(tl.int32), 0)
    if not IS_BOOL:
        # Finite masks everywhere (no clearly live key): eager averages every key, so all keys stay.
        everything = normal == 0
        first = tl.where(everything, 0, first)
        stop = tl.where(everything, n_keys, stop)
        nonzero_live = tl.where(everything, 1, nonzero_live)
        count = tl.where(everything, n_keys, count)
    any_live = count > 0
    pure = any_live & (first == 0) & (count == stop) & (nonzero_live == 0)
    tl.store(Bounds + pid * 3, tl.where(any_live, first, 0))
    tl.store(Bounds + pid * 3 + 1, tl.where(any_live, stop, 0))
    tl.store(Bounds + pid * 3 + 2, pure.to(tl.int32))


def bias_key_bounds(bias: Tensor) -> Optional[Tensor]:
    """For a row-broadcast bias ([B|1, H|1, 1, N]: padding masks), the keys [lo, hi) outside of which every
    key is dead for every row, as int32 [B|1, H|1, 3] (lo, hi, pure); None for other biases.  The kernels skip
    the key blocks outside the bounds (left and right padding); dead keys inside are masked by the bias itself.

    A key whose bias is False, -inf, or (fp32/bf16 biases) exactly ``finfo.min`` contributes exactly 0 to a
    row that has a key with bias above -1e30.  A row without such a key (every key masked with a finite value,
    which eager averages uniformly) keeps all keys; a row of only False/-inf keys gets an empty range (out 0).
    ``pure`` flags right padding proper (live keys exactly [0, hi) with bias 0 / True): the forward then runs
    as with a key length, without reading the bias.  One small kernel launch computes all of it."""
    if bias.dim() != 4 or bias.shape[2] != 1 or bias.shape[3] == 1:
        return None
    from .common import launch

    batch, heads, _, n_keys = bias.shape
    bounds = torch.empty((batch, heads, 3), dtype=torch.int32, device=bias.device)
    is_bool = bias.dtype == torch.bool
    dead = torch.finfo(bias.dtype).min if bias.dtype in (torch.float32, torch.bfloat16) else float("-inf")
    launch(_key_bounds_kernel, (batch * heads,), bias, bounds,
           bias.stride(0), bias.stride(1), bias.stride(3), heads, n_keys, dead, IS_BOOL=is_bool, BLOCK=1024)
    return bounds


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Host-side view of the optional arguments of the op, with the kernel flags derived once."""

    bias: Optional[Tensor] = None
    left: int = -1
    right: int = -1
    bottom_right: bool = False
    seqlens_q: Optional[Tensor] = None
    seqlens_k: Optional[Tensor] = None
    softcap: float = 0.0
    dropout_p: float = 0.0
    rng_state: Optional[Tensor] = None
    block_mask: Optional[Tensor] = None
    block_size: int = SPARSE_BLOCK

    @property
    def bias_kind(self) -> int:
        """0: no bias, 1: additive float bias, 2: boolean mask."""
        if self.bias is None:
            return 0
        return 2 if self.bias.dtype == torch.bool else 1

    @property
    def natural_units(self) -> bool:
        return self.bias_kind == 1

    @property
    def has_dropout(self) -> bool:
        return self.dropout_p > 0.0

    @property
    def drop_scale(self) -> float:
        """The factor kept probabilities are scaled by, 1 / (1 - p); 0 at p = 1, where every one is dropped (as
        with ``F.dropout``: dividing by 1 - p there would give 0 / 0 = NaN)."""
        p = float(self.dropout_p)
        return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@dataclasses.dataclass(frozen=True)
class KernelArguments:
    """The optional-feature arguments every kernel takes, in the kernels' parameter order."""

    tensors: tuple  # Bias, SeqQ, SeqK, Rng, SparseCount, SparseIndex, KeyBounds (a placeholder where absent)
    bias_strides: tuple
    sparse_strides: tuple
    bounds_strides: tuple
    scalars: tuple  # left, right, qk_scale, cap, threshold, drop_scale, n_sparse_cols
    flags: dict

    def with_block_lists(self, spec: MaskSpec, rows: bool) -> "KernelArguments":
        """These arguments with the block-sparse lists of ``spec.block_mask`` filled in: per query block
        (``rows``: forward, dQ pass) or per key block (dK/dV pass).  Unchanged without a block mask."""
        if spec.block_mask is None:
            return self
        index, counts = block_lists(spec.block_mask, rows)
        strides = tuple(0 if size == 1 else stride for size, stride in zip(counts.shape, counts.stride()))
        return dataclasses.replace(self, tensors=self.tensors[:4] + (counts, index) + self.tensors[6:],
                                   sparse_strides=strides, scalars=self.scalars[:6] + (index.shape[-1],))


def kernel_arguments(query: Tensor, spec: MaskSpec, scale: float) -> KernelArguments:
    """Derive the kernel arguments from ``spec`` once per launch group (the forward, or the backward's passes);
    the block-sparse lists, which depend on the pass, come from ``KernelArguments.with_block_lists``."""
    from .rng import keep_threshold

    placeholder = query
    bias = spec.bias
    if bias is None:
        bias_t, b_strides = placeholder, (0, 0, 0, 0)
    else:
        bias_t = bias  # a bool mask is read as Triton int1 (a dtype view would not lower in Inductor)
        b_strides = bias_strides(bias)
    bounds = bias_key_bounds(bias) if bias is not None else None
    bounds_t = placeholder if bounds is None else bounds
    bounds_strides = (0, 0) if bounds is None else tuple(
        0 if size == 1 else stride for size, stride in zip(bounds.shape[:2], bounds.stride()[:2]))
    softcap = float(spec.softcap)
    log_unit = 1.0 if spec.natural_units else LOG2E
    if softcap > 0:
        qk_scale, cap = scale / softcap, softcap * log_unit
    else:
        qk_scale, cap = scale * log_unit, 0.0
    p = float(spec.dropout_p)
    threshold = keep_threshold(p) if p > 0 else 0
    return KernelArguments(
        tensors=(bias_t, _or(spec.seqlens_q, placeholder), _or(spec.seqlens_k, placeholder),
                 _or(spec.rng_state, placeholder), placeholder, placeholder, bounds_t),
        bias_strides=b_strides,
        bounds_strides=bounds_strides,
        sparse_strides=(0, 0, 0),
        scalars=(spec.left, spec.right, qk_scale, cap, threshold, spec.drop_scale, 0),
        flags=dict(BOTTOM_RIGHT=spec.bottom_right, HAS_LEFT=spec.left >= 0, HAS_RIGHT=spec.right >= 0,
                   HAS_SEQ_Q=spec.seqlens_q is not None, HAS_SEQ_K=spec.seqlens_k is not None,
                   BIAS=spec.bias_kind, BIAS_ROW=spec.bias is not None and b_strides[2] == 0,
                   SOFTCAP=softcap > 0, DROPOUT=p > 0,
                   SPARSE_BLOCK=spec.block_size if spec.block_mask is not None else 0,
                   KEY_BOUNDS=bounds is not None),
    )


def sparse_masked(spec: MaskSpec, n_keys: int, tile: int) -> bool:
    """Whether block-sparse tiles need mask arithmetic: some structured mask may cut them, or key tiles of
    ``tile`` rows run past the end of the keys."""
    return (spec.left >= 0 or spec.right >= 0 or spec.seqlens_k is not None
            or not (isinstance(n_keys, int) and n_keys % tile == 0))


def _or(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    return placeholder if t is None else t
