"""FlashAttention-2 forward kernel (FLASHATTENTION.md, "FlashAttention-2 forward").

Legend, per (batch b, query head h):
  Q  [M, D]   M query rows, head dim D (padded to BLOCK_D by masked loads)
  K  [N, D]   N key rows of key head h // GROUP (grouped-query attention without repeating K/V)
  V  [N, DV]  value head dim DV may differ from D
  O  [M, DV]  output;  LSE [M] the natural-log logsumexp of each score row (what the backward needs)
One program computes BLOCK_M query rows of one (b, h): it loads Q_i once, streams K_j/V_j blocks with the online
softmax (running max m_i and sum l_i, kept in log2 units with the scale times log2(e) folded into one multiply,
or in natural units when a float bias is added: see ``masking.py``), divides by l_i once at the end and writes
O_i and LSE_i.

Masks (``masking.py`` has the semantics): the structured ones (causal, sliding window, key/query lengths) only
change which key blocks a program visits and which of them need mask arithmetic (``tile.key_range``): fully
visible blocks run without any, partly visible ones with it, invisible ones are never loaded.  A bias or
boolean mask tensor is read tile by tile through its strides (0 along broadcast dims).  Block-sparse attention
visits only the key blocks listed for the query block.  Softcapping and dropout (Philox, ``rng.py``) are
applied to each tile.  Rows with no visible key produce O = 0 and LSE = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E_JIT, divides, head_group, launch, mma, round_to, tile_coords
from .configs import padded_head_dim
from .masking import kernel_arguments, sparse_masked
from .rng import philox_keep
from .tile import bounded_key_range, key_range, score_tile, sequence_bounds

__all__ = ["flash_forward"]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, cols, offs_m, offs_d, offs_dv, stride_bm, stride_bn,
              n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, MASKED: tl.constexpr, CHECK_ROWS: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
              SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One online-softmax step over the key tile ``cols`` (K/V pointers already at its first row)."""
    NATURAL: tl.constexpr = BIAS == 1
    # -inf scores can appear in this tile: guard rows that have seen no finite score yet.
    GUARD: tl.constexpr = MASKED or BIAS != 0
    if MASKED:
        k = tl.load(k_ptrs, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_D), other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    qk = mma(q, tl.trans(k), None, DOT_PRECISION, SOFT_BF16)
    if FOLD_SCALE and not (MASKED or BIAS != 0 or SOFTCAP):
        # scale >= 0, so max(s) * scale == max(s * scale): one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_ref = m_new
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
    else:
        s, t_unused = score_tile(qk, offs_m[:, None], cols[None, :], bias_ptr, stride_bm, stride_bn, n_queries,
                          n_keys, lk, shift, left, right, qk_scale, cap, MASKED, CHECK_ROWS, HAS_LEFT,
                          HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if GUARD:
            # A row that has seen no finite score keeps m = -inf; subtract 0 instead (exp2 gives 0, not NaN).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if NATURAL:
            p = tl.math.exp2((s - m_ref[:, None]) * LOG2E_JIT)
            alpha = tl.math.exp2((m_i - m_ref) * LOG2E_JIT)
        else:
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
    if DROPOUT:
        p = tl.where(philox_keep(seed, rng_offset, cols[None, :], offs_m[:, None], bh, threshold), p, 0.0)
    acc = mma(round_to(p, v.dtype, SOFT_BF16), v, acc, DOT_PRECISION, SOFT_BF16)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, sparse_ptr, start_n, end_n, offs_m, offs_n, offs_d,
              offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right,
              qk_scale, cap, seed, rng_offset, bh, threshold,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CHECK_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr,
              BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
              DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Key tiles [start_n, end_n) in steps of BLOCK_N; block-sparse (SPARSE_BLOCK > 0): tiles start_n ...
    end_n - 1 of the key blocks listed at ``sparse_ptr``, one flat loop so that loads stay pipelined."""
    if SPARSE_BLOCK > 0:
        TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_N
        for it in range(start_n, end_n):
            start = tl.load(sparse_ptr + it // TILES) * SPARSE_BLOCK + (it % TILES) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_ptrs + tl.cast(start, tl.int64) * stride_kn,
                v_ptrs + tl.cast(start, tl.int64) * stride_vn, bias_ptr, start + offs_n, offs_m, offs_d, offs_dv,
                stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh,
                threshold, HEAD_D, HEAD_DV, MASKED, CHECK_ROWS, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP,
                DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
    else:
        k_ptrs += tl.cast(start_n, tl.int64) * stride_kn
        v_ptrs += tl.cast(start_n, tl.int64) * stride_vn
        for start in range(start_n, end_n, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, start + offs_n, offs_m, offs_d, offs_dv, stride_bm,
                stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed, rng_offset, bh, threshold,
                HEAD_D, HEAD_DV, MASKED, CHECK_ROWS, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP, DROPOUT,
                FOLD_SCALE, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _fwd_stages(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, lo, full_lo, full_hi, hi, offs_m, offs_n, offs_d,
                offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right,
                qk_scale, cap, seed, rng_offset, bh, threshold,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_ROWS: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BIAS: tl.constexpr, BIAS_ROW: tl.constexpr,
                SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The key range in three stages: [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) not."""
    for stage in tl.static_range(3):
        if stage == 0:
            stage_lo, stage_hi = lo, full_lo
        elif stage == 1:
            stage_lo, stage_hi = full_lo, full_hi
        else:
            stage_lo, stage_hi = full_hi, hi
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, bias_ptr, stage_lo, stage_hi, offs_m, offs_n, offs_d, offs_dv,
            stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap, seed,
            rng_offset, bh, threshold, HEAD_D, HEAD_DV, BLOCK_N, stage != 1, CHECK_ROWS, HAS_LEFT, HAS_RIGHT, BIAS,
            BIAS_ROW, SOFTCAP, DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV, 0, DOT_PRECISION, SOFT_BF16)
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse, Bias, SeqQ, SeqK, Rng, SparseCount, SparseIndex, KeyBounds,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_sb, stride_sh, stride_sq,
    stride_kbb, stride_kbh,
    n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group, left, right, qk_scale, cap, threshold,
    drop_scale, n_sparse_cols,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SEQ_Q: tl.constexpr, HAS_SEQ_K: tl.constexpr, BIAS: tl.constexpr,
    BIAS_ROW: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SPARSE_MASKED: tl.constexpr, KEY_BOUNDS: tl.constexpr, FOLD_SCALE: tl.constexpr, EVEN_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_D)
    tl.static_assert(BLOCK_DV >= HEAD_DV)
    tl.static_assert(SPARSE_BLOCK % BLOCK_M == 0 and SPARSE_BLOCK % BLOCK_N == 0)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV
    SPARSE: tl.constexpr = SPARSE_BLOCK > 0
    NATURAL: tl.constexpr = BIAS == 1
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    cap = tl.cast(cap, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    # One flat grid axis (no 65535 limit): query blocks of one head (or of a small group of heads,
    # ``common.head_group``) are adjacent in launch order, so the programs running together share K/V in L2.
    # Causal: the longest rows (last query blocks) go first.
    bh, m_block = tile_coords(tl.program_id(0), n_m_blocks, n_bh, head_group, HAS_RIGHT and not HAS_LEFT)
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    off_hk = off_h // group
    start_m = m_block * BLOCK_M
    lq, lk, shift = sequence_bounds(SeqQ, SeqK, off_b, n_queries, n_keys, HAS_SEQ_Q, HAS_SEQ_K, BOTTOM_RIGHT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
              + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    bias_ptr = Bias + off_b * stride_bb + off_h * stride_bh
    seed = 0
    rng_offset = 0
    if DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)

    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = key_range(start_m, lq, lk, shift, left, right, BLOCK_M, BLOCK_N, HAS_LEFT,
                                         HAS_RIGHT)
    lo, full_lo, full_hi, hi = bounded_key_range(lo, full_lo, full_hi, hi, KeyBounds, off_b, off_h, stride_kbb,
                                                 stride_kbh, BLOCK_N, KEY_BOUNDS)
    if SPARSE:
        # Listed key blocks, each SPARSE_BLOCK // BLOCK_N tiles; masks only where some flag can cut a tile.
        sparse_row = off_b * stride_sb + off_h * stride_sh + (start_m // SPARSE_BLOCK) * stride_sq
        n_tiles = tl.load(SparseCount + sparse_row) * (SPARSE_BLOCK // BLOCK_N)
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, SparseIndex + sparse_row * n_sparse_cols, 0, n_tiles,
            offs_m, offs_n, offs_d, offs_dv, stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift,
            left, right, qk_scale, cap, seed, rng_offset, bh, threshold, HEAD_D, HEAD_DV, BLOCK_N, SPARSE_MASKED,
            not EVEN_M, HAS_LEFT, HAS_RIGHT, BIAS, BIAS_ROW, SOFTCAP, DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV,
            SPARSE_BLOCK, DOT_PRECISION, SOFT_BF16)
    elif KEY_BOUNDS:
        bounds = KeyBounds + off_b * stride_kbb + off_h * stride_kbh
        if tl.load(bounds + 2) != 0:
            # A pure right-padding bias (live keys [0, hi), bias 0 there): exactly a key length, so run the
            # unbiased kernel with it; scores in log2 units, converted back below when the bias path is natural.
            lk_pure = tl.minimum(lk, tl.load(bounds + 1))
            lo, full_lo, full_hi, hi = key_range(start_m, lq, lk_pure, shift, left, right, BLOCK_M, BLOCK_N,
                                                 HAS_LEFT, HAS_RIGHT)
            qk_scale2 = qk_scale
            cap2 = cap
            if NATURAL:
                if SOFTCAP:
                    cap2 = cap * LOG2E_JIT
                else:
                    qk_scale2 = qk_scale * LOG2E_JIT
            acc, l_i, m_i = _fwd_stages(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, lo, full_lo, full_hi, hi, offs_m, offs_n, offs_d, offs_dv,
                stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk_pure, shift, left, right, qk_scale2,
                cap2, seed, rng_offset, bh, threshold, HEAD_D, HEAD_DV, BLOCK_N, not EVEN_M, HAS_LEFT, HAS_RIGHT, 0,
                False, SOFTCAP, DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
            if NATURAL:
                m_i = m_i * 0.6931471805599453
        else:
            acc, l_i, m_i = _fwd_stages(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, lo, full_lo, full_hi, hi, offs_m, offs_n, offs_d, offs_dv,
                stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap,
                seed, rng_offset, bh, threshold, HEAD_D, HEAD_DV, BLOCK_N, not EVEN_M, HAS_LEFT, HAS_RIGHT, BIAS,
                BIAS_ROW, SOFTCAP, DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)
    else:
        acc, l_i, m_i = _fwd_stages(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptr, lo, full_lo, full_hi, hi, offs_m, offs_n, offs_d, offs_dv,
            stride_kn, stride_vn, stride_bm, stride_bn, n_queries, n_keys, lk, shift, left, right, qk_scale, cap,
            seed, rng_offset, bh, threshold, HEAD_D, HEAD_DV, BLOCK_N, not EVEN_M, HAS_LEFT, HAS_RIGHT, BIAS,
            BIAS_ROW, SOFTCAP, DROPOUT, FOLD_SCALE, EVEN_D, EVEN_DV, DOT_PRECISION, SOFT_BF16)

    if HAS_SEQ_Q:
        # Query rows past this sequence's length see nothing.
        l_i = tl.where(offs_m < lq, l_i, 0.0)
        m_i = tl.where(offs_m < lq, m_i, float("-inf"))
    # Rows with no visible key (l = 0) give 0, as PyTorch's math attention does for fully masked rows.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if DROPOUT:
        l_safe = l_safe / drop_scale
    acc = tl.where((l_i == 0.0)[:, None], 0.0, acc / l_safe[:, None])
    if NATURAL:
        lse = m_i + tl.log(l_i)
    else:
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


def flash_forward(q, k, v, out, lse, scale: float, spec, cfg, dot: dict):
    """Launch the forward kernel.  q [B, H, M, D], k [B, HK, N, D], v [B, HK, N, DV], any strides;
    out [B, H, M, DV] and lse [B, H, M] (contiguous, fp32) are written.  ``spec``: ``masking.MaskSpec``;
    ``dot``: ``common.dot_options``."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    head_dv = v.shape[3]
    n_m_blocks = triton.cdiv(n_queries, cfg.block_m)
    grid = (n_m_blocks * batch * heads,)
    args = kernel_arguments(q, spec, scale).with_block_lists(spec, rows=True)
    group = head_group(args.flags["HAS_RIGHT"] and not args.flags["HAS_LEFT"],
                       n_keys * (head_d + head_dv) * k.element_size())
    launch(
        _flash_fwd_kernel, grid,
        q, k, v, out, lse, *args.tensors,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *args.bias_strides, *args.sparse_strides,
        *args.bounds_strides,
        heads, heads // kv_heads, n_queries, n_keys, n_m_blocks, batch * heads, group, *args.scalars,
        HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=padded_head_dim(head_d), BLOCK_DV=padded_head_dim(head_dv), **args.flags,
        SPARSE_MASKED=sparse_masked(spec, n_keys, max(args.flags["SPARSE_BLOCK"], 1)), FOLD_SCALE=scale >= 0,
        EVEN_M=divides(cfg.block_m, n_queries), **dot,
        **cfg.launch_options(),
    )

