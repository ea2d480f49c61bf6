"""FlashAttention-2 backward kernels (FLASHATTENTION.md, "FlashAttention-2 backward").

Legend, per (batch b, query head h, key head hk = h // GROUP):
  Q [M, D], K [N, D], V [N, DV], O and dO [M, DV], LSE [M] from the forward.
  P = exp(S - LSE) is recomputed from the scores S (``tile.score_tile``: scale, softcap, bias, masks), never
  stored; so is the dropout keep-mask Z (``rng.py``).
Three launches:
  1. preprocess, one program per BLOCK_M rows: Delta_i = rowsum(dO_i * O_i) - dLSE_i (dLSE is the gradient
     flowing into LSE when a caller uses it, else 0) and LSE in the units the scores use (log2 unless a float
     bias is present), +inf for rows with no visible key so that their recomputed P is exactly 0;
  2. dK/dV, one program per (b, hk, BLOCK_N keys): loops over the GROUP query heads that share the key head
     and over the query blocks that see these keys (``tile.query_range``, or the block-sparse lists),
     accumulating dV += (P Z / (1 - p))^T dO and dK += dS^T Q with dS = P * (dP Z / (1 - p) - Delta),
     dP = dO V^T, all in registers: no atomics, no K/V repetition for grouped-query attention;
  3. dQ, one program per (b, h, BLOCK_M queries): loops over the key blocks the forward visited, dQ += dS K;
     it also writes the bias gradient dS (summed over the bias's broadcast dims, with atomics only then).
Softcapping multiplies dS by 1 - tanh^2 before the products with Q and K.  With a float bias, rows whose scores
are all near -3.4e38 (a finite ``finfo.min`` mask over every key) lose log(l) from LSE to rounding; a fourth,
normally empty, launch recomputes l for those rows only (``_bwd_saturated_rows_kernel``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E_JIT, divides, head_group, launch, mma, round_to, tile_coords
from .configs import padded_head_dim
from .masking import kernel_arguments, sparse_masked
from .rng import philox_keep
from .tile import bounded_key_range, key_range, query_range, score_tile, sequence_bounds

__all__ = ["flash_backward", "scale_rows"]


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, DLse, Lse, Delta, LseUnits,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, n_queries, n_m_blocks, lo_offset,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
    NATURAL: tl.constexpr,
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
    if not NATURAL:
        lse = lse * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    tl.store(Delta + row, delta, mask=offs_m < n_queries)
    tl.store(LseUnits + row, lse, mask=offs_m < n_queries)
    if NATURAL:
        tl.store(LseUnits + lo_offset + row, tl.zeros_like(lse), mask=offs_m < n_queries)


@triton.jit
def _scale_rows_kernel(Src, Dst, scale, stride_db, stride_dh, stride_dm, n_heads, n_rows, n_row_blocks,
                       HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Dst[b, h, rows] = (scale * Src[b, h, rows]) in Dst's dtype, for one block of rows: Src is a contiguous fp32
    [B, H, M, HEAD_D] buffer, Dst any [B, H, M, HEAD_D] tensor with a unit-stride last dim."""
    pid = tl.program_id(0)
    bh = pid // n_row_blocks
    offs_m = (pid % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    inside = offs_m[:, None] < n_rows
    src = Src + (bh.to(tl.int64) * n_rows + offs_m[:, None]) * HEAD_D + offs_d[None, :]
    dst = (Dst + (bh // n_heads).to(tl.int64) * stride_db + (bh % n_heads).to(tl.int64) * stride_dh
           + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :])
    tl.store(dst, (tl.load(src, mask=inside) * scale).to(Dst.dtype.element_ty), mask=inside)


def scale_rows(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    """``dst.copy_(src * scale)`` for a contiguous fp32 ``src`` [B, H, M, D] (D a power of two) and a ``dst`` of
    its shape with a unit-stride last dim, in one pass that reads ``src`` in order and writes whole rows of
    ``dst``.  The one-pass backward's dQ leaves its fp32 sum this way: ``torch.mul(src, scale, out=dst)`` into a
    16-bit ``dst`` laid out [B, M, H, D] takes twice as long on an H100."""
    batch, heads, n_rows, head_d = src.shape
    if not (src.is_contiguous() and src.dtype == torch.float32 and dst.shape == src.shape and dst.stride(3) == 1
            and head_d & (head_d - 1) == 0):
        raise ValueError("scale_rows needs a contiguous fp32 source, a destination of its shape with unit-stride "
                         f"rows and a power-of-two head dim; got {src.dtype} {tuple(src.shape)} "
                         f"{src.stride()} -> {tuple(dst.shape)} {dst.stride()}")
    block_m = max(1, 4096 // head_d)
    n_row_blocks = triton.cdiv(n_rows, block_m)
    if batch * heads * n_row_blocks == 0:
        return
    launch(_scale_rows_kernel, (batch * heads * n_row_blocks,), src, dst, scale, dst.stride(0), dst.stride(1),
           dst.stride(2), heads, n_rows, n_row_blocks, HEAD_D=head_d, BLOCK_M=block_m, num_warps=4)


@triton.jit
def _bwd_saturated_rows_kernel(
    Q, K, LseUnits, Bias, SeqQ, SeqK, Rng, SparseCount, SparseIndex, KeyBounds,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sb, stride_sh, stride_sq,
    stride_kbb, stride_kbh,
    n_heads, group, n_queries, n_keys, n_m_blocks, left, right, qk_scale, cap, threshold, drop_scale,
    n_sparse_cols, lo_offset,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEQ_Q: tl.constexpr,
    HAS_SEQ_K: tl.constexpr, BIAS: tl.constexpr, BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr, KEY_BOUNDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Rows whose scores are all about -3.4e38 (a finite ``finfo.min`` mask over every key): LSE = m + log(l)
    has lost log(l) to rounding, so P = exp(S - LSE) would be 1, not 1/l.  Recompute l for those rows only
    and store log2(l) next to LSE; the other programs find no such row and visit no key."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    cap = tl.cast(cap, tl.float32)
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    start_m = (pid % n_m_blocks) * BLOCK_M
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    off_hk = off_h // group
    lq, lk, shift = sequence_bounds(SeqQ, SeqK, off_b, n_queries, n_keys, HAS_SEQ_Q, HAS_SEQ_K, BOTTOM_RIGHT)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row = bh.to(tl.int64) * n_queries + offs_m
    lse = tl.load(LseUnits + row, mask=offs_m < n_queries, other=0.0)
    # From |LSE| = 2^30 on, one fp32 ulp is 128 > log(l) for any l < 2^31 keys: m + log(l) rounds to m.
    saturated = (tl.abs(lse) >= 1073741824.0) & (lse != float("inf"))
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd, mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_D),
                other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    bias_ptr = Bias + off_b * stride_bb + off_h * stride_bh
    lo, full_lo, full_hi, hi = key_range(start_m, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT,
                                         HAS_RIGHT)
    lo, full_lo, full_hi, hi = bounded_key_range(lo, full_lo, full_hi, hi, KeyBounds, off_b, off_h, stride_kbb,
                                                 stride_kbh, BLOCK_N, KEY_BOUNDS)
    hi = tl.where(tl.max(saturated.to(tl.int32), 0) > 0, hi, lo)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_spans = 1
    if SPARSE_BLOCK > 0:
        sparse_row = off_b * stride_sb + off_h * stride_sh + (start_m // SPARSE_BLOCK) * stride_sq
        n_spans = tl.where(hi > lo, tl.load(SparseCount + sparse_row), 0)
    for span in range(0, n_spans):
        span_lo = lo
        span_hi = hi
        if SPARSE_BLOCK > 0:
            k_block = tl.load(SparseIndex + sparse_row * n_sparse_cols + span)
            span_lo = tl.maximum(k_block * SPARSE_BLOCK, lo)
            span_hi = tl.minimum(k_block * SPARSE_BLOCK + SPARSE_BLOCK, hi)
        for start in range(span_lo, span_hi, BLOCK_N):
            cols = start + offs_n
            k = tl.load(k_base + tl.cast(start, tl.int64) * stride_kn,
                        mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_D), other=0.0)
            qk = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16)
            s, t_unused = score_tile(qk, offs_m[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn, n_queries,
                                     n_keys, lk, shift, left, right, qk_scale, cap, True, True, HAS_LEFT, HAS_RIGHT,
                                     BIAS, BIAS_ROW, SOFTCAP)
            l_i += tl.sum(tl.math.exp2((s - lse[:, None]) * LOG2E_JIT), 1)
    lse_lo = tl.where(saturated & (l_i > 0), tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    tl.store(LseUnits + lo_offset + row, lse_lo, mask=offs_m < n_queries)


@triton.jit
def _bwd_kv_stage(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, lo_offset, delta_ptrs, bias_ptr, sparse_ptr, start_m,
                  end_m,
                  offs_n, offs_mb, offs_d, offs_dv, stride_qm, stride_dom, stride_bm, stride_bn, n_queries, n_keys,
                  lk,
                  shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold, drop_scale,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
                  SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
                  EVEN_DV: tl.constexpr, SPARSE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  SOFT_BF16: tl.constexpr):
    """Query tiles [start_m, end_m) in steps of BLOCK_M; block-sparse (SPARSE_BLOCK > 0): tiles start_m ...
    end_m - 1 of the query blocks listed at ``sparse_ptr``, in one flat loop."""
    NATURAL: tl.constexpr = BIAS == 1
    STEP: tl.constexpr = 1 if SPARSE_BLOCK > 0 else BLOCK_M
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_M if SPARSE_BLOCK > 0 else 1
    for it in range(start_m, end_m, STEP):
        if SPARSE_BLOCK > 0:
            start = tl.load(sparse_ptr + it // TILES) * SPARSE_BLOCK + (it % TILES) * BLOCK_M
        else:
            start = it
        rows = start + offs_mb
        q_ptrs_t = q_ptrs + tl.cast(start, tl.int64) * stride_qm
        do_ptrs_t = do_ptrs + tl.cast(start, tl.int64) * stride_dom
        lse_ptrs_t = lse_ptrs + start
        delta_ptrs_t = delta_ptrs + start
        if EVEN_M and EVEN_D:
            q = tl.load(q_ptrs_t)
        else:
            q = tl.load(q_ptrs_t, mask=(rows[:, None] < n_queries) & (offs_d[None, :] < HEAD_D), other=0.0)
        if EVEN_M:
            lse = tl.load(lse_ptrs_t)
        else:
            # Rows past the end get LSE = +inf, hence P = 0: they contribute nothing and need no mask.
            lse = tl.load(lse_ptrs_t, mask=rows < n_queries, other=float("inf"))
        qk_t = mma(k, tl.trans(q), None, DOT_PRECISION, SOFT_BF16)
        s_t, t_t = score_tile(qk_t, rows[None, :], offs_n[:, None], bias_ptr, stride_bm, stride_bn, n_queries,
                              n_keys, lk, shift, left, right, qk_scale, cap, MASKED, not EVEN_M, HAS_LEFT,
                              HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP)
        if NATURAL:
            if EVEN_M:
                lse_lo = tl.load(lse_ptrs_t + lo_offset)
            else:
                lse_lo = tl.load(lse_ptrs_t + lo_offset, mask=rows < n_queries, other=0.0)
            p_t = tl.math.exp2((s_t - lse[None, :]) * LOG2E_JIT - lse_lo[None, :])
        else:
            p_t = tl.math.exp2(s_t - lse[None, :])
        if EVEN_M and EVEN_DV:
            do = tl.load(do_ptrs_t)
        else:
            do = tl.load(do_ptrs_t, mask=(rows[:, None] < n_queries) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        if EVEN_M:
            delta = tl.load(delta_ptrs_t)
        else:
            delta = tl.load(delta_ptrs_t, mask=rows < n_queries, other=0.0)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION, SOFT_BF16)
        if DROPOUT:
            keep = philox_keep(seed, rng_offset, offs_n[:, None], rows[None, :], bh, threshold)
            dv = mma(round_to(tl.where(keep, p_t, 0.0), do.dtype, SOFT_BF16), do, dv, DOT_PRECISION, SOFT_BF16)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            dv = mma(round_to(p_t, do.dtype, SOFT_BF16), do, dv, DOT_PRECISION, SOFT_BF16)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = mma(round_to(ds_t, q.dtype, SOFT_BF16), q, dk, DOT_PRECISION, SOFT_BF16)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DOut, LseUnits, Delta, DK, DV, Bias, SeqQ, SeqK, Rng, SparseCount, SparseIndex, KeyBounds,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sb, stride_sh, stride_sk,
    stride_kbb, stride_kbh,
    n_heads, kv_heads, group, n_queries, n_keys, n_n_blocks, left, right, qk_scale, cap, threshold, drop_scale,
    n_sparse_rows, scale, lo_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SEQ_Q: tl.constexpr, HAS_SEQ_K: tl.constexpr, BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SPARSE_MASKED: tl.constexpr, KEY_BOUNDS: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    tl.static_assert(SPARSE_BLOCK % BLOCK_M == 0 and SPARSE_BLOCK % BLOCK_N == 0)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    SPARSE: tl.constexpr = SPARSE_BLOCK > 0
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    # Key blocks of one head adjacent in launch order (under a causal mask the first are the longest).  Unlike
    # the forward and dQ passes, heads are not interleaved (``common.head_group``): these programs read their
    # head's Q and dO from different rows at once, and more heads in flight overflowed L2 (benchmarks/reference).
    pid = tl.program_id(0)
    bhk = pid // n_n_blocks
    start_n = (pid % n_n_blocks) * BLOCK_N
    off_b = (bhk // kv_heads).to(tl.int64)
    off_hk = (bhk % kv_heads).to(tl.int64)
    lq, lk, shift = sequence_bounds(SeqQ, SeqK, off_b, n_queries, n_keys, HAS_SEQ_Q, HAS_SEQ_K, BOTTOM_RIGHT)
    seed = 0
    rng_offset = 0
    if DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)

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

    lo, full_lo, full_hi, hi = query_range(start_n, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT,
                                           HAS_RIGHT)
    for g in range(0, group):
        off_h = off_hk * group + g
        bh = off_b * n_heads + off_h
        row0 = bh * n_queries
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_mb[:, None] * stride_qm + offs_d[None,
        :] * stride_qd
        do_ptrs = (DOut + off_b * stride_dob + off_h * stride_doh + offs_mb[:, None] * stride_dom
                   + offs_dv[None, :] * stride_dod)
        lse_ptrs = LseUnits + row0 + offs_mb
        delta_ptrs = Delta + row0 + offs_mb
        bias_ptr = Bias + off_b * stride_bb + off_h * stride_bh
        head_lo, head_full_lo, head_full_hi, head_hi = lo, full_lo, full_hi, hi
        if KEY_BOUNDS:
            # Key blocks outside the keys a padding bias leaves alive get no gradient from this head.
            bounds = KeyBounds + off_b * stride_kbb + off_h * stride_kbh
            dead = (start_n >= tl.load(bounds + 1)) | (start_n + BLOCK_N <= tl.load(bounds))
            head_hi = tl.where(dead, lo, hi)
            head_full_lo = tl.where(dead, lo, full_lo)
            head_full_hi = tl.where(dead, lo, full_hi)
        if SPARSE:
            sparse_col = off_b * stride_sb + off_h * stride_sh + (start_n // SPARSE_BLOCK) * stride_sk
            n_tiles = tl.load(SparseCount + sparse_col) * (SPARSE_BLOCK // BLOCK_M)
            dk, dv = _bwd_kv_stage(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, lo_offset, delta_ptrs, bias_ptr,
                SparseIndex + sparse_col * n_sparse_rows, 0, n_tiles, offs_n, offs_mb, offs_d, offs_dv, stride_qm,
                stride_dom, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed,
                rng_offset, bh, threshold, drop_scale, HEAD_D, HEAD_DV, BLOCK_M, SPARSE_MASKED, HAS_LEFT, HAS_RIGHT,
                BIAS, BIAS_ROW, SOFTCAP, DROPOUT, EVEN_M, EVEN_D, EVEN_DV, SPARSE_BLOCK, DOT_PRECISION, SOFT_BF16)
        else:
            for stage in tl.static_range(3):
                # [lo, full_lo) and [full_hi, hi) are masked, [full_lo, full_hi) is not.
                if stage == 0:
                    stage_lo, stage_hi = head_lo, head_full_lo
                elif stage == 1:
                    stage_lo, stage_hi = head_full_lo, head_full_hi
                else:
                    stage_lo, stage_hi = head_full_hi, head_hi
                dk, dv = _bwd_kv_stage(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, lo_offset, delta_ptrs, bias_ptr, SparseIndex, stage_lo,
                    stage_hi, offs_n, offs_mb, offs_d, offs_dv, stride_qm, stride_dom, stride_bm, stride_bn,
                    n_queries,
                    n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold, drop_scale,
                    HEAD_D, HEAD_DV, BLOCK_M, stage != 1, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP, DROPOUT,
                    EVEN_M, EVEN_D, EVEN_DV, 0, DOT_PRECISION, SOFT_BF16)

    dk = dk * scale
    if DROPOUT:
        dv = dv * drop_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + key_rows * stride_dkn + offs_d[None, :] * stride_dkd,
             round_to(dk, DK.dtype.element_ty, SOFT_BF16), mask=kv_mask & (offs_d[None, :] < HEAD_D))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + key_rows * stride_dvn + offs_dv[None, :] * stride_dvd,
             round_to(dv, DV.dtype.element_ty, SOFT_BF16), mask=kv_mask & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _bwd_q_stage(dq, q, do, lse, lse_lo, delta, k_ptrs, v_ptrs, bias_ptr, dbias_ptr, sparse_ptr, start_n, end_n,
                 offs_m, offs_nb,
                 offs_d, offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm, stride_dbn, n_queries,
                 n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold, drop_scale,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 CHECK_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr,
                 BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                 DBIAS_ATOMIC: tl.constexpr,
                 DBIAS_SUM_M: tl.constexpr, DBIAS_SUM_N: tl.constexpr, EVEN_D: tl.constexpr,
                 EVEN_DV: tl.constexpr, SPARSE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SOFT_BF16: tl.constexpr):
    """Key tiles [start_n, end_n) in steps of BLOCK_N, or (block-sparse) tiles start_n ... end_n - 1 of the listed
    key blocks, as in the forward."""
    NATURAL: tl.constexpr = BIAS == 1
    STEP: tl.constexpr = 1 if SPARSE_BLOCK > 0 else BLOCK_N
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_N if SPARSE_BLOCK > 0 else 1
    for it in range(start_n, end_n, STEP):
        if SPARSE_BLOCK > 0:
            start = tl.load(sparse_ptr + it // TILES) * SPARSE_BLOCK + (it % TILES) * BLOCK_N
        else:
            start = it
        cols = start + offs_nb
        k_ptrs_t = k_ptrs + tl.cast(start, tl.int64) * stride_kn
        v_ptrs_t = v_ptrs + tl.cast(start, tl.int64) * stride_vn
        if MASKED:
            k = tl.load(k_ptrs_t, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_D), other=0.0)
            v = tl.load(v_ptrs_t, mask=(cols[:, None] < n_keys) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs_t)
            else:
                k = tl.load(k_ptrs_t, mask=offs_d[None, :] < HEAD_D, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs_t)
            else:
                v = tl.load(v_ptrs_t, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
        qk = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16)
        s, t = score_tile(qk, offs_m[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn, n_queries, n_keys,
                          lk, shift, left, right, qk_scale, cap, MASKED, CHECK_ROWS, HAS_LEFT, HAS_RIGHT, BIAS,
                          BIAS_ROW, SOFTCAP)
        if NATURAL:
            p = tl.math.exp2((s - lse[:, None]) * LOG2E_JIT - lse_lo[:, None])
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = mma(do, tl.trans(v), None, DOT_PRECISION, SOFT_BF16)
        if DROPOUT:
            keep = philox_keep(seed, rng_offset, cols[None, :], offs_m[:, None], bh, threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            _store_bias_grad(ds, dbias_ptr, offs_m, cols, stride_dbm, stride_dbn, n_queries, n_keys,
                             DBIAS_ATOMIC, DBIAS_SUM_M, DBIAS_SUM_N)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(round_to(ds, k.dtype, SOFT_BF16), k, dq, DOT_PRECISION, SOFT_BF16)
    return dq


@triton.jit
def _store_bias_grad(ds, dbias_ptr, offs_m, cols, stride_dbm, stride_dbn, n_queries, n_keys,
                     ATOMIC: tl.constexpr, SUM_M: tl.constexpr, SUM_N: tl.constexpr):
    """Write dS into the fp32 bias gradient (laid out in the bias's own shape): summed over the tile along a
    broadcast M or N first, accumulated atomically when programs share entries.  Invisible entries, rows past
    M and keys past N have dS = 0, so sums need no mask."""
    if SUM_M and SUM_N:
        # The tile's total goes through lane 0 of a vector atomic (a scalar atomic may run once per thread).
        first = tl.arange(0, ds.shape[1]) == 0
        total = tl.where(first, tl.sum(tl.sum(ds, 1), 0), 0.0)
        tl.atomic_add(dbias_ptr + tl.arange(0, ds.shape[1]) * 0, total, mask=first)
    elif SUM_M:
        tl.atomic_add(dbias_ptr + cols * stride_dbn, tl.sum(ds, 0), mask=cols < n_keys)
    elif SUM_N:
        tl.atomic_add(dbias_ptr + offs_m.to(tl.int64) * stride_dbm, tl.sum(ds, 1), mask=offs_m < n_queries)
    else:
        ptrs = dbias_ptr + offs_m[:, None].to(tl.int64) * stride_dbm + cols[None, :] * stride_dbn
        mask = (offs_m[:, None] < n_queries) & (cols[None, :] < n_keys)
        if ATOMIC:
            tl.atomic_add(ptrs, ds, mask=mask)
        else:
            tl.store(ptrs, ds, mask=mask)


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DOut, LseUnits, Delta, DQ, Bias, SeqQ, SeqK, Rng, SparseCount, SparseIndex, KeyBounds, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sb, stride_sh, stride_sq,
    stride_kbb, stride_kbh,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group, left, right, qk_scale, cap, threshold,
    drop_scale,
    n_sparse_cols, scale, lo_offset,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SEQ_Q: tl.constexpr, HAS_SEQ_K: tl.constexpr, BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SPARSE_MASKED: tl.constexpr, KEY_BOUNDS: tl.constexpr, BIAS_GRAD: tl.constexpr, DBIAS_ATOMIC: tl.constexpr,
    DBIAS_SUM_M: tl.constexpr, DBIAS_SUM_N: tl.constexpr, EVEN_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    tl.static_assert(SPARSE_BLOCK % BLOCK_M == 0 and SPARSE_BLOCK % BLOCK_N == 0)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    SPARSE: tl.constexpr = SPARSE_BLOCK > 0
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    bh, m_block = tile_coords(tl.program_id(0), n_m_blocks, n_bh, head_group, HAS_RIGHT and not HAS_LEFT)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    off_hk = off_h // group
    start_m = m_block * BLOCK_M
    lq, lk, shift = sequence_bounds(SeqQ, SeqK, off_b, n_queries, n_keys, HAS_SEQ_Q, HAS_SEQ_K, BOTTOM_RIGHT)
    seed = 0
    rng_offset = 0
    if DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
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
    lse = tl.load(LseUnits + row, mask=offs_m < n_queries, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < n_queries, other=0.0)
    lse_lo = lse * 0.0
    if BIAS == 1:
        lse_lo = tl.load(LseUnits + lo_offset + row, mask=offs_m < n_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_nb[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_nb[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    bias_ptr = Bias + off_b * stride_bb + off_h * stride_bh
    dbias_ptr = DBias + off_b * stride_dbb + off_h * stride_dbh
    lo, full_lo, full_hi, hi = key_range(start_m, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT,
                                         HAS_RIGHT)
    lo, full_lo, full_hi, hi = bounded_key_range(lo, full_lo, full_hi, hi, KeyBounds, off_b, off_h, stride_kbb,
                                                 stride_kbh, BLOCK_N, KEY_BOUNDS)
    if SPARSE:
        sparse_row = off_b * stride_sb + off_h * stride_sh + (start_m // SPARSE_BLOCK) * stride_sq
        n_tiles = tl.load(SparseCount + sparse_row) * (SPARSE_BLOCK // BLOCK_N)
        dq = _bwd_q_stage(
            dq, q, do, lse, lse_lo, delta, k_ptrs, v_ptrs, bias_ptr, dbias_ptr,
            SparseIndex + sparse_row * n_sparse_cols,
            0, n_tiles, offs_m, offs_nb, offs_d, offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm,
            stride_dbn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold,
            drop_scale, HEAD_D, HEAD_DV, BLOCK_N, SPARSE_MASKED, not EVEN_M, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW,
            SOFTCAP, DROPOUT, BIAS_GRAD, DBIAS_ATOMIC, DBIAS_SUM_M, DBIAS_SUM_N, EVEN_D, EVEN_DV, SPARSE_BLOCK,
            DOT_PRECISION, SOFT_BF16)
    else:
        for stage in tl.static_range(3):
            # [lo, full_lo) and [full_hi, hi) are masked, [full_lo, full_hi) is not.
            if stage == 0:
                stage_lo, stage_hi = lo, full_lo
            elif stage == 1:
                stage_lo, stage_hi = full_lo, full_hi
            else:
                stage_lo, stage_hi = full_hi, hi
            dq = _bwd_q_stage(
                dq, q, do, lse, lse_lo, delta, k_ptrs, v_ptrs, bias_ptr, dbias_ptr, SparseIndex, stage_lo, stage_hi,
                offs_m, offs_nb, offs_d, offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm, stride_dbn,
                n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold, drop_scale,
                HEAD_D, HEAD_DV, BLOCK_N, stage != 1, not EVEN_M, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP,
                DROPOUT, BIAS_GRAD, DBIAS_ATOMIC, DBIAS_SUM_M, DBIAS_SUM_N, EVEN_D, EVEN_DV, 0, DOT_PRECISION,
                SOFT_BF16)
    dq = dq * scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + q_rows * stride_dqm + offs_d[None, :] * stride_dqd
    if EVEN_M and EVEN_D:
        tl.store(dq_ptrs, round_to(dq, DQ.dtype.element_ty, SOFT_BF16))
    else:
        tl.store(dq_ptrs, round_to(dq, DQ.dtype.element_ty, SOFT_BF16), mask=row_mask & (offs_d[None, :] < HEAD_D))


def bias_grad_layout(bias: torch.Tensor, shape: tuple) -> dict:
    """How the dQ pass writes the gradient of ``bias`` (4-D, dims 1 or full) for attention of ``shape``
    [B, H, M, N]: which broadcast dims it sums in-tile (M, N) and whether programs share entries (atomics)."""
    broadcast = [size == 1 and full > 1 for size, full in zip(bias.shape, shape)]
    return dict(DBIAS_ATOMIC=any(broadcast), DBIAS_SUM_M=broadcast[2], DBIAS_SUM_N=broadcast[3])


def flash_backward(grad_out, q, k, v, out, lse, grad_lse, dq, dk, dv, dbias, scale: float, spec, cfg_kv, cfg_q,
                   dot: dict, passes: tuple = ("kv", "q"), kv_pass=None, q_pass=None) -> None:
    """Launch the three backward kernels, writing dq, dk, dv (shapes of q, k, v; any strides) and, when
    ``dbias`` is given (fp32, zero-filled, the bias's shape), the bias gradient.  ``passes`` leaves out the dK/dV
    ("kv") or the dQ ("q") pass (the autotuner times one at a time).  ``kv_pass(lse_units, delta)`` and
    ``q_pass(lse_units, delta)``, when given, run that pass instead of the Triton kernel (the Hopper Gluon
    kernels, for calls without a bias: ``lse_units`` is then LSE in log2 units, +inf for empty rows)."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    head_dv = v.shape[3]
    block_d, block_dv = padded_head_dim(head_d), padded_head_dim(head_dv)
    # Row statistics are indexed as contiguous [B, H, M]; these are B*H*M floats, so copies are cheap.
    lse = lse.contiguous()
    grad_lse = grad_lse.contiguous() if grad_lse is not None else None
    delta = torch.empty_like(lse)
    # LSE in the scores' units, then (natural units only) log2 of the row sums that LSE lost to rounding.
    lse_units = lse.new_empty((2 if spec.natural_units else 1,) + tuple(lse.shape))
    lo_offset = lse.numel()

    pre_block = 64
    n_pre = triton.cdiv(n_queries, pre_block)
    launch(
        _bwd_preprocess_kernel, (n_pre * batch * heads,),
        out, grad_out, grad_lse if grad_lse is not None else lse, lse, delta, lse_units,
        *out.stride(), *grad_out.stride(), heads, n_queries, n_pre, lo_offset,
        HEAD_DV=head_dv, BLOCK_M=pre_block, BLOCK_DV=block_dv, HAS_DLSE=grad_lse is not None,
        NATURAL=spec.natural_units,
    )
    common = dict(HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_DV=block_dv, **dot)
    args = kernel_arguments(q, spec, scale)  # once: the padding-bias bounds kernel runs a single time
    q_args = args.with_block_lists(spec, rows=True)
    n_m_blocks = triton.cdiv(n_queries, cfg_q.block_m)
    if spec.natural_units:
        launch(
            _bwd_saturated_rows_kernel, (n_m_blocks * batch * heads,),
            q, k, lse_units, *q_args.tensors,
            *q.stride(), *k.stride(), *q_args.bias_strides, *q_args.sparse_strides, *q_args.bounds_strides,
            heads, heads // kv_heads, n_queries, n_keys, n_m_blocks, *q_args.scalars, lo_offset,
            HEAD_D=head_d, BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, BLOCK_D=block_d, **q_args.flags,
            **dot, **cfg_q.launch_options(),
        )
    kv_args = args.with_block_lists(spec, rows=False)
    n_n_blocks = triton.cdiv(n_keys, cfg_kv.block_n)
    if "kv" in passes and kv_pass is not None:
        kv_pass(lse_units[0], delta)
    elif "kv" in passes:
        launch(
            _bwd_kv_kernel, (n_n_blocks * batch * kv_heads,),
            q, k, v, grad_out, lse_units, delta, dk, dv, *kv_args.tensors,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            *kv_args.bias_strides, *kv_args.sparse_strides, *kv_args.bounds_strides,
            heads, kv_heads, heads // kv_heads, n_queries, n_keys, n_n_blocks, *kv_args.scalars, scale, lo_offset,
            BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n,
            # Block-sparse query tiles come a whole sparse block at a time: rows are in bounds when it divides M.
            EVEN_M=divides(kv_args.flags["SPARSE_BLOCK"] or cfg_kv.block_m, n_queries),
            SPARSE_MASKED=sparse_masked(spec, n_keys, cfg_kv.block_n), **kv_args.flags, **common,
            **cfg_kv.launch_options(),
        )
    if "q" not in passes:
        return
    if q_pass is not None:
        q_pass(lse_units[0], delta)
        return
    if dbias is not None:
        layout = bias_grad_layout(dbias, (batch, heads, n_queries, n_keys))
        dbias_t, dbias_strides = dbias, tuple(0 if n == 1 else s for n, s in zip(dbias.shape, dbias.stride()))
    else:
        layout = dict(DBIAS_ATOMIC=False, DBIAS_SUM_M=False, DBIAS_SUM_N=False)
        dbias_t, dbias_strides = lse, (0, 0, 0, 0)
    launch(
        _bwd_q_kernel, (n_m_blocks * batch * heads,),
        q, k, v, grad_out, lse_units, delta, dq, *q_args.tensors, dbias_t,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *q_args.bias_strides, *q_args.sparse_strides, *q_args.bounds_strides, *dbias_strides,
        heads, heads // kv_heads, n_queries, n_keys, n_m_blocks, batch * heads,
        head_group(q_args.flags["HAS_RIGHT"] and not q_args.flags["HAS_LEFT"],
                   n_keys * (head_d + head_dv) * k.element_size()), *q_args.scalars, scale, lo_offset,
        BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, EVEN_M=divides(cfg_q.block_m, n_queries),
        SPARSE_MASKED=sparse_masked(spec, n_keys, max(q_args.flags["SPARSE_BLOCK"], 1)),
        BIAS_GRAD=dbias is not None, **layout, **q_args.flags, **common, **cfg_q.launch_options(),
    )
