"""Triton helpers shared by the forward and backward kernels: sequence bounds, the key (or query) ranges a
tile must visit, and the score tile with softcap, bias and masks applied (semantics: ``masking.py``).

Index arguments are broadcastable 2-D tensors (``qi`` query rows, ``kj`` key columns), so the same helper
serves a [BLOCK_M, BLOCK_N] tile (forward, dQ: ``qi = rows[:, None]``) and its transpose (dK/dV pass).
Ranges come as four multiples of the block size ``lo <= full_lo <= full_hi <= hi``: [lo, full_lo) and
[full_hi, hi) hold partly visible blocks (masked stage), [full_lo, full_hi) fully visible ones (no mask
arithmetic at all); blocks outside [lo, hi) are invisible to every row of the tile and are never loaded.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E_JIT

__all__ = ["sequence_bounds", "key_range", "bounded_key_range", "query_range", "score_tile", "tanh"]


@triton.jit
def sequence_bounds(SeqQ, SeqK, off_b, n_queries, n_keys,
                    HAS_SEQ_Q: tl.constexpr, HAS_SEQ_K: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(Lq, Lk, shift) of batch element ``off_b``: valid query rows, valid keys, diagonal offset."""
    lq = n_queries
    lk = n_keys
    if HAS_SEQ_Q:
        lq = tl.minimum(tl.maximum(tl.load(SeqQ + off_b).to(tl.int32), 0), n_queries)
    if HAS_SEQ_K:
        lk = tl.minimum(tl.maximum(tl.load(SeqK + off_b).to(tl.int32), 0), n_keys)
    shift = lk * 0
    if BOTTOM_RIGHT:
        shift = lk - lq
    return lq, lk, shift


@triton.jit
def key_range(start_m, lq, lk, shift, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks seen by query rows [start_m, start_m + BLOCK_M): (lo, full_lo, full_hi, hi)."""
    last = start_m + BLOCK_M - 1
    hi = tl.where(start_m < lq, lk, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.maximum(last + shift + right + 1, 0))
    lo = hi * 0
    full_lo = lo
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(start_m + shift - left, 0), hi) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last + shift - left, 0), BLOCK_N) * BLOCK_N
    full_hi = lk
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + shift + right + 1, 0))
    full_hi = full_hi // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_range(start_n, lq, lk, shift, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see keys [start_n, start_n + BLOCK_N): (lo, full_lo, full_hi, hi).  Rows at or past
    Lq (and past M) carry LSE = +inf in the backward, so they contribute nothing and need no mask."""
    last = start_n + BLOCK_N - 1
    hi = tl.where(start_n < lk, lq, 0)
    if HAS_LEFT:
        hi = tl.minimum(hi, tl.maximum(last - shift + left + 1, 0))
    hi = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    lo = hi * 0
    full_lo = lo
    if HAS_RIGHT:
        lo = tl.minimum(tl.maximum(start_n - shift - right, 0), hi) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last - shift - right, 0), BLOCK_M) * BLOCK_M
    full_hi = hi
    if HAS_LEFT:
        full_hi = tl.maximum(start_n - shift + left + 1, 0) // BLOCK_M * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    # A key block crossing Lk is partly invisible to every row: all of it goes to the masked stage.
    full_lo = tl.where(last < lk, full_lo, hi)
    full_hi = tl.where(last < lk, full_hi, hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def bounded_key_range(lo, full_lo, full_hi, hi, KeyBounds, off_b, off_h, stride_kbb, stride_kbh,
                      BLOCK_N: tl.constexpr, KEY_BOUNDS: tl.constexpr):
    """Narrow a key range to the keys a padding bias leaves alive (``masking.bias_key_bounds``)."""
    if KEY_BOUNDS:
        bounds = KeyBounds + off_b * stride_kbb + off_h * stride_kbh
        key_lo = tl.load(bounds)
        key_hi = tl.load(bounds + 1)
        hi = tl.minimum(hi, key_hi)
        lo = tl.minimum(tl.maximum(lo, key_lo // BLOCK_N * BLOCK_N), hi)
        full_hi = tl.minimum(full_hi, key_hi // BLOCK_N * BLOCK_N)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def tanh(x):
    """tanh, portable to every Triton version and its interpreter; saturates to +-1.  Through exp2 for
    |x| >= 0.3; below, where ``1 - 2 / (e^2x + 1)`` would cancel (relative error ~eps / x), its odd Taylor
    polynomial to x^9 (truncation below fp32's eps there)."""
    x2 = x * x
    poly = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.3, poly, 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E_JIT)) + 1.0))


@triton.jit
def score_tile(qk, qi, kj, bias_ptr, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right,
               qk_scale, cap, MASKED: tl.constexpr, CHECK_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr, BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores from raw products ``qk`` (fp32): returns (s, t).  ``s`` is in log2 units (qk_scale and cap
    carry log2(e)) without a float bias, in natural units with one (``BIAS == 1``); invisible entries are
    -inf.  ``t`` is tanh of the capped argument (SOFTCAP; the backward needs 1 - t^2), else ``qk``.

    ``bias_ptr`` points at bias[b, h, 0, 0]; BIAS: 0 none, 1 additive float, 2 boolean (stored as uint8).
    BIAS_ROW: the bias is the same for every query row (padding masks [B, 1, 1, N]): one vector load per tile."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        s = t * cap
    else:
        t = qk
        s = qk * qk_scale
    if BIAS_ROW:
        if MASKED:
            b = tl.load(bias_ptr + kj * stride_bn, mask=kj < n_keys, other=0)
        else:
            b = tl.load(bias_ptr + kj * stride_bn)
    elif BIAS != 0:
        ptrs = bias_ptr + qi.to(tl.int64) * stride_bm + kj * stride_bn
        if MASKED or CHECK_ROWS:
            b = tl.load(ptrs, mask=(qi < n_queries) & (kj < n_keys), other=0)
        else:
            b = tl.load(ptrs)
    if BIAS == 1:
        s = s + b.to(tl.float32)
    elif BIAS == 2:
        s = tl.where(b != 0, s, float("-inf"))
    if MASKED:
        keep = kj < lk
        if HAS_LEFT:
            keep = keep & (kj >= qi + shift - left)
        if HAS_RIGHT:
            keep = keep & (kj <= qi + shift + right)
        s = tl.where(keep, s, float("-inf"))
    return s, t
