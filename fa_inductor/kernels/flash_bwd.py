"""FlashAttention-2 backward kernels (FLASHATTENTION.md, "FlashAttention-2 backward").

Legend, per (batch b, query head h, key head hk = h // GROUP):
  Q [M, D], K [N, D], V [N, DV], O and dO [M, DV], LSE [M] from the forward.
  P = exp(scale * Q K^T - LSE) is recomputed from LSE, never stored.
Three launches:
  1. preprocess, one program per BLOCK_M rows: Delta_i = rowsum(dO_i * O_i) - dLSE_i (dLSE is the gradient
     flowing into LSE when a caller uses it, else 0) and LSE in log2 units, +inf for rows with no visible key
     so that their recomputed P is exactly 0;
  2. dK/dV, one program per (b, hk, BLOCK_N keys): loops over the GROUP query heads that share the key head
     and over query blocks, accumulating dV += P^T dO and dK += dS^T Q with dS = P * (dP - Delta),
     dP = dO V^T, all in registers: no atomics, no K/V repetition for grouped-query attention;
  3. dQ, one program per (b, h, BLOCK_M queries): loops over key blocks, dQ += dS K.
Both passes skip key/query block pairs that the causal mask empties and split their loops into unmasked and
masked stages, as the forward does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, divides, launch, mma, round_to
from .configs import padded_head_dim

__all__ = ["flash_backward"]


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, DLse, Lse, Delta, LseLog2,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, n_queries, n_m_blocks,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    start_m = (pid % n_m_blocks) * BLOCK_M
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < n_queries) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
                + offs_dv[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * n_queries + offs_m
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < n_queries, other=0.0)
    lse = tl.load(Lse + row, mask=offs_m < n_queries, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + row, delta, mask=offs_m < n_queries)
    tl.store(LseLog2 + row, lse2, mask=offs_m < n_queries)


@triton.jit
def _bwd_kv_stage(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start_m, end_m, offs_n, offs_mb,
                  offs_d, offs_dv, stride_qm, stride_dom, n_queries, shift, qk_scale,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    q_ptrs += tl.cast(start_m, tl.int64) * stride_qm
    do_ptrs += tl.cast(start_m, tl.int64) * stride_dom
    lse_ptrs += start_m
    delta_ptrs += start_m
    for start in range(start_m, end_m, BLOCK_M):
        rows = start + offs_mb
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=(rows[:, None] < n_queries) & (offs_d[None, :] < HEAD_D), other=0.0)
        if EVEN_M:
            lse2 = tl.load(lse_ptrs)
        else:
            # Rows past the end get LSE = +inf, hence P = 0: they contribute nothing and need no mask.
            lse2 = tl.load(lse_ptrs, mask=rows < n_queries, other=float("inf"))
        s_t = mma(k, tl.trans(q), None, DOT_PRECISION, SOFT_BF16)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + shift, p_t, 0.0)
        if EVEN_M and EVEN_DV:
            do = tl.load(do_ptrs)
        else:
            do = tl.load(do_ptrs, mask=(rows[:, None] < n_queries) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        dv = mma(round_to(p_t, do.dtype, SOFT_BF16), do, dv, DOT_PRECISION, SOFT_BF16)
        if EVEN_M:
            delta = tl.load(delta_ptrs)
        else:
            delta = tl.load(delta_ptrs, mask=rows < n_queries, other=0.0)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION, SOFT_BF16)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(round_to(ds_t, q.dtype, SOFT_BF16), q, dk, DOT_PRECISION, SOFT_BF16)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DOut, LseLog2, Delta, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, kv_heads, group, n_queries, n_keys, n_n_blocks, shift, scale, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    bhk = pid // n_n_blocks
    start_n = (pid % n_n_blocks) * BLOCK_N
    off_b = (bhk // kv_heads).to(tl.int64)
    off_hk = (bhk % kv_heads).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_rows = start_n.to(tl.int64) + offs_nb[:, None]
    kv_mask = offs_n[:, None] < n_keys
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + key_rows * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask & (offs_d[None, :] < HEAD_D), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + key_rows * stride_vn + offs_dv[None, :] * stride_vd,
                mask=kv_mask & (offs_dv[None, :] < HEAD_DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query range: [begin, full_begin) sees part of this key block (causal diagonal, masked);
    # [full_begin, end) sees all of it.  Queries before `begin` see none of it and are skipped.
    m_padded = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        begin = (tl.minimum(tl.maximum(start_n - shift, 0), m_padded) // BLOCK_M) * BLOCK_M
        full_begin = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M,
                                m_padded)
        full_begin = tl.maximum(full_begin, begin)
    else:
        begin = 0
        full_begin = 0

    for g in range(0, group):
        off_h = off_hk * group + g
        row0 = (off_b * n_heads + off_h) * n_queries
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_mb[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = (DOut + off_b * stride_dob + off_h * stride_doh + offs_mb[:, None] * stride_dom
                   + offs_dv[None, :] * stride_dod)
        lse_ptrs = LseLog2 + row0 + offs_mb
        delta_ptrs = Delta + row0 + offs_mb
        dk, dv = _bwd_kv_stage(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, begin, full_begin, offs_n,
                               offs_mb, offs_d, offs_dv, stride_qm, stride_dom, n_queries, shift, qk_scale,
                               HEAD_D, HEAD_DV, BLOCK_M, True, EVEN_M, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
        dk, dv = _bwd_kv_stage(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, full_begin, m_padded, offs_n,
                               offs_mb, offs_d, offs_dv, stride_qm, stride_dom, n_queries, shift, qk_scale,
                               HEAD_D, HEAD_DV, BLOCK_M, False, EVEN_M, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)

    dk = dk * scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + key_rows * stride_dkn + offs_d[None, :] * stride_dkd,
             round_to(dk, DK.dtype.element_ty, SOFT_BF16), mask=kv_mask & (offs_d[None, :] < HEAD_D))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + key_rows * stride_dvn + offs_dv[None, :] * stride_dvd,
             round_to(dv, DV.dtype.element_ty, SOFT_BF16), mask=kv_mask & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _bwd_q_stage(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, end_n, offs_m, offs_nb, offs_d, offs_dv,
                 stride_kn, stride_vn, n_keys, shift, qk_scale,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    k_ptrs += tl.cast(start_n, tl.int64) * stride_kn
    v_ptrs += tl.cast(start_n, tl.int64) * stride_vn
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_nb
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_D), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < n_keys) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
        s = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < n_keys
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(keep, p, 0.0)
        dp = mma(do, tl.trans(v), None, DOT_PRECISION, SOFT_BF16)
        ds = p * (dp - delta[:, None])
        dq = mma(round_to(ds, k.dtype, SOFT_BF16), k, dq, DOT_PRECISION, SOFT_BF16)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DOut, LseLog2, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, group, n_queries, n_keys, n_m_blocks, shift, scale, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
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
    offs_mb = tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = start_m.to(tl.int64) + offs_mb[:, None]
    row_mask = offs_m[:, None] < n_queries
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + q_rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask & (offs_d[None, :] < HEAD_D), other=0.0)
    do = tl.load(DOut + off_b * stride_dob + off_h * stride_doh + q_rows * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_mask & (offs_dv[None, :] < HEAD_DV), other=0.0)
    row = bh.to(tl.int64) * n_queries + offs_m
    lse2 = tl.load(LseLog2 + row, mask=offs_m < n_queries, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < n_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_nb[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_nb[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if IS_CAUSAL:
        end = tl.minimum(n_keys, tl.maximum(start_m + BLOCK_M + shift, 0))
        full_end = tl.minimum(tl.maximum(start_m + shift + 1, 0), n_keys)
    else:
        end = n_keys
        full_end = n_keys
    full_end = (full_end // BLOCK_N) * BLOCK_N
    dq = _bwd_q_stage(dq, q, do, lse2, delta, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_nb, offs_d, offs_dv,
                      stride_kn, stride_vn, n_keys, shift, qk_scale,
                      HEAD_D, HEAD_DV, BLOCK_N, False, IS_CAUSAL, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
    dq = _bwd_q_stage(dq, q, do, lse2, delta, k_ptrs, v_ptrs, full_end, end, offs_m, offs_nb, offs_d, offs_dv,
                      stride_kn, stride_vn, n_keys, shift, qk_scale,
                      HEAD_D, HEAD_DV, BLOCK_N, True, IS_CAUSAL, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
    dq = dq * scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + q_rows * stride_dqm + offs_d[None, :] * stride_dqd
    if EVEN_M and EVEN_D:
        tl.store(dq_ptrs, round_to(dq, DQ.dtype.element_ty, SOFT_BF16))
    else:
        tl.store(dq_ptrs, round_to(dq, DQ.dtype.element_ty, SOFT_BF16), mask=row_mask & (offs_d[None, :] < HEAD_D))


def flash_backward(grad_out, q, k, v, out, lse, grad_lse, dq, dk, dv, scale: float, is_causal: bool,
                   bottom_right: bool, cfg_kv, cfg_q, dot: dict) -> None:
    """Launch the three backward kernels, writing dq, dk, dv (shapes of q, k, v; any strides)."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    head_dv = v.shape[3]
    shift = (n_keys - n_queries) if bottom_right else 0
    block_d, block_dv = padded_head_dim(head_d), padded_head_dim(head_dv)
    # Row statistics are indexed as contiguous [B, H, M]; these are B*H*M floats, so copies are cheap.
    lse = lse.contiguous()
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    delta = torch.empty_like(lse)
    lse_log2 = torch.empty_like(lse)

    pre_block = 64
    n_pre = triton.cdiv(n_queries, pre_block)
    launch(
        _bwd_preprocess_kernel, (n_pre * batch * heads,),
        out, grad_out, grad_lse if grad_lse is not None else lse, lse, delta, lse_log2,
        *out.stride(), *grad_out.stride(), heads, n_queries, n_pre,
        HEAD_DV=head_dv, BLOCK_M=pre_block, BLOCK_DV=block_dv, HAS_DLSE=grad_lse is not None,
    )
    common = dict(HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_DV=block_dv, IS_CAUSAL=is_causal,
                  **dot)
    n_n_blocks = triton.cdiv(n_keys, cfg_kv.block_n)
    launch(
        _bwd_kv_kernel, (n_n_blocks * batch * kv_heads,),
        q, k, v, grad_out, lse_log2, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        heads, kv_heads, heads // kv_heads, n_queries, n_keys, n_n_blocks, shift, scale, scale * LOG2E,
        BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, EVEN_M=divides(cfg_kv.block_m, n_queries),
        **common, **cfg_kv.launch_options(),
    )
    n_m_blocks = triton.cdiv(n_queries, cfg_q.block_m)
    launch(
        _bwd_q_kernel, (n_m_blocks * batch * heads,),
        q, k, v, grad_out, lse_log2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        heads, heads // kv_heads, n_queries, n_keys, n_m_blocks, shift, scale, scale * LOG2E,
        BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, EVEN_M=divides(cfg_q.block_m, n_queries),
        **common, **cfg_q.launch_options(),
    )

