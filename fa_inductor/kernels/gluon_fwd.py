"""Hopper (sm90) forward kernel written in Gluon, with warp specialisation: the fast path of the forward.

Triton's ``tl.dot`` leaves the overlap of softmax arithmetic with tensor-core work to the compiler, which on
Hopper reaches 0.83-0.95x of cuDNN (``benchmarks/reference``).  Gluon exposes the pieces that overlap needs:
asynchronous warp-group MMAs (``warpgroup_mma(..., is_async=True)`` with explicit waits), TMA copies signalled
through mbarriers, and warp-specialised partitions.  Each program owns 64 query rows of one (batch, head) per
consumer warp group (two or three, ``CONSUMERS``):

* a producer partition (one warp, few registers) TMA-loads Q once and streams K and V tiles through a ring of
  ``STAGES`` shared-memory buffers, each guarded by a "ready" mbarrier (TMA bytes landed) and an "empty" one
  (every consumer is done with it);
* the consumer partitions (one warp group each) run the online softmax of FLASHATTENTION.md.  Within a consumer,
  block j + 1's scores S = Q K^T and block j's P V are issued together as asynchronous MMAs, and the softmax of
  block j + 1 runs while P V is still on the tensor cores; only then is the output rescaled.  The consumers are
  independent, so the warp schedulers fill one's softmax with the others' MMAs; with ``PINGPONG`` (short causal
  calls at head dim 64) they take turns to issue their MMAs, which keeps their softmaxes apart in time.  Under a
  causal mask each one stops at the last key block its own rows see.  In the ``LATE`` form of the loop (non-causal
  calls at ``LATE_HEAD_DIMS``) the row sums, the bf16 copy of P and the rescaling of O move after the issue of the
  next S, so that a warp group has nothing left to do between P V's completion and its next MMAs: ptxas otherwise
  schedules that work after the wait for P V (seen in the SASS).  At ``TMA_STORE_HEAD_DIMS`` a consumer hands its
  finished O tile to a TMA store through shared memory and goes on to its next tile.

Tiles are scheduled in one of three ways.  With a program per tile the hardware hands tiles out in launch
order: under a causal mask longest first, over groups of heads (``common.tile_coords`` / ``head_group``), with
the tiles aligned to the last query row so that a partial tile is the shortest.  With a persistent grid (one
program per SM) the K / V ring runs on across a program's tiles, and Q's buffer is released as soon as a tile's
last S = Q K^T is done, so the producer loads the next tile's Q and first key blocks while the consumers finish
the current one.  Without a mask (``PERSISTENT_MAX_KEYS``) a persistent program takes every SM-count-th tile;
under a causal mask (``PERSISTENT_CAUSAL_HEAD_DIMS``), and at ``CLAIMING_HEAD_DIMS`` without one, it claims the
next unclaimed tile in the launch order above from an atomic counter, so that tiles of different lengths are
balanced as the hardware would balance them.
The producer hands each tile's index to the consumers through shared memory.

Scores are kept in log2 units (the scale times log2(e) folded into one multiply).  Only the key blocks that can
hold an invisible score (the diagonal of a causal mask, the key tail) pay for mask arithmetic; rows that see no
key give O = 0 and LSE = -inf.  ``op.gluon_applies`` (and, when the op runs, ``tma_compatible``) decides which
calls this kernel takes; everything else stays on the portable Triton kernel of ``flash_fwd.py``.  The module
needs Gluon in its Triton 3.6 form and ``op.py`` imports it only on a Triton that has it.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import FP_FUSION, LOG2E, head_group, sm_count, tile_coords

__all__ = ["BLOCK_N", "CLAIMING_HEAD_DIMS", "CONSUMERS", "HEAD_DIMS", "LATE_HEAD_DIMS", "PERSISTENT_MAX_KEYS",
           "PERSISTENT_CAUSAL_HEAD_DIMS", "PINGPONG_CAUSAL_MAX_KEYS", "REGISTERS", "TMA_STORE_HEAD_DIMS",
           "tma_compatible", "gluon_forward"]

HEAD_DIMS = (64, 128, 256)  # head dims the kernel is built and measured for (Q, K and V share it)
# Key block per head dim: at 256, 128-key blocks spill registers; 64 keys with two stages fill shared memory.
BLOCK_N = {64: 128, 128: 128, 256: 64}
# Consumer warp groups (64 query rows each) per head dim.  At 64 a third one keeps the tensor cores busier
# while the others run their exponentials (benchmarks/reference, "fifth pass"); at 128 and 256 the [64, head dim]
# fp32 accumulator and a 128-key score tile do not fit the 160 registers a thread that three leave.
CONSUMERS = {64: 3}
# Head dims whose non-causal calls take the consumer loop with late P conversion, row sums and O rescaling
# (``LATE`` below): 1-2 % faster there on the H100 (benchmarks/reference, "sixth pass"); under a causal mask it
# was not faster, and its causal d128 form spills registers inside the loop.  Three consumers cannot hold p in
# fp32 across the loop edge, so head dim 64 keeps the plain loop.
LATE_HEAD_DIMS = (128, 256)
# Non-causal calls with at most this many keys (per head dim) run a persistent grid (``gluon_forward(persistent=
# ...)``): one program per SM loops over tiles, and its producer loads the next tile's Q and first key blocks
# while the consumers finish the current one.  That hides a fixed cost per tile, which counts where tiles are
# short: 1.5-2.3 % faster at head dim 128 with 4k keys, 0-1 % slower at 8k and 16k, slower at head dim 256
# (benchmarks/reference, "seventh pass").
PERSISTENT_MAX_KEYS = {128: 4096}
# Head dims whose causal calls run a persistent grid whose programs claim tiles from a counter in launch order
# (longest first, ``common.tile_coords``), as the hardware hands out a program per tile, but without a program's
# start and end between tiles.  Against a program per tile on the H100: head dim 128 4-5 % faster at 4k keys and
# 0.4-3.6 % at 16k; head dim 64 0-1.4 % at 4k and 1.5-2.1 % at 16k; flat at 256, which keeps a program per tile
# (benchmarks/reference, "eighth pass").  Taking every SM-count-th tile instead leaves some SMs all the long
# tiles (19 % slower at head dim 128, 4k).
PERSISTENT_CAUSAL_HEAD_DIMS = (64, 128)
# Head dims whose non-causal calls, at any length, also run that claiming grid.  Head dim 64 (three consumers,
# 192-row tiles: a 4k head ends in a tile of 64 rows) on the H100, against a program per tile: 1.5-3 % faster at
# 4k, 8k and 16k keys in one run; in another 0.7-1.3 % faster at 4k and within 0.3 % at 16k (benchmarks/reference,
# "eleventh pass").
CLAIMING_HEAD_DIMS = (64,)

# Triton 3.9 renamed the TMA load; 3.5 - 3.8 only know the old name.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
# A barrier over the threads of the calling partition (Triton 3.9 renamed Gluon's thread_barrier).
_partition_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

ROWS_PER_CONSUMER = 64  # query rows per consumer warp group (one wgmma M tile per warp group)
WG_M = gl.constexpr(ROWS_PER_CONSUMER)  # the same number as a kernel constant
# Register budgets (per consumer thread, at launch) by number of consumer warp groups.  Triton pads the producer
# warp to a warp group, so 2 consumers make 12 warps (launched at 168 registers: 64K / 384) and 3 make 16 (128).
# The worker consumers get what is asked for here; the first consumer (Gluon's default partition) gets the rest
# of the 64K registers: 240 and 168.
REGISTERS = {2: (240, 168), 3: (160, 128)}
# Head dims whose O leaves through a staging buffer in shared memory and one TMA store per warp group
# (``TMA_STORE``), which runs on while the warp group starts its next tile, instead of stores from registers.
# Head dim 128 on the H100, CUDA-graph replays, 5 interleaved rounds: 1.2-4.6 % faster in all four benchmark
# shapes (4k / 16k, causal or not); head dim 64 within +-1.3 % (benchmarks/reference, "tenth pass").  At 256 the
# staging buffers do not fit next to the K / V ring (256 KB of shared memory against the H100's 227 KB).
TMA_STORE_HEAD_DIMS = (128,)
# Causal calls with at most this many keys (per head dim) whose consumers issue their MMAs in turns, one warp
# group after another (``PINGPONG``), so that one's exponentials run while the next one's MMAs occupy the tensor
# cores.  Head dim 64 (three consumers) on the H100, against free issue in the same schedule: 2k keys 4.5 % faster,
# 4k 1.9-2.9 %, 8k flat, 16k 0.4-0.8 % slower; without a mask 0.1-1.9 % slower at 4k-16k; head dim 128 (two
# consumers) -2 % to +2.4 % (benchmarks/reference, "fourteenth pass").
PINGPONG_CAUSAL_MAX_KEYS = {64: 4096}


@gluon.constexpr_function
def _mma_layout(n):
    """The accumulator layout of one warp group's [64, n] wgmma tile (16-bit operands)."""
    n = int(getattr(n, "value", n))
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _softmax_step(s, m_i, l_i, rows, cols, n_keys, shift, right, qk_scale, masked, HAS_RIGHT: gl.constexpr,
                  ROW_SUM: gl.constexpr = True):
    """Online-softmax update for one score tile ``s`` (raw Q K^T products): (p, m_new, l_new, alpha).  Without
    ``ROW_SUM`` l is returned as it came (the caller adds the row sums of p later)."""
    if masked:
        keep = gl.expand_dims(cols, 0) < n_keys
        if HAS_RIGHT:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1) + (shift + right))
        s = gl.where(keep, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        # A row with no visible score so far keeps m = -inf; subtract 0 instead (exp2 gives 0, not NaN).
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - gl.expand_dims(m_ref, 1))
        alpha = gl.exp2(m_i - m_ref)
    else:
        # scale >= 0, so max(s) * scale == max(s * scale): one fused multiply-add per score.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
    if ROW_SUM:
        l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _issue_scores(q, k_bufs, k_ready, j, s_init, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """Wait for key block j to land and issue its S = Q K^T as an asynchronous MMA: (ring stage, MMA token)."""
    stage = j % STAGES
    mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
    s_tok = warpgroup_mma(q, k_bufs.index(stage).reshape([BLOCK_N, HEAD_D]).permute((1, 0)), s_init, use_acc=False,
                          is_async=True)
    return stage, s_tok


@gluon.jit
def _take_turn(turns, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """With ``PINGPONG``, wait until it is this warp group's k-th turn to issue MMAs.  The turns go round the
    consumers in order; warp group 0's first one needs no arrival (a fresh mbarrier counts as having completed
    the phase before 0)."""
    if PINGPONG:
        if WG == 0:
            mbarrier.wait(turns.index(0), (k & 1) ^ 1)
        else:
            mbarrier.wait(turns.index(WG), k & 1)


@gluon.jit
def _pass_turn(turns, WG: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    """Hand the turn to the next consumer warp group (``PINGPONG``)."""
    if PINGPONG:
        mbarrier.arrive(turns.index((WG + 1) % CONSUMERS), count=1)


@gluon.jit
def _fwd_tile(tile, n_m_blocks, n_bh, head_group, n_heads, n_queries, n_keys, shift, right,
              PROGRAM_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """A forward tile: (bh, batch, head, first query row, key blocks streamed).  Keys [0, hi) are visible to
    some row of the tile; at least one block is streamed, so that producer and consumers always meet (a block no
    row sees is all masked).  Under a causal mask the tiles are aligned to the last query row, so that the
    partial tile of a length that is not a multiple of PROGRAM_M comes first (rows below 0, which TMA fills with
    zeros and nothing stores) and is the shortest, instead of the longest with most of its warp groups idle."""
    bh, m_block = tile_coords(tile, n_m_blocks, n_bh, head_group, HAS_RIGHT)
    start_m = m_block * PROGRAM_M
    hi = n_keys
    if HAS_RIGHT:
        start_m -= n_m_blocks * PROGRAM_M - n_queries
        hi = gl.minimum(hi, gl.maximum(start_m + PROGRAM_M + shift + right, 0))
    return bh, bh // n_heads, bh % n_heads, start_m, gl.maximum(gl.cdiv(hi, BLOCK_N), 1)


@gluon.jit
def _write_tile(tile_smem, tile):
    """Leave the tile index in shared memory for the consumers (the producer's single warp; published by the
    arrive on Q's mbarrier that follows)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    tile_smem.store(gl.full([1], tile, gl.int32, layout=layout))


@gluon.jit
def _read_tile(tile_smem):
    """The tile index the producer left in shared memory (read by a consumer warp group after Q's mbarrier)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    return gl.max(tile_smem.load(layout), 0)


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns, Out,
              Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys, n_m_blocks, n_bh,
              head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr, CONSUMERS: gl.constexpr, WG: gl.constexpr,
              LATE: gl.constexpr, PERSISTENT: gl.constexpr, DYNAMIC: gl.constexpr, TMA_STORE: gl.constexpr,
              PINGPONG: gl.constexpr):
    """One consumer warp group over the program's tiles: one, every n_programs-th (``PERSISTENT``), or those the
    producer claims (``DYNAMIC``: it hands each index over in ``tile_smem``, published by Q's mbarrier, and an
    index past the last tile ends the loop).  ``base`` counts the key blocks of the earlier tiles: the ring's
    stages and phases run on across tiles.  Each schedule has its own loop: the one-tile case run as a loop of
    one spills 128-156 bytes with three consumers (0-12 spelled out), and the SM-count-th schedule run as the
    claiming loop spills 32 bytes more at head dim 128, some of it in the key loop, and was 1.3 % slower (offline
    sm90 compiles, Triton 3.6; H100).  With ``PINGPONG`` a tile takes n_iter + 1 turns of every warp group (see
    ``_consumer_rows``), so ``base + t`` counts the turns of the earlier tiles."""
    base = n_tiles * 0
    t = n_tiles * 0
    if DYNAMIC:
        mbarrier.wait(q_bar, 0)
        tile = _read_tile(tile_smem)
        while tile < n_tiles:
            base += _consumer_tile(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out,
                                   Lse, o_desc, o_bufs, tile, n_heads, n_m_blocks, n_bh, head_group, stride_ob,
                                   stride_oh, stride_om, n_queries, n_keys, shift, right, qk_scale, base, base + t,
                                   HEAD_D, BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, WG, LATE, TMA_STORE, PINGPONG)
            t += 1
            mbarrier.wait(q_bar, t & 1)
            tile = _read_tile(tile_smem)
    elif PERSISTENT:
        for tile in range(gl.program_id(0), n_tiles, n_programs):
            mbarrier.wait(q_bar, t & 1)
            base += _consumer_tile(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out,
                                   Lse, o_desc, o_bufs, tile, n_heads, n_m_blocks, n_bh, head_group, stride_ob,
                                   stride_oh, stride_om, n_queries, n_keys, shift, right, qk_scale, base, base + t,
                                   HEAD_D, BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, WG, LATE, TMA_STORE, PINGPONG)
            t += 1
    else:
        mbarrier.wait(q_bar, 0)
        _consumer_tile(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out, Lse, o_desc,
                       o_bufs, gl.program_id(0), n_heads, n_m_blocks, n_bh, head_group, stride_ob, stride_oh, stride_om,
                       n_queries, n_keys, shift, right, qk_scale, base, t, HEAD_D, BLOCK_N, STAGES, HAS_RIGHT,
                       CONSUMERS, WG, LATE, TMA_STORE, PINGPONG)
    if TMA_STORE:
        tma.store_wait(0)  # shared memory must outlive the last store's read of it


@gluon.jit
def _consumer_tile(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out, Lse, o_desc, o_bufs,
                   tile, n_heads, n_m_blocks, n_bh, head_group, stride_ob, stride_oh, stride_om, n_queries, n_keys,
                   shift, right, qk_scale, base, turn, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr, CONSUMERS: gl.constexpr, WG: gl.constexpr,
                   LATE: gl.constexpr, TMA_STORE: gl.constexpr, PINGPONG: gl.constexpr):
    """A tile's rows of this warp group (its Q already landed); returns the key blocks the tile streamed.  With
    ``PINGPONG`` it takes n_iter + 1 turns from ``turn`` on: one per MMA issue of ``_consumer_rows`` (n_own + 1)
    and one per block released unread, so that every warp group takes as many turns per tile."""
    bh, off_b, off_h, start_m, n_iter = _fwd_tile(tile, n_m_blocks, n_bh, head_group, n_heads, n_queries, n_keys,
                                                  shift, right, CONSUMERS * WG_M, BLOCK_N, HAS_RIGHT)
    row0 = start_m + WG * WG_M
    # The program streams n_iter key blocks for its lowest rows' sake; under a causal mask this warp group's rows
    # see fewer (n_own) and more of them unmasked (n_full).  It only waits for and releases the blocks beyond
    # n_own, which hold no key its rows see, and all but the first when none of its rows is a query row (the
    # partial tile of a length that is not a multiple of the tile: rows past the last, or below 0 under a causal
    # mask, see ``_fwd_tile``).
    n_own = n_iter
    n_full = n_keys // BLOCK_N
    if HAS_RIGHT:
        n_own = gl.maximum(gl.cdiv(gl.minimum(n_keys, gl.maximum(row0 + WG_M + shift + right, 0)), BLOCK_N), 1)
        n_full = gl.minimum(n_keys, gl.maximum(row0 + shift + right + 1, 0)) // BLOCK_N
    if (row0 >= n_queries) | (row0 + WG_M <= 0):
        n_own = 1  # one block (its stores are masked off): no branch around the loop, which costs registers
    _consumer_rows(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out, Lse, o_desc,
                   o_bufs, off_b, off_h, bh, row0, stride_ob, stride_oh, stride_om, n_queries, n_keys, shift, right,
                   qk_scale, n_own, n_full, base, turn, HEAD_D, BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, WG, LATE,
                   TMA_STORE, PINGPONG)
    # The key blocks past this warp group's rows: released unread.
    for j in range(n_own, n_iter):
        _take_turn(turns, turn + j + 1, WG, PINGPONG)
        _pass_turn(turns, WG, CONSUMERS, PINGPONG)
        stage = (base + j) % STAGES
        phase = ((base + j) // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage), count=1)
    return n_iter


@gluon.jit
def _consumer_rows(q_bufs, k_bufs, v_bufs, turns, q_empty, k_ready, k_empty, v_ready, v_empty, Out, Lse, o_desc,
                   o_bufs, off_b, off_h, bh, row0, stride_ob, stride_oh, stride_om, n_queries, n_keys, shift, right,
                   qk_scale, n_own, n_full, base, turn, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr, CONSUMERS: gl.constexpr, WG: gl.constexpr,
                   LATE: gl.constexpr = False, TMA_STORE: gl.constexpr = False, PINGPONG: gl.constexpr = False):
    """The online softmax of one warp group's 64 rows over key blocks [0, n_own), then O and the LSE stored.
    Q's buffer is released (``q_empty``) once the last S = Q K^T is done, so that a persistent producer can load
    the next tile's Q while this one finishes."""
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_bufs.dtype
    rows = row0 + gl.arange(0, WG_M, layout=row_s)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    q = q_bufs.index(WG).reshape([WG_M, HEAD_D])
    m_i = gl.full([WG_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([WG_M], gl.float32, layout=row_s)
    acc = gl.zeros([WG_M, HEAD_D], gl.float32, layout=o_layout)
    s_init = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)

    # Block 0's scores and probabilities.  With ``PINGPONG`` each issue of MMAs (this one, one per loop iteration,
    # the last P V) is a turn: the consumers issue in order, one after another, so that one's exponentials run
    # while the next one's MMAs occupy the tensor cores.
    _take_turn(turns, turn, WG, PINGPONG)
    stage_0, s_tok = _issue_scores(q, k_bufs, k_ready, base, s_init, BLOCK_N, HEAD_D, STAGES)
    _pass_turn(turns, WG, CONSUMERS, PINGPONG)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    mbarrier.arrive(k_empty.index(stage_0), count=1)
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, rows, cols, n_keys, shift, right, qk_scale, n_full <= 0,
                                       HAS_RIGHT, not LATE)

    if LATE:
        # Everything a block's P V needs that does not need the tensor cores (p's bf16 copy, its row sums, O
        # rescaled by alpha) is done in the next iteration, after S = Q K^T of the block after it is issued: the
        # warp group then waits for P V with nothing left to do but loop.  p stays fp32 across the loop edge.
        # Invariant at the top of iteration i: p and alpha are block i's, acc is scaled to block i - 1's maximum
        # (alpha = 0 for block 0, so O's zeros stay zeros).
        for i in range(0, n_own - 1):
            j = i + 1
            stage_i = (base + i) % STAGES
            _take_turn(turns, turn + j, WG, PINGPONG)
            stage_j, s_tok = _issue_scores(q, k_bufs, k_ready, base + j, s_init, BLOCK_N, HEAD_D, STAGES)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(stage_i), ((base + i) // STAGES) & 1)
            acc_tok = warpgroup_mma(p16, v_bufs.index(stage_i).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
            _pass_turn(turns, WG, CONSUMERS, PINGPONG)
            l_i = l_i * alpha + gl.sum(p, 1)
            s = warpgroup_mma_wait(1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(stage_j), count=1)
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, rows, j * BLOCK_N + cols, n_keys, shift, right, qk_scale,
                                               j >= n_full, HAS_RIGHT, False)
            acc, p16 = warpgroup_mma_wait(0, deps=[acc_tok, p16])
            mbarrier.arrive(v_empty.index(stage_i), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        l_i = l_i * alpha + gl.sum(p, 1)
        p = gl.convert_layout(p.to(dtype), p_layout)
    else:
        p = gl.convert_layout(p.to(dtype), p_layout)
        # Invariant at the top of iteration i: p holds block i's probabilities, acc is scaled to block i's maximum.
        for i in range(0, n_own - 1):
            j = i + 1
            stage_i = (base + i) % STAGES
            _take_turn(turns, turn + j, WG, PINGPONG)
            stage_j, s_tok = _issue_scores(q, k_bufs, k_ready, base + j, s_init, BLOCK_N, HEAD_D, STAGES)
            mbarrier.wait(v_ready.index(stage_i), ((base + i) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_bufs.index(stage_i).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
            _pass_turn(turns, WG, CONSUMERS, PINGPONG)
            # MMA groups retire in order: with one left in flight, block j's scores are done, P V may not be.
            s = warpgroup_mma_wait(1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(stage_j), count=1)
            p_next, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, rows, j * BLOCK_N + cols, n_keys, shift, right,
                                                    qk_scale, j >= n_full, HAS_RIGHT)
            p_next = gl.convert_layout(p_next.to(dtype), p_layout)
            acc, p = warpgroup_mma_wait(0, deps=[acc_tok, p])
            mbarrier.arrive(v_empty.index(stage_i), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p = p_next

    # Every S of the tile is done: Q's buffer may be refilled.
    mbarrier.arrive(q_empty, count=1)
    last = base + n_own - 1
    stage_l = last % STAGES
    _take_turn(turns, turn + n_own, WG, PINGPONG)
    mbarrier.wait(v_ready.index(stage_l), (last // STAGES) & 1)
    acc_tok = warpgroup_mma(p, v_bufs.index(stage_l).reshape([BLOCK_N, HEAD_D]), acc, is_async=True)
    _pass_turn(turns, WG, CONSUMERS, PINGPONG)
    acc = warpgroup_mma_wait(0, deps=[acc_tok])
    mbarrier.arrive(v_empty.index(stage_l), count=1)

    # Rows with no visible key (l = 0) give 0, as PyTorch's math attention does for fully masked rows.
    l_o = gl.convert_layout(l_i, row_o)
    l_safe = gl.where(l_o == 0.0, 1.0, l_o)
    out = gl.where(gl.expand_dims(l_o == 0.0, 1), 0.0, acc / gl.expand_dims(l_safe, 1))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453

    if TMA_STORE:
        # Through this warp group's staging buffer and one TMA store, which runs on while the warp group starts its
        # next tile; TMA drops the rows past n_queries.  A TMA store whose box starts outside the tensor faults (a
        # negative row did on the H100), so a warp group whose first row is below 0 (the partial first tile of a
        # causal head, ``_fwd_tile``) or past the last row stores from registers.
        if (row0 >= 0) & (row0 < n_queries):
            o_smem = o_bufs.index(WG)
            # The buffer's previous store must have read it before it is overwritten.
            tma.store_wait(0)
            _partition_barrier()
            o_smem.reshape([WG_M, HEAD_D]).store(out.to(dtype))
            fence_async_shared()
            _partition_barrier()
            _tma_store(o_desc, [off_b, off_h, row0, 0], o_smem)
        else:
            _store_rows(Out, out, off_b, off_h, row0, stride_ob, stride_oh, stride_om, n_queries, o_layout, WG_M,
                        HEAD_D, True)
    else:
        _store_rows(Out, out, off_b, off_h, row0, stride_ob, stride_oh, stride_om, n_queries, o_layout, WG_M, HEAD_D,
                    True)
    gl.store(Lse + bh.to(gl.int64) * n_queries + rows, lse, mask=(rows >= 0) & (rows < n_queries))


@gluon.jit
def _store_rows(Ptr, value, off_b, off_h, row0, stride_b, stride_h, stride_r, n_rows, layout: gl.constexpr,
                ROWS: gl.constexpr, HEAD_D: gl.constexpr, BELOW_ZERO: gl.constexpr = False):
    """Store a [ROWS, HEAD_D] tile from registers (layout ``layout``) at rows row0.. of head (off_b, off_h); rows
    from n_rows on are masked off, and with ``BELOW_ZERO`` rows below 0 too (the forward's partial first tile under
    a causal mask; the backward passes, which store dK, dV and dQ with this too, have none, and the extra compare
    costs the dK/dV pass 8 bytes of spills at head dim 128)."""
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    dims = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, layout))
    ptrs = (Ptr + off_b.to(gl.int64) * stride_b + off_h.to(gl.int64) * stride_h
            + gl.expand_dims(rows.to(gl.int64) * stride_r, 1) + gl.expand_dims(dims, 0))
    live = rows < n_rows
    if BELOW_ZERO:
        live = live & (rows >= 0)
    gl.store(ptrs, value.to(Ptr.dtype.element_ty), mask=gl.expand_dims(live, 1))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty,
              tile_smem, Sched, n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group, n_tiles, n_programs,
              shift, right, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
              CONSUMERS: gl.constexpr, DYNAMIC: gl.constexpr):
    """Loads each tile's Q and streams its K / V blocks through the ring.  A persistent program's next tile is
    the next SM-count-th one, or with ``DYNAMIC`` the next unclaimed one in launch order, claimed from the
    counter ``Sched`` once this tile's last key block is on its way (so tiles of different lengths go to
    whichever SM frees up first, as the hardware does with a program per tile)."""
    base = n_tiles * 0
    t = n_tiles * 0
    tile = gl.program_id(0)
    while tile < n_tiles:
        bh, off_b, off_h, start_m, n_iter = _fwd_tile(tile, n_m_blocks, n_bh, head_group, n_heads, n_queries,
                                                      n_keys, shift, right, CONSUMERS * WG_M, BLOCK_N, HAS_RIGHT)
        off_hk = off_h // group
        # Fresh mbarriers count as having completed the phase before 0: the first wait on an "empty" one passes.
        mbarrier.wait(q_empty, (t & 1) ^ 1)
        if DYNAMIC:
            # Published to the consumers by the arrive below (release) and their wait on q_bar (acquire).
            _write_tile(tile_smem, tile)
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for wg in gl.static_range(CONSUMERS):
            _tma_load(q_desc, [off_b, off_h, start_m + wg * WG_M, 0], q_bar, q_bufs.index(wg))
        for i in range(n_iter):
            stage = (base + i) % STAGES
            phase = (((base + i) // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            _tma_load(k_desc, [off_b, off_hk, i * BLOCK_N, 0], k_ready.index(stage), k_bufs.index(stage))
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            _tma_load(v_desc, [off_b, off_hk, i * BLOCK_N, 0], v_ready.index(stage), v_bufs.index(stage))
        base += n_iter
        t += 1
        if DYNAMIC:
            tile = n_programs + gl.atomic_add(Sched, 1)
        else:
            tile += n_programs
    if DYNAMIC:
        # The end: an index past the last tile, published like the others (no Q load this time).
        mbarrier.wait(q_empty, (t & 1) ^ 1)
        _write_tile(tile_smem, tile)
        mbarrier.arrive(q_bar, count=1)


@gluon.jit
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, Out, Lse, o_desc, Sched, stride_ob, stride_oh, stride_om, n_heads, group,
                      n_queries, n_keys, n_m_blocks, n_bh, head_group, n_programs, shift, right, qk_scale,
                      HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMERS: gl.constexpr = 2,
                      LATE: gl.constexpr = False, PERSISTENT: gl.constexpr = False, DYNAMIC: gl.constexpr = False,
                      TMA_STORE: gl.constexpr = False, PINGPONG: gl.constexpr = False):
    """Tiles of ``CONSUMERS`` x 64 query rows of one (batch, head).  Program p takes tile p, then (when the grid
    is persistent) tiles p + n_programs, p + 2 n_programs, ..., or with ``DYNAMIC`` the next ones claimed from
    the zero-initialised int32 counter ``Sched`` (unused otherwise)."""
    n_tiles = n_m_blocks * n_bh
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if TMA_STORE:
        # O's staging buffers (one per consumer) for its TMA stores; ``o_desc`` describes Out.
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    else:
        o_bufs = q_bufs  # unused; ``o_desc`` is Out again
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    tile_smem = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if PINGPONG:
        # The consumers' turns to issue MMAs: warp group w waits on turns[w] and arrives on the next one's.
        turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        for wg in gl.static_range(CONSUMERS):
            mbarrier.init(turns.index(wg), count=1)
    else:
        turns = k_ready  # unused
    mbarrier.init(q_bar, count=1)
    # Every consumer releases a buffer before it is refilled.
    mbarrier.init(q_empty, count=CONSUMERS)
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
        mbarrier.init(k_empty.index(stage), count=CONSUMERS)
        mbarrier.init(v_empty.index(stage), count=CONSUMERS)

    # Each consumer gets the same arguments but its index.  The two partition lists are spelled out: Gluon 3.6
    # takes no (function, arguments) pair held in a variable, and a shared argument tuple extended by the index
    # turns its constexprs into tensors.
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns,
                         Out, Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys,
                         n_m_blocks, n_bh, head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D,
                         BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, 0, LATE, PERSISTENT, DYNAMIC, TMA_STORE,
                         PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns,
                         Out, Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys,
                         n_m_blocks, n_bh, head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D,
                         BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, 1, LATE, PERSISTENT, DYNAMIC, TMA_STORE,
                         PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready,
                         v_empty, tile_smem, Sched, n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group,
                         n_tiles, n_programs, shift, right, BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, DYNAMIC)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns,
                         Out, Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys,
                         n_m_blocks, n_bh, head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D,
                         BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, 0, LATE, PERSISTENT, DYNAMIC, TMA_STORE,
                         PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns,
                         Out, Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys,
                         n_m_blocks, n_bh, head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D,
                         BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, 1, LATE, PERSISTENT, DYNAMIC, TMA_STORE,
                         PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, tile_smem, turns,
                         Out, Lse, o_desc, o_bufs, stride_ob, stride_oh, stride_om, n_heads, n_queries, n_keys,
                         n_m_blocks, n_bh, head_group, n_tiles, n_programs, shift, right, qk_scale, HEAD_D,
                         BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, 2, LATE, PERSISTENT, DYNAMIC, TMA_STORE,
                         PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, k_empty, v_ready,
                         v_empty, tile_smem, Sched, n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group,
                         n_tiles, n_programs, shift, right, BLOCK_N, STAGES, HAS_RIGHT, CONSUMERS, DYNAMIC)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


def tma_compatible(x) -> bool:
    """Whether a 4-D 16-bit tensor can be read through a TMA descriptor: 16-byte aligned base, unit-stride last
    dim, and every other stride (of a dim longer than 1) a positive multiple of 16 bytes."""
    if x.dim() != 4 or x.element_size() != 2 or x.data_ptr() % 16 != 0 or x.stride(3) != 1:
        return False
    return all(size == 1 or (stride > 0 and stride % 8 == 0) for size, stride in zip(x.shape[:3], x.stride()[:3]))


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, head_d: int, itemsize: int):
    """The shared-memory layout of a [1, 1, rows, head_d] TMA tile (computed once per tile shape: descriptors are
    built on every launch)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_d], gl.float16 if itemsize == 2 else gl.float32)


def _descriptor(x, rows: int, cols: int | None = None):
    """A TMA descriptor over the 4-D tensor ``x`` [B, H, L, D] moving [1, 1, rows, cols] tiles (cols: D by
    default).  A dim of length 1 may carry any stride in PyTorch; the descriptor gets a valid one (only index 0 is
    ever read there)."""
    cols = x.shape[3] if cols is None else cols
    block = [1, 1, rows, cols]
    layout = _tile_layout(rows, cols, x.dtype.itemsize)
    strides = [stride if size > 1 else 8 * max(1, -(-abs(stride) // 8))
               for size, stride in zip(x.shape[:3], x.stride()[:3])] + [1]
    return TensorDescriptor(x, list(x.shape), strides, block, layout)


def gluon_forward(q, k, v, out, lse, scale: float, causal_right: int, shift: int, block_n: int | None = None,
                  stages: int = 2, consumer_regs: int | None = None, maxnreg: int | None = None,
                  consumers: int | None = None, late: bool | None = None, persistent: bool | None = None,
                  group_heads: int | None = None, programs: int | None = None, dynamic: bool | None = None,
                  tma_store: bool | None = None, pingpong: bool | None = None):
    """Launch the kernel.  q [B, H, M, D], k / v [B, HK, N, D] (16-bit, last dim contiguous, TMA-aligned);
    ``causal_right`` < 0: no causal mask, else key j is visible to row i iff j <= i + shift + causal_right.
    Needs M, N >= 1, ``tma_compatible`` q, k, v and a Hopper GPU; the caller checks.
    Writes out [B, H, M, D] (any strides with a contiguous last dim) and lse [B, H, M] (contiguous fp32).
    ``block_n``: keys per block (default ``BLOCK_N`` of the head dim); ``consumers``: consumer warp groups, 2 or
    3 (default ``CONSUMERS`` of the head dim for more than 128 queries, else 2); ``late``: the consumer loop that
    converts and sums P and rescales O in the next iteration (default: non-causal calls at ``LATE_HEAD_DIMS``
    with two consumers); ``persistent``: one program per SM, each running several tiles (default: non-causal
    calls within ``PERSISTENT_MAX_KEYS`` or at ``CLAIMING_HEAD_DIMS``, causal calls at
    ``PERSISTENT_CAUSAL_HEAD_DIMS``; ``programs`` caps that grid below the SM count, which tests use to give small
    problems several tiles a program); ``dynamic``: a persistent program claims its next tile from a counter in
    launch order rather than taking every SM-count-th one (default: under a causal mask, where tiles differ in
    length, and at ``CLAIMING_HEAD_DIMS``); ``group_heads``: heads whose tiles are interleaved (default
    ``common.head_group``); ``tma_store``: O leaves through shared memory and a TMA store (default: head dims in
    ``TMA_STORE_HEAD_DIMS``; never when ``out`` is not ``tma_compatible``); ``pingpong``: the consumers issue
    their MMAs in turns (default: causal calls within ``PINGPONG_CAUSAL_MAX_KEYS``).
    ``consumer_regs`` / ``maxnreg``: registers per consumer thread and at launch (default ``REGISTERS`` of the
    consumer count, one program per SM; ``benchmarks/explore_gluon_fwd.py`` tries others)."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if block_n is None:
        block_n = BLOCK_N.get(head_d, 64)
    if consumers is None:
        # Where one two-consumer program covers every row, a third warp group would only add idle rows.
        consumers = CONSUMERS.get(head_d, 2) if n_queries > 2 * ROWS_PER_CONSUMER else 2
    has_right = causal_right >= 0
    if late is None:
        late = not has_right and head_d in LATE_HEAD_DIMS and consumers == 2
    if persistent is None:
        persistent = (head_d in PERSISTENT_CAUSAL_HEAD_DIMS if has_right
                      else head_d in CLAIMING_HEAD_DIMS or n_keys <= PERSISTENT_MAX_KEYS.get(head_d, 0))
    if dynamic is None:
        dynamic = has_right or head_d in CLAIMING_HEAD_DIMS
    if group_heads is None:
        group_heads = head_group(has_right, 2 * n_keys * head_d * k.element_size())
    default_regs, default_maxnreg = REGISTERS[consumers]
    consumer_regs = default_regs if consumer_regs is None else consumer_regs
    maxnreg = default_maxnreg if maxnreg is None else maxnreg
    n_m_blocks = triton.cdiv(n_queries, consumers * ROWS_PER_CONSUMER)
    n_tiles = n_m_blocks * batch * heads
    # The persistent grid holds one program per SM: REGISTERS and the shared memory allow no second one.
    n_programs = min(n_tiles, programs or sm_count(q.device)) if persistent else n_tiles
    dynamic = dynamic and n_programs < n_tiles
    sched = torch.zeros(1, dtype=torch.int32, device=q.device) if dynamic else lse
    if tma_store is None:
        tma_store = head_d in TMA_STORE_HEAD_DIMS
    tma_store = tma_store and tma_compatible(out)
    if pingpong is None:
        pingpong = has_right and n_keys <= PINGPONG_CAUSAL_MAX_KEYS.get(head_d, 0)
    _gluon_fwd_kernel[(n_programs,)](
        _descriptor(q, ROWS_PER_CONSUMER), _descriptor(k, block_n), _descriptor(v, block_n), out, lse,
        _descriptor(out, ROWS_PER_CONSUMER) if tma_store else out, sched,
        out.stride(0), out.stride(1), out.stride(2), heads, heads // kv_heads, n_queries, n_keys, n_m_blocks,
        batch * heads, group_heads, n_programs, shift if has_right else 0, causal_right if has_right else 0,
        scale * LOG2E, HEAD_D=head_d, BLOCK_N=block_n, STAGES=stages, HAS_RIGHT=has_right,
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=24, CONSUMERS=consumers, LATE=late, PERSISTENT=n_programs < n_tiles,
        DYNAMIC=dynamic, TMA_STORE=tma_store, PINGPONG=pingpong, num_warps=4, maxnreg=maxnreg, **FP_FUSION)
