"""Split-KV forward for decode steps (flash decoding): few queries against many keys.

With M <= 16 new queries the FA2 forward has one program per (batch, query head): a handful of programs for a
132-SM GPU, each streaming the whole KV cache.  Here instead:

  * the G query heads that share a key/value head (grouped-query attention) are packed with their M queries
    into one tile of G * M rows, so each K/V block is loaded once per group, not G times;
  * the keys are cut into ``n_splits`` chunks, one program each, so that about one program runs per SM;
  * every program writes its chunk's normalised partial output, running max m_s and sum l_s (fp32), and a
    second small kernel combines the chunks, weighting each by l_s exp(m_s - max_s m_s).

The arithmetic is the forward's (``masking.py`` semantics), in natural units throughout: a decode step is bound
by reading K and V, so the extra multiply costs nothing and finite ``finfo.min`` biases stay exact.  Supported:
causal / sliding window (either alignment), a float bias or boolean mask tensor, softcapping.  Key/query length
tensors, dropout and block-sparse masks go to the FA2 forward (``eligible``).  The backward of a decode step is
the FA2 backward: it needs only ``out`` and ``lse``, which are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E_JIT, launch, mma, sm_count
from .configs import padded_head_dim
from .masking import bias_strides
from .tile import tanh

__all__ = ["eligible", "flash_decode", "MAX_QUERIES", "MAX_ROWS"]

MAX_QUERIES = 16   # queries per (batch, head) that count as a decode step
MAX_ROWS = 64      # G * M rows packed into one tile at most
PROGRAMS_PER_SM = 1  # measured on an H100 (bench_decode sweep): more splits only add combine work
MAX_SPLITS = 128   # key chunks per (batch, key head) at most
# (BLOCK_N, num_warps, num_stages) of the split kernel: the H100 sweep found one best for head dims 64 and 128
SPLIT_CONFIG = (64, 4, 3)


@triton.jit
def _decode_split_kernel(Q, K, V, Bias, OutPart, StatPart,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                         stride_vn, stride_bb, stride_bh, stride_bm, stride_bn,
                         kv_heads, group, n_queries, n_keys, chunk, n_splits, left, right, qk_scale, cap,
                         HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr,
                         SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Program (b * kv_heads + hk, split): the packed rows of key head hk over keys [split * chunk, +chunk)."""
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    # Inductor passes Python floats as fp64 scalars: keep the arithmetic in fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.cast(cap, tl.float32)
    b = bhk // kv_heads
    hk = bhk % kv_heads
    rows = tl.arange(0, BLOCK_R)
    n_rows = group * n_queries
    row_ok = rows < n_rows
    i = rows % n_queries
    h = hk * group + rows // n_queries
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64)[:, None] * stride_qh
              + i.to(tl.int64)[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    shift = n_keys * 0
    if BOTTOM_RIGHT:
        shift = n_keys - n_queries
    start = split * chunk
    stop = tl.minimum(start + chunk, n_keys)
    # Keys no row of this tile can see are never loaded: below the window of the first query, past the
    # diagonal (plus right extent) of the last one.
    if HAS_LEFT:
        start = tl.maximum(start, shift - left)
    if HAS_RIGHT:
        stop = tl.minimum(stop, n_queries + shift + right)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    bias_base = (Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64)[:, None] * stride_bh
                 + i.to(tl.int64)[:, None] * stride_bm)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        inside = cols < stop
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                    mask=inside[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        s = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16) * qk_scale
        if SOFTCAP:
            s = cap * tanh(s)
        visible = inside[None, :] & row_ok[:, None]
        if BIAS == 1:
            s += tl.load(bias_base + cols.to(tl.int64)[None, :] * stride_bn, mask=visible, other=0.0).to(tl.float32)
        if BIAS == 2:
            keep = tl.load(bias_base + cols.to(tl.int64)[None, :] * stride_bn, mask=visible, other=0)
            visible = visible & (keep != 0)
        if HAS_RIGHT:
            visible = visible & (cols[None, :] <= i[:, None] + shift + right)
        if HAS_LEFT:
            visible = visible & (cols[None, :] >= i[:, None] + shift - left)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_ref[:, None]) * LOG2E_JIT)
        alpha = tl.math.exp2((m_i - m_ref) * LOG2E_JIT)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :],
                    mask=inside[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, SOFT_BF16)
        m_i = m_new
    # The running max and sum, not their logsumexp: m + log(l) rounds to m when m is about -3.4e38 (a row
    # of finfo.min scores), which would weigh the chunks equally instead of by their sizes.
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    part = bhk.to(tl.int64) * n_splits + split
    tl.store(StatPart + part * 2 * BLOCK_R + rows, m_i)
    tl.store(StatPart + part * 2 * BLOCK_R + BLOCK_R + rows, l_i)
    tl.store(OutPart + (part * BLOCK_R + rows)[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _decode_combine_kernel(OutPart, StatPart, Out, Lse, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                           kv_heads, group, n_queries, n_splits,
                           HEAD_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    """Program (bhk, row): with M = max_s m_s and w_s = l_s exp(m_s - M) over the splits,
    out = sum_s w_s out_s / sum_s w_s and lse = M + log(sum_s w_s), all splits loaded at once."""
    bhk = tl.program_id(0)
    row = tl.program_id(1)
    b = bhk // kv_heads
    hk = bhk % kv_heads
    i = row % n_queries
    h = hk * group + row // n_queries
    splits = tl.arange(0, BLOCK_S)
    live_split = splits < n_splits
    part = bhk.to(tl.int64) * n_splits + splits
    m_s = tl.load(StatPart + part * 2 * BLOCK_R + row, mask=live_split, other=float("-inf"))
    l_s = tl.load(StatPart + part * 2 * BLOCK_R + BLOCK_R + row, mask=live_split, other=0.0)
    m = tl.max(m_s, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = l_s * tl.math.exp2((m_s - m_ref) * LOG2E_JIT)
    total = tl.sum(w, 0)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_s = tl.load(OutPart + (part * BLOCK_R + row)[:, None] * BLOCK_DV + offs_dv[None, :],
                  mask=live_split[:, None], other=0.0)
    live = total > 0.0
    acc = tl.sum(w[:, None] * o_s, 0) / tl.where(live, total, 1.0)
    lse = tl.where(live, m_ref + tl.log(tl.where(live, total, 1.0)), float("-inf"))
    out_ptr = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
    tl.store(out_ptr + offs_dv, acc.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DV)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + i, lse)


def eligible(q: torch.Tensor, k: torch.Tensor, spec) -> bool:
    """Whether the split-KV decode path computes this call: at most MAX_QUERIES queries whose grouped rows fit
    one tile, unit-stride head dims, and only the features it implements (see the module docstring)."""
    n_queries, heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    return (isinstance(n_queries, int) and n_queries <= MAX_QUERIES and (heads // kv_heads) * n_queries <= MAX_ROWS
            and spec.seqlens_q is None and spec.seqlens_k is None and spec.block_mask is None
            and not spec.has_dropout)


def _splits(device: torch.device, programs, n_keys, block_n: int):
    """(chunk, n_splits, max_splits): about PROGRAMS_PER_SM programs per SM, each chunk a whole number of key
    blocks, and a static bound on n_splits (the combine kernel's tile).  Symbolic lengths or batch sizes
    (dynamic shapes) stay symbolic: no guard, no recompilation as the cache grows."""
    sms = sm_count(device) if device.type == "cuda" else 4
    target = PROGRAMS_PER_SM * sms
    wanted = -(-target // programs) if isinstance(programs, int) else target
    max_splits = triton.next_power_of_2(max(1, min(wanted, MAX_SPLITS)))
    per_split = torch.sym_max(1, -(-n_keys // max_splits))
    chunk = -(-per_split // block_n) * block_n
    return chunk, torch.sym_max(1, -(-n_keys // chunk)), max_splits


def flash_decode(q, k, v, out, lse, scale: float, spec, dot: dict) -> None:
    """Write ``out`` [B, H, M, DV] and ``lse`` [B, H, M] (fp32) for an ``eligible`` call."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys, head_dv = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    block_r = max(16, triton.next_power_of_2(group * n_queries))
    block_d, block_dv = padded_head_dim(head_d), padded_head_dim(head_dv)
    block_n, num_warps, num_stages = SPLIT_CONFIG
    chunk, n_splits, max_splits = _splits(q.device, batch * kv_heads, n_keys, block_n)
    out_part = q.new_empty((batch * kv_heads, n_splits, block_r, block_dv), dtype=torch.float32)
    stat_part = q.new_empty((batch * kv_heads, n_splits, 2, block_r), dtype=torch.float32)
    bias = spec.bias
    if bias is None:
        bias_t, b_strides = q, (0, 0, 0, 0)
    else:
        bias_t = bias  # a bool mask is read as Triton int1 (a dtype view would not lower in Inductor)
        b_strides = bias_strides(bias)
    softcap = float(spec.softcap)
    qk_scale, cap = (scale / softcap, softcap) if softcap > 0 else (scale, 1.0)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    launch(_decode_split_kernel, (batch * kv_heads, n_splits),
           q, k, v, bias_t, out_part, stat_part,
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
           v.stride(2), *b_strides,
           kv_heads, group, n_queries, n_keys, chunk, n_splits, spec.left, spec.right, qk_scale, cap,
           HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
           BOTTOM_RIGHT=spec.bottom_right, HAS_LEFT=spec.left >= 0, HAS_RIGHT=spec.right >= 0,
           BIAS=spec.bias_kind, SOFTCAP=softcap > 0, **dot, num_warps=num_warps, num_stages=num_stages)
    launch(_decode_combine_kernel, (batch * kv_heads, group * n_queries),
           out_part, stat_part, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
           kv_heads, group, n_queries, n_splits,
           HEAD_DV=head_dv, BLOCK_R=block_r, BLOCK_DV=block_dv, BLOCK_S=max_splits, num_warps=4)
