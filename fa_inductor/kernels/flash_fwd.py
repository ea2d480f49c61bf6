"""FlashAttention-2 forward kernel (FLASHATTENTION.md, "FlashAttention-2 forward").

Legend, per (batch b, query head h):
  Q  [M, D]   M query rows, head dim D (padded to BLOCK_D by masked loads)
  K  [N, D]   N key rows of key head h // GROUP (grouped-query attention without repeating K/V)
  V  [N, DV]  value head dim DV may differ from D
  O  [M, DV]  output;  LSE [M] the natural-log logsumexp of each scaled score row (what the backward needs)
One program computes BLOCK_M query rows of one (b, h): it loads Q_i once, streams K_j/V_j blocks with the online
softmax (running max m_i and sum l_i kept in log2 units, the scale times log2(e) folded into one multiply),
divides by l_i once at the end and writes O_i and LSE_i.

Causal masking keeps key j for query i when j <= i + SHIFT (SHIFT = 0: SDPA's top-left alignment;
SHIFT = N - M: bottom-right, as in prefill with a KV cache).  The key loop runs in two stages: blocks that no
row masks (no mask arithmetic at all), then the diagonal / ragged-tail blocks with masks; key blocks past the
diagonal are never visited.  Rows with no visible key produce O = 0 and LSE = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, divides, launch, mma, round_to
from .configs import padded_head_dim

__all__ = ["flash_forward"]


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, end_n, offs_m, offs_n, offs_d, offs_dv,
               stride_kn, stride_vn, n_keys, shift, qk_scale,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, FOLD_SCALE: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    k_ptrs += tl.cast(start_n, tl.int64) * stride_kn
    v_ptrs += tl.cast(start_n, tl.int64) * stride_vn
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_D), other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
        s = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16)
        if MASKED:
            keep = cols[None, :] < n_keys
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_ref[:, None])
        elif FOLD_SCALE:
            # scale >= 0, so max(s) * scale == max(s * scale): one fused multiply-add per score.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
            p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        else:
            s = s * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
            p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < n_keys) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        elif EVEN_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
        acc = mma(round_to(p, v.dtype, SOFT_BF16), v, acc, DOT_PRECISION, SOFT_BF16)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, group, n_queries, n_keys, n_m_blocks, shift, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, FOLD_SCALE: tl.constexpr,
    EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_D)
    tl.static_assert(BLOCK_DV >= HEAD_DV)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    # One flat grid axis (no 65535 limit): query blocks of one head are adjacent in launch order, so the
    # programs running together share K/V in L2.  Causal: the longest rows (last query blocks) go first.
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    m_block = pid % n_m_blocks
    if IS_CAUSAL:
        m_block = n_m_blocks - 1 - m_block
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    off_hk = off_h // group
    start_m = m_block * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
              + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key range: [0, full_end) needs no mask; [full_end, end) is masked (causal diagonal, ragged tail).
    if IS_CAUSAL:
        end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + shift, 0))
        full_end = tl.minimum(tl.maximum(start_m + shift + 1, 0), n_keys)
    else:
        end = n_keys
        full_end = n_keys
    full_end = (full_end // BLOCK_N) * BLOCK_N

    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, offs_d, offs_dv,
                               stride_kn, stride_vn, n_keys, shift, qk_scale,
                               HEAD_D, HEAD_DV, BLOCK_N, False, IS_CAUSAL, FOLD_SCALE, EVEN_D, EVEN_DV,
                               DOT_PRECISION, SOFT_BF16)
    acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end, end, offs_m, offs_n, offs_d, offs_dv,
                               stride_kn, stride_vn, n_keys, shift, qk_scale,
                               HEAD_D, HEAD_DV, BLOCK_N, True, IS_CAUSAL, FOLD_SCALE, EVEN_D, EVEN_DV,
                               DOT_PRECISION, SOFT_BF16)

    # Rows with no visible key (l = 0) give 0, as PyTorch's math attention does for fully masked rows.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453

    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
              + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_dv[None, :] * stride_od)
    o = round_to(acc, Out.dtype.element_ty, SOFT_BF16)
    if EVEN_M and EVEN_DV:
        tl.store(o_ptrs, o)
    else:
        tl.store(o_ptrs, o, mask=(offs_m[:, None] < n_queries) & (offs_dv[None, :] < HEAD_DV))
    lse_ptrs = Lse + bh.to(tl.int64) * n_queries + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < n_queries)


def flash_forward(q, k, v, out, lse, scale: float, is_causal: bool, bottom_right: bool, cfg, dot: dict):
    """Launch the forward kernel.  q [B, H, M, D], k [B, HK, N, D], v [B, HK, N, DV], any strides;
    out [B, H, M, DV] and lse [B, H, M] (contiguous, fp32) are written.  ``dot``: ``common.dot_options``."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    head_dv = v.shape[3]
    n_m_blocks = triton.cdiv(n_queries, cfg.block_m)
    grid = (n_m_blocks * batch * heads,)
    launch(
        _flash_fwd_kernel, grid,
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, heads // kv_heads, n_queries, n_keys, n_m_blocks,
        (n_keys - n_queries) if bottom_right else 0, scale * LOG2E,
        HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=padded_head_dim(head_d), BLOCK_DV=padded_head_dim(head_dv), IS_CAUSAL=is_causal, FOLD_SCALE=scale >= 0,
        EVEN_M=divides(cfg.block_m, n_queries), **dot,
        **cfg.launch_options(),
    )

