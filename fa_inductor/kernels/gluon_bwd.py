"""Hopper (sm90) backward passes in Gluon, warp-specialised like ``gluon_fwd.py``: dK/dV and dQ.

They replace launches 2 and 3 of ``flash_bwd.py``; the preprocess (Delta, LSE in log2 units) stays the Triton
kernel there.  Both passes recompute P = exp2(S - LSE) from the scores and dS = P * (dP - Delta) with
dP = dO V^T.

dK/dV (``gluon_backward_kv``), one program per 128 keys of one (batch, key head):

* a producer partition (one warp) TMA-loads the program's K and V once, then streams (Q, dO) tiles of 64 query
  rows through a ring of ``STAGES`` buffers, over every query head of the key head's group (grouped-query
  attention without repeating K/V) and every query block that sees the keys;
* two consumer partitions (one warp group each, 64 keys each) work in the transposed orientation, keys as rows:
  S^T = K Q^T and dP^T = V dO^T are issued together as asynchronous MMAs, P^T is computed while dP^T is still
  on the tensor cores, then dV += P^T dO and dK += dS^T Q.

At head dim 256 (``ROLE_SPLIT_HEAD_DIMS``) a warp group cannot hold both [64, 256] fp32 accumulators, so the
dK/dV pass runs ``_gluon_bwd_kv_roles_kernel`` instead: one program per 64 keys, whose two consumers split the
work by role.  One computes S^T and P^T, hands P^T over through a small shared-memory ring (fp32, two slots with
"full" / "empty" mbarriers) and accumulates dV += P^T dO; the other computes dP^T = V dO^T, takes P^T, and
accumulates dK += dS^T Q.  Each role does two of the four products, and the MMAs of one overlap the other's
exponentials.

dQ (``gluon_backward_q``), one program per 128 query rows of one (batch, head) (192 with ``consumers=3``, an
option ``benchmarks/explore_gluon_bwd.py`` measures; the op uses two): the producer loads Q and dO once
and streams K and V in blocks of ``block_keys``; each consumer (64 rows) issues S = Q K^T and dP = dO V^T
together and accumulates dQ += dS K.

One pass (``gluon_backward_one_pass``, head dims in ``ONE_PASS_HEAD_DIMS``): the dK/dV program above also
computes each query tile's dQ contribution dS K, with dS^T stored to shared memory and read transposed by two
[64, 32]-column MMAs (K is loaded a second time in 32-column halves for them), and adds it into a zeroed fp32
buffer through a staging tile and TMA bulk reductions.  The reductions of one tile are issued while the next tile's
S^T and dP^T are on the tensor cores.  Under a causal mask (``ONE_PASS_SHARED_DQ_CAUSAL``) the two consumers share
their dS^T tiles instead: each computes one 32-column half of the tile's dQ over all 128 keys of the program, so a
program reduces one dQ tile per query tile rather than two.  The producer also loads each tile's LSE and Delta
and stores them into the ring stage, whose "ready" mbarrier then takes two arrivals (the TMA bytes, the
producer's stores).

Query rows past M arrive zero-filled (TMA) and carry LSE = +inf, so they add exactly nothing; key tails and the
blocks that cross the causal diagonal are the only ones that pay for mask arithmetic.  ``op.py``'s Hopper
backward calls them after checking what they support (``op.gluon_backward_applies``): both passes at
``op.GLUON_BACKWARD_HEAD_DIMS``, the dQ pass alone (after the Triton dK/dV pass) for causal calls at
``op.GLUON_DQ_CAUSAL_HEAD_DIMS``, and the one-pass kernel at ``op.ONE_PASS_HEAD_DIMS`` without grouped heads.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import FP_FUSION, LOG2E, head_group, tile_coords
from .gluon_fwd import REGISTERS, _descriptor, _mma_layout, _partition_barrier, _store_rows, _tma_load

__all__ = ["gluon_backward_kv", "gluon_backward_q", "gluon_backward_one_pass", "ONE_PASS_AVAILABLE"]

KEYS_PER_CONSUMER = 64
QUERY_BLOCK = 64
WG_N = gl.constexpr(KEYS_PER_CONSUMER)
TILE_M = gl.constexpr(QUERY_BLOCK)


@gluon.jit
def _buffers(a_desc, b_desc, ring_a_desc, ring_b_desc, STAGES: gl.constexpr, RESIDENT: gl.constexpr = 2,
             CONSUMERS: gl.constexpr = 2, READY_ARRIVALS: gl.constexpr = 1):
    """Shared memory of the backward passes: ``RESIDENT`` tiles each of the operands a program keeps (one per
    consumer that owns rows, signalled by one mbarrier), and a ring of ``STAGES`` tiles each of the operands it
    streams, with "ready" (TMA bytes landed) and "empty" (all ``CONSUMERS`` released it) mbarriers per stage."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [RESIDENT] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [RESIDENT] + b_desc.block_type.shape, b_desc.layout)
    ring_a = gl.allocate_shared_memory(ring_a_desc.dtype, [STAGES] + ring_a_desc.block_type.shape,
                                       ring_a_desc.layout)
    ring_b = gl.allocate_shared_memory(ring_b_desc.dtype, [STAGES] + ring_b_desc.block_type.shape,
                                       ring_b_desc.layout)
    resident = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(resident, count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=READY_ARRIVALS)
        mbarrier.init(empty.index(stage), count=CONSUMERS)
    return a_bufs, b_bufs, ring_a, ring_b, resident, ready, empty


@gluon.jit
def _kv_program(n_n_blocks, kv_heads, n_queries, shift, right, KEYS: gl.constexpr, HAS_RIGHT: gl.constexpr):
    """What a dK/dV program owns: keys [start_n, start_n + KEYS) of key head (off_b, off_hk), and the query blocks
    it visits: [q_lo, M) see some of its keys, from full_lo on they see all of them; per_head blocks per head.
    One head at a time, as in ``flash_bwd._bwd_kv_kernel`` (and for its reason)."""
    pid = gl.program_id(0)
    bhk = pid // n_n_blocks
    start_n = (pid % n_n_blocks) * KEYS
    off_b = bhk // kv_heads
    off_hk = bhk % kv_heads
    q_lo = start_n * 0
    full_lo = start_n * 0
    if HAS_RIGHT:
        q_lo = gl.maximum(start_n - shift - right, 0) // TILE_M * TILE_M
        full_lo = gl.maximum(start_n + KEYS - 1 - shift - right, 0)
    per_head = gl.maximum(gl.cdiv(n_queries - q_lo, TILE_M), 0)
    return off_b, off_hk, start_n, q_lo, full_lo, per_head


@gluon.jit
def _query_block(it, off_hk, group, per_head, q_lo):
    """Query head and first row of iteration ``it`` of a dK/dV program (its query heads one after another)."""
    return off_hk * group + it // per_head, q_lo + (it % per_head) * TILE_M


@gluon.jit
def _query_tile(it, off_b, off_hk, group, per_head, q_lo, n_heads, n_queries, cols):
    """First row and the [B, H, M] offsets of the rows (columns ``cols``) of iteration ``it`` of a dK/dV program."""
    off_h, row0 = _query_block(it, off_hk, group, per_head, q_lo)
    rows = row0 + cols
    stats = (off_b * n_heads + off_h).to(gl.int64) * n_queries + rows
    return row0, rows, stats


@gluon.jit
def _ring_tiles(q_ring, do_ring, ready, it, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """Wait for iteration ``it``'s (Q, dO) tiles to land; (ring stage, Q tile, dO tile)."""
    stage = it % STAGES
    mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
    return stage, q_ring.index(stage).reshape([TILE_M, HEAD_D]), do_ring.index(stage).reshape([TILE_M, HEAD_D])


@gluon.jit
def _kv_consumer(k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty, LseUnits, Delta, DK, DV, off_b, off_hk,
                 key0, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, group,
                 n_queries, n_keys, shift, right, qk_scale, scale, q_lo, full_lo, per_head,
                 HEAD_D: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr):
    s_layout: gl.constexpr = _mma_layout(TILE_M)
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = k_bufs.dtype

    keys = key0 + gl.arange(0, WG_N, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, TILE_M, layout=gl.SliceLayout(0, s_layout))
    k = k_bufs.index(WG).reshape([WG_N, HEAD_D])
    v = v_bufs.index(WG).reshape([WG_N, HEAD_D])
    s_init = gl.zeros([WG_N, TILE_M], gl.float32, layout=s_layout)
    dk = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)

    for it in range(group * per_head):
        row0, rows, stats = _query_tile(it, off_b, off_hk, group, per_head, q_lo, n_heads, n_queries, cols)
        # Rows past M: LSE = +inf makes P = 0 there.
        lse = gl.load(LseUnits + stats, mask=rows < n_queries, other=float("inf"))
        delta = gl.load(Delta + stats, mask=rows < n_queries, other=0.0)
        stage, q, do = _ring_tiles(q_ring, do_ring, ready, it, HEAD_D, STAGES)
        st_tok = warpgroup_mma(k, q.permute((1, 0)), s_init, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), s_init, use_acc=False, is_async=True)
        # In-order retirement: with one group left in flight, S^T is done and dP^T may not be.
        st = warpgroup_mma_wait(1, deps=[st_tok])
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if row0 < full_lo:
            keep = gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0) + (shift + right)
            pt = gl.where(keep, pt, 0.0)
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        pt16 = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt16, do, dv, is_async=True)
        dst16 = gl.convert_layout((pt * (dpt - gl.expand_dims(delta, 0))).to(dtype), a_layout)
        dk_tok = warpgroup_mma(dst16, q, dk, is_async=True)
        dv, dk, pt16, dst16 = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, pt16, dst16])
        mbarrier.arrive(empty.index(stage), count=1)

    _store_rows(DK, dk * scale, off_b, off_hk, key0, stride_dkb, stride_dkh, stride_dkn, n_keys, acc_layout, WG_N,
                HEAD_D)
    _store_rows(DV, dv, off_b, off_hk, key0, stride_dvb, stride_dvh, stride_dvn, n_keys, acc_layout, WG_N, HEAD_D)


@gluon.jit
def _kv_producer(q_desc, k_desc, v_desc, do_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty, off_b,
                 off_hk, start_n, group, q_lo, per_head, STAGES: gl.constexpr):
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    _tma_load(k_desc, [off_b, off_hk, start_n, 0], kv_bar, k_bufs.index(0))
    _tma_load(k_desc, [off_b, off_hk, start_n + WG_N, 0], kv_bar, k_bufs.index(1))
    _tma_load(v_desc, [off_b, off_hk, start_n, 0], kv_bar, v_bufs.index(0))
    _tma_load(v_desc, [off_b, off_hk, start_n + WG_N, 0], kv_bar, v_bufs.index(1))
    _stream_queries(q_desc, do_desc, q_ring, do_ring, ready, empty, off_b, off_hk, group, q_lo, per_head, STAGES)


@gluon.jit
def _stream_queries(q_desc, do_desc, q_ring, do_ring, ready, empty, off_b, off_hk, group, q_lo, per_head,
                    STAGES: gl.constexpr, stat_ring=None, LseUnits=None, Delta=None, n_heads=0, n_queries=0,
                    STATS: gl.constexpr = False):
    """The dK/dV producer's loop: the (Q, dO) tiles of every query head of the group and every query block from
    q_lo, through the ring.  ``STATS`` (the one-pass kernel): each stage also carries its rows' LSE and Delta,
    loaded by this warp and stored to ``stat_ring`` (the stage's second arrival), so that no consumer waits on
    global loads."""
    stat_layout: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    for it in range(group * per_head):
        off_h, row0 = _query_block(it, off_hk, group, per_head, q_lo)
        stage = it % STAGES
        # Fresh mbarriers count as having completed the phase before 0: the first lap does not wait.
        mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [off_b, off_h, row0, 0], ready.index(stage), q_ring.index(stage))
        _tma_load(do_desc, [off_b, off_h, row0, 0], ready.index(stage), do_ring.index(stage))
        if STATS:
            rows = row0 + gl.arange(0, TILE_M, layout=stat_layout)
            stats = (off_b * n_heads + off_h).to(gl.int64) * n_queries + rows
            # Rows past M: LSE = +inf makes P = 0 there.
            stat_ring.index(2 * stage).store(gl.load(LseUnits + stats, mask=rows < n_queries, other=float("inf")))
            stat_ring.index(2 * stage + 1).store(gl.load(Delta + stats, mask=rows < n_queries, other=0.0))
            mbarrier.arrive(ready.index(stage), count=1)


@gluon.jit
def _gluon_bwd_kv_kernel(q_desc, k_desc, v_desc, do_desc, LseUnits, Delta, DK, DV, stride_dkb, stride_dkh,
                         stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, kv_heads, group, n_queries, n_keys,
                         n_n_blocks, shift, right, qk_scale, scale,
                         HEAD_D: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    off_b, off_hk, start_n, q_lo, full_lo, per_head = _kv_program(n_n_blocks, kv_heads, n_queries, shift, right,
                                                                  2 * WG_N, HAS_RIGHT)
    k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty = _buffers(k_desc, v_desc, q_desc, do_desc, STAGES)

    gl.warp_specialize([
        (_kv_consumer, (k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty, LseUnits, Delta, DK, DV, off_b,
                        off_hk, start_n, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                        n_heads, group, n_queries, n_keys, shift, right, qk_scale, scale, q_lo, full_lo, per_head,
                        HEAD_D, STAGES, HAS_RIGHT, 0)),
        (_kv_consumer, (k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty, LseUnits, Delta, DK, DV, off_b,
                        off_hk, start_n + WG_N, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                        stride_dvn, n_heads, group, n_queries, n_keys, shift, right, qk_scale, scale, q_lo, full_lo,
                        per_head, HEAD_D, STAGES, HAS_RIGHT, 1)),
        (_kv_producer, (q_desc, k_desc, v_desc, do_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty,
                        off_b, off_hk, start_n, group, q_lo, per_head, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# Head dims whose dK/dV pass splits the work by role (``_gluon_bwd_kv_roles_kernel``): a [64, D] fp32
# accumulator per warp group is all the registers one can hold there, so each consumer keeps one of dK / dV.
ROLE_SPLIT_HEAD_DIMS = (256,)
P_STAGES = gl.constexpr(2)  # P^T tiles in flight between the two role partitions


@gluon.jit
def _kv_p_role(k_bufs, q_ring, do_ring, p_bufs, kv_bar, ready, empty, p_full, p_empty, LseUnits, DV, off_b,
               off_hk, key0, stride_dvb, stride_dvh, stride_dvn, n_heads, group, n_queries, n_keys, shift, right,
               qk_scale, q_lo, full_lo, per_head, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """The first role of ``_gluon_bwd_kv_roles_kernel``: S^T = K Q^T, P^T (handed to the other role through
    shared memory in fp32), dV += P^T dO."""
    s_layout: gl.constexpr = _mma_layout(TILE_M)
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = k_bufs.dtype

    keys = key0 + gl.arange(0, WG_N, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, TILE_M, layout=gl.SliceLayout(0, s_layout))
    k = k_bufs.index(0).reshape([WG_N, HEAD_D])
    s_init = gl.zeros([WG_N, TILE_M], gl.float32, layout=s_layout)
    dv = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)

    for it in range(group * per_head):
        row0, rows, stats = _query_tile(it, off_b, off_hk, group, per_head, q_lo, n_heads, n_queries, cols)
        # Rows past M: LSE = +inf makes P = 0 there.
        lse = gl.load(LseUnits + stats, mask=rows < n_queries, other=float("inf"))
        stage, q, do = _ring_tiles(q_ring, do_ring, ready, it, HEAD_D, STAGES)
        st_tok = warpgroup_mma(k, q.permute((1, 0)), s_init, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(0, deps=[st_tok])
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if row0 < full_lo:
            keep = gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0) + (shift + right)
            pt = gl.where(keep, pt, 0.0)
        slot = it % P_STAGES
        # Fresh mbarriers count as having completed the phase before 0: the first lap does not wait.
        mbarrier.wait(p_empty.index(slot), ((it // P_STAGES) & 1) ^ 1)
        p_bufs.index(slot).store(pt)
        mbarrier.arrive(p_full.index(slot), count=1)
        pt16 = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt16, do, dv, is_async=True)
        dv, pt16 = warpgroup_mma_wait(0, deps=[dv_tok, pt16])
        mbarrier.arrive(empty.index(stage), count=1)

    _store_rows(DV, dv, off_b, off_hk, key0, stride_dvb, stride_dvh, stride_dvn, n_keys, acc_layout, WG_N, HEAD_D)


@gluon.jit
def _kv_ds_role(v_bufs, q_ring, do_ring, p_bufs, kv_bar, ready, empty, p_full, p_empty, Delta, DK, off_b, off_hk,
                key0, stride_dkb, stride_dkh, stride_dkn, n_heads, group, n_queries, n_keys, scale, q_lo,
                per_head, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """The second role: dP^T = V dO^T, dS^T = P^T * (dP^T - Delta) with the other role's P^T, dK += dS^T Q."""
    s_layout: gl.constexpr = _mma_layout(TILE_M)
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = v_bufs.dtype

    cols = gl.arange(0, TILE_M, layout=gl.SliceLayout(0, s_layout))
    v = v_bufs.index(0).reshape([WG_N, HEAD_D])
    s_init = gl.zeros([WG_N, TILE_M], gl.float32, layout=s_layout)
    dk = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)

    for it in range(group * per_head):
        row0, rows, stats = _query_tile(it, off_b, off_hk, group, per_head, q_lo, n_heads, n_queries, cols)
        delta = gl.load(Delta + stats, mask=rows < n_queries, other=0.0)
        stage, q, do = _ring_tiles(q_ring, do_ring, ready, it, HEAD_D, STAGES)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), s_init, use_acc=False, is_async=True)
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        slot = it % P_STAGES
        mbarrier.wait(p_full.index(slot), (it // P_STAGES) & 1)
        pt = p_bufs.index(slot).load(s_layout)
        mbarrier.arrive(p_empty.index(slot), count=1)
        dst16 = gl.convert_layout((pt * (dpt - gl.expand_dims(delta, 0))).to(dtype), a_layout)
        dk_tok = warpgroup_mma(dst16, q, dk, is_async=True)
        dk, dst16 = warpgroup_mma_wait(0, deps=[dk_tok, dst16])
        mbarrier.arrive(empty.index(stage), count=1)

    _store_rows(DK, dk * scale, off_b, off_hk, key0, stride_dkb, stride_dkh, stride_dkn, n_keys, acc_layout, WG_N,
                HEAD_D)


@gluon.jit
def _kv_roles_producer(q_desc, k_desc, v_desc, do_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty,
                       off_b, off_hk, start_n, group, q_lo, per_head, STAGES: gl.constexpr):
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, [off_b, off_hk, start_n, 0], kv_bar, k_bufs.index(0))
    _tma_load(v_desc, [off_b, off_hk, start_n, 0], kv_bar, v_bufs.index(0))
    _stream_queries(q_desc, do_desc, q_ring, do_ring, ready, empty, off_b, off_hk, group, q_lo, per_head, STAGES)


@gluon.jit
def _gluon_bwd_kv_roles_kernel(q_desc, k_desc, v_desc, do_desc, LseUnits, Delta, DK, DV, stride_dkb, stride_dkh,
                               stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, kv_heads, group,
                               n_queries, n_keys, n_n_blocks, shift, right, qk_scale, scale,
                               HEAD_D: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """dK/dV for large head dims, one program per 64 keys of one (batch, key head): the two consumer warp groups
    share the keys and split the work by role (``_kv_p_role``, ``_kv_ds_role``) instead of by keys."""
    off_b, off_hk, start_n, q_lo, full_lo, per_head = _kv_program(n_n_blocks, kv_heads, n_queries, shift, right,
                                                                  WG_N, HAS_RIGHT)
    k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty = _buffers(k_desc, v_desc, q_desc, do_desc, STAGES, 1)
    p_bufs = gl.allocate_shared_memory(gl.float32, [P_STAGES, WG_N, TILE_M],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    p_full = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
    p_empty = gl.allocate_shared_memory(gl.int64, [P_STAGES, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(P_STAGES):
        mbarrier.init(p_full.index(slot), count=1)
        mbarrier.init(p_empty.index(slot), count=1)

    gl.warp_specialize([
        (_kv_p_role, (k_bufs, q_ring, do_ring, p_bufs, kv_bar, ready, empty, p_full, p_empty, LseUnits, DV, off_b,
                      off_hk, start_n, stride_dvb, stride_dvh, stride_dvn, n_heads, group, n_queries, n_keys, shift,
                      right, qk_scale, q_lo, full_lo, per_head, HEAD_D, STAGES)),
        (_kv_ds_role, (v_bufs, q_ring, do_ring, p_bufs, kv_bar, ready, empty, p_full, p_empty, Delta, DK, off_b,
                       off_hk, start_n, stride_dkb, stride_dkh, stride_dkn, n_heads, group, n_queries, n_keys, scale,
                       q_lo, per_head, HEAD_D, STAGES)),
        (_kv_roles_producer, (q_desc, k_desc, v_desc, do_desc, k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready,
                              empty, off_b, off_hk, start_n, group, q_lo, per_head, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@gluon.jit
def _q_consumer(q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h, bh, row0,
                stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift, right, qk_scale, scale, n_iter, n_full,
                HEAD_D: gl.constexpr, BLOCK_KEYS: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
                WG: gl.constexpr):
    s_layout: gl.constexpr = _mma_layout(BLOCK_KEYS)
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = q_bufs.dtype

    rows = row0 + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_KEYS, layout=gl.SliceLayout(0, s_layout))
    stats = bh.to(gl.int64) * n_queries + rows
    # Rows past M: LSE = +inf makes P = 0 there.
    lse = gl.load(LseUnits + stats, mask=rows < n_queries, other=float("inf"))
    delta = gl.load(Delta + stats, mask=rows < n_queries, other=0.0)
    q = q_bufs.index(WG).reshape([TILE_M, HEAD_D])
    do = do_bufs.index(WG).reshape([TILE_M, HEAD_D])
    s_init = gl.zeros([TILE_M, BLOCK_KEYS], gl.float32, layout=s_layout)
    dq = gl.zeros([TILE_M, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(qdo_bar, 0)

    for it in range(n_iter):
        stage = it % STAGES
        mbarrier.wait(ready.index(stage), (it // STAGES) & 1)
        k = k_ring.index(stage).reshape([BLOCK_KEYS, HEAD_D])
        v = v_ring.index(stage).reshape([BLOCK_KEYS, HEAD_D])
        s_tok = warpgroup_mma(q, k.permute((1, 0)), s_init, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v.permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
        if it >= n_full:
            keys = it * BLOCK_KEYS + cols
            keep = gl.expand_dims(keys, 0) < n_keys
            if HAS_RIGHT:
                keep = keep & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows, 1) + (shift + right))
            p = gl.where(keep, p, 0.0)
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds16 = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(dtype), a_layout)
        dq_tok = warpgroup_mma(ds16, k, dq, is_async=True)
        dq, ds16 = warpgroup_mma_wait(0, deps=[dq_tok, ds16])
        mbarrier.arrive(empty.index(stage), count=1)

    _store_rows(DQ, dq * scale, off_b, off_h, row0, stride_dqb, stride_dqh, stride_dqm, n_queries, acc_layout, TILE_M,
                HEAD_D)


@gluon.jit
def _q_producer(q_desc, k_desc, v_desc, do_desc, q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, off_b,
                off_h, off_hk, start_m, n_iter, BLOCK_KEYS: gl.constexpr, STAGES: gl.constexpr,
                CONSUMERS: gl.constexpr):
    mbarrier.expect(qdo_bar, CONSUMERS * (q_desc.block_type.nbytes + do_desc.block_type.nbytes))
    for wg in gl.static_range(CONSUMERS):
        _tma_load(q_desc, [off_b, off_h, start_m + wg * TILE_M, 0], qdo_bar, q_bufs.index(wg))
        _tma_load(do_desc, [off_b, off_h, start_m + wg * TILE_M, 0], qdo_bar, do_bufs.index(wg))
    for it in range(n_iter):
        stage = it % STAGES
        mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [off_b, off_hk, it * BLOCK_KEYS, 0], ready.index(stage), k_ring.index(stage))
        _tma_load(v_desc, [off_b, off_hk, it * BLOCK_KEYS, 0], ready.index(stage), v_ring.index(stage))


@gluon.jit
def _gluon_bwd_q_kernel(q_desc, k_desc, v_desc, do_desc, LseUnits, Delta, DQ, stride_dqb, stride_dqh, stride_dqm,
                        n_heads, group, n_queries, n_keys, n_m_blocks, n_bh, head_group, shift, right, qk_scale,
                        scale, HEAD_D: gl.constexpr, BLOCK_KEYS: gl.constexpr, STAGES: gl.constexpr,
                        HAS_RIGHT: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                        CONSUMERS: gl.constexpr = 2):
    # Causal: the longest rows first, over groups of head_group heads (``common.head_group``).
    bh, m_block = tile_coords(gl.program_id(0), n_m_blocks, n_bh, head_group, HAS_RIGHT)
    off_b = bh // n_heads
    off_h = bh % n_heads
    off_hk = off_h // group
    start_m = m_block * (CONSUMERS * TILE_M)
    # Keys [0, hi) are visible to some row of this block, keys [0, n_full * BLOCK_KEYS) to all of them.
    hi = n_keys
    full_hi = n_keys
    if HAS_RIGHT:
        hi = gl.minimum(hi, gl.maximum(start_m + CONSUMERS * TILE_M + shift + right, 0))
        full_hi = gl.minimum(full_hi, gl.maximum(start_m + shift + right + 1, 0))
    n_iter = gl.cdiv(hi, BLOCK_KEYS)
    n_full = full_hi // BLOCK_KEYS

    q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty = _buffers(q_desc, do_desc, k_desc, v_desc, STAGES,
                                                                      CONSUMERS, CONSUMERS)

    # One partition list per consumer count, spelled out as in ``gluon_fwd._gluon_fwd_kernel`` (and for its reason).
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_q_consumer, (q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h,
                           bh, start_m, stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift, right,
                           qk_scale, scale, n_iter, n_full, HEAD_D, BLOCK_KEYS, STAGES, HAS_RIGHT, 0)),
            (_q_consumer, (q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h,
                           bh, start_m + TILE_M, stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift, right,
                           qk_scale, scale, n_iter, n_full, HEAD_D, BLOCK_KEYS, STAGES, HAS_RIGHT, 1)),
            (_q_producer, (q_desc, k_desc, v_desc, do_desc, q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty,
                           off_b, off_h, off_hk, start_m, n_iter, BLOCK_KEYS, STAGES, CONSUMERS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_q_consumer, (q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h,
                           bh, start_m, stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift, right,
                           qk_scale, scale, n_iter, n_full, HEAD_D, BLOCK_KEYS, STAGES, HAS_RIGHT, 0)),
            (_q_consumer, (q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h,
                           bh, start_m + TILE_M, stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift, right,
                           qk_scale, scale, n_iter, n_full, HEAD_D, BLOCK_KEYS, STAGES, HAS_RIGHT, 1)),
            (_q_consumer, (q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty, LseUnits, Delta, DQ, off_b, off_h,
                           bh, start_m + 2 * TILE_M, stride_dqb, stride_dqh, stride_dqm, n_queries, n_keys, shift,
                           right, qk_scale, scale, n_iter, n_full, HEAD_D, BLOCK_KEYS, STAGES, HAS_RIGHT, 2)),
            (_q_producer, (q_desc, k_desc, v_desc, do_desc, q_bufs, do_bufs, k_ring, v_ring, qdo_bar, ready, empty,
                           off_b, off_h, off_hk, start_m, n_iter, BLOCK_KEYS, STAGES, CONSUMERS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


def gluon_backward_kv(q, k, v, grad_out, lse_units, delta, dk, dv, scale: float, causal_right: int, shift: int,
                      stages: int = 2) -> None:
    """Write dk, dv (last dim contiguous) for q [B, H, M, D], k / v [B, HK, N, D], grad_out [B, H, M, D], all
    ``gluon_fwd.tma_compatible``; ``lse_units`` (LSE in log2 units, +inf for rows with no visible key) and
    ``delta`` (rowsum(dO * O) - dLSE) are contiguous fp32 [B, H, M] from ``flash_bwd``'s preprocess.
    ``causal_right`` < 0: no mask, else key j is visible to row i iff j <= i + shift + causal_right."""
    batch, heads, n_queries, head_d = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    roles = head_d in ROLE_SPLIT_HEAD_DIMS
    n_n_blocks = triton.cdiv(n_keys, KEYS_PER_CONSUMER if roles else 2 * KEYS_PER_CONSUMER)
    has_right = causal_right >= 0
    kernel = _gluon_bwd_kv_roles_kernel if roles else _gluon_bwd_kv_kernel
    regs, maxnreg = REGISTERS[2]
    kernel[(n_n_blocks * batch * kv_heads,)](
        _descriptor(q, QUERY_BLOCK), _descriptor(k, KEYS_PER_CONSUMER), _descriptor(v, KEYS_PER_CONSUMER),
        _descriptor(grad_out, QUERY_BLOCK), lse_units, delta, dk, dv, dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), heads, kv_heads, heads // kv_heads, n_queries, n_keys, n_n_blocks,
        shift if has_right else 0, causal_right if has_right else 0, scale * LOG2E, scale,
        HEAD_D=head_d, STAGES=stages, HAS_RIGHT=has_right, CONSUMER_REGS=regs, PRODUCER_REGS=24,
        num_warps=4, maxnreg=maxnreg, **FP_FUSION)


def gluon_backward_q(q, k, v, grad_out, lse_units, delta, dq, scale: float, causal_right: int, shift: int,
                     block_keys: int | None = None, stages: int = 2, consumers: int = 2,
                     group_heads: int | None = None) -> None:
    """Write dq (last dim contiguous) for the operands of ``gluon_backward_kv``: one program per ``consumers`` x 64
    query rows of one head (2 or 3 consumer warp groups), looping over the key blocks of ``block_keys`` rows that
    the forward visited (by default 64, and 32 at head dims above 128, where 64-key blocks spill registers and
    overflow shared memory).  ``group_heads``: heads whose programs are interleaved (default ``common.head_group``)."""
    batch, heads, n_queries, head_d = q.shape
    if block_keys is None:
        block_keys = 64 if head_d <= 128 else 32
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if group_heads is None:
        group_heads = head_group(causal_right >= 0, n_keys * 2 * head_d * k.element_size())
    n_m_blocks = triton.cdiv(n_queries, consumers * QUERY_BLOCK)
    regs, maxnreg = REGISTERS[consumers]
    has_right = causal_right >= 0
    _gluon_bwd_q_kernel[(n_m_blocks * batch * heads,)](
        _descriptor(q, QUERY_BLOCK), _descriptor(k, block_keys), _descriptor(v, block_keys),
        _descriptor(grad_out, QUERY_BLOCK), lse_units, delta, dq, dq.stride(0), dq.stride(1), dq.stride(2), heads,
        heads // kv_heads, n_queries, n_keys, n_m_blocks, batch * heads, group_heads, shift if has_right else 0,
        causal_right if has_right else 0, scale * LOG2E, scale,
        HEAD_D=head_d, BLOCK_KEYS=block_keys, STAGES=stages, HAS_RIGHT=has_right, CONSUMER_REGS=regs,
        PRODUCER_REGS=24, CONSUMERS=consumers, num_warps=4, maxnreg=maxnreg, **FP_FUSION)


# ---------------------------------------------------------------------------------------------------------------
# One-pass backward: the dK/dV program also computes dQ += dS K and adds it into an fp32 buffer with TMA bulk
# reductions (cp.reduce.async.bulk.tensor), so no dQ pass recomputes S and dP (5 matrix products per tile pair
# instead of 7).

if hasattr(tma, "async_atomic_add"):  # Triton 3.9's name
    _tma_reduce_add = tma.async_atomic_add
else:
    @builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """global[box at coord] += shared ``src`` through TMA (completion tracked like a TMA store)."""
        from triton._C.libtriton import ir
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)


def _one_pass_available() -> bool:
    if hasattr(tma, "async_atomic_add"):
        return True
    try:
        from triton._C.libtriton import gluon_ir, ir
    except ImportError:
        return False
    return hasattr(gluon_ir.GluonOpBuilder, "create_async_tma_reduce") and hasattr(ir, "DESCRIPTOR_REDUCE_KIND")


ONE_PASS_AVAILABLE = _one_pass_available()
ONE_PASS_HEAD_DIMS = (64,)  # the kernel holds a tile's dQ as two [64, 32] halves
DQ_SPLIT = 32  # dQ columns per TMA reduction box (128 bytes of fp32: one 128-byte swizzle row)
DQ_N = gl.constexpr(DQ_SPLIT)
# Under a causal (right-bounded) mask the two consumers share their dS^T tiles: each then computes one 32-column
# half of the tile's dQ over all 128 keys of the program (two MMAs with K = 64 keys each), so a program adds one
# [64, 64] tile into the buffer per query tile instead of one per consumer, at the price of an mbarrier the two
# consumers meet at every tile.  Measured on an H100 (benchmarks/reference/README.md, fifteenth pass): 3.4-3.9 %
# faster at 16k keys with a causal mask, 2-3 % slower without one, so calls without a mask keep private halves.
ONE_PASS_SHARED_DQ_CAUSAL = True


@gluon.jit
def _one_pass_consumer(k_bufs, v_bufs, kd_bufs, q_ring, do_ring, stat_ring, ds_bufs, dq_bufs, ds_ready, kv_bar,
                       ready, empty, LseUnits, Delta, DK, DV, dq_desc, off_b, off_hk, key0, stride_dkb, stride_dkh,
                       stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, group, n_queries, n_keys, shift,
                       right, qk_scale, scale, q_lo, full_lo, per_head, HEAD_D: gl.constexpr,
                       STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr, WG: gl.constexpr, SHARED_DQ: gl.constexpr):
    s_layout: gl.constexpr = _mma_layout(TILE_M)
    acc_layout: gl.constexpr = _mma_layout(HEAD_D)
    dq_layout: gl.constexpr = _mma_layout(DQ_N)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = k_bufs.dtype
    SPLITS: gl.constexpr = HEAD_D // DQ_N

    keys = key0 + gl.arange(0, WG_N, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, TILE_M, layout=gl.SliceLayout(0, s_layout))
    k = k_bufs.index(WG).reshape([WG_N, HEAD_D])
    v = v_bufs.index(WG).reshape([WG_N, HEAD_D])
    if SHARED_DQ:
        # This consumer's half of dQ's columns, against the program's first and second 64 keys.
        gl.static_assert(SPLITS == 2, "one dQ column half per consumer")
        kd0 = kd_bufs.index(WG).reshape([WG_N, DQ_N])
        kd1 = kd_bufs.index(SPLITS + WG).reshape([WG_N, DQ_N])
    else:
        # Both halves of dQ's columns, against this consumer's 64 keys.
        kd0 = kd_bufs.index(WG * SPLITS).reshape([WG_N, DQ_N])
        kd1 = kd_bufs.index(WG * SPLITS + 1).reshape([WG_N, DQ_N])
    s_init = gl.zeros([WG_N, TILE_M], gl.float32, layout=s_layout)
    dq_init = gl.zeros([TILE_M, DQ_N], gl.float32, layout=dq_layout)
    dk = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([WG_N, HEAD_D], gl.float32, layout=acc_layout)
    # Keys past N arrive zero-filled; their P would be exp2(-LSE), which can overflow, and dQ reads them.
    key_tail = key0 + WG_N > n_keys
    mbarrier.wait(kv_bar, 0)

    dq0 = dq_init
    dq1 = dq_init
    prev_h = off_hk * group
    prev_row0 = q_lo
    n_iter = group * per_head
    for it in range(n_iter):
        row0, rows, stats = _query_tile(it, off_b, off_hk, group, per_head, q_lo, n_heads, n_queries, cols)
        stage, q, do = _ring_tiles(q_ring, do_ring, ready, it, HEAD_D, STAGES)
        # The producer put this tile's row statistics in shared memory with its Q and dO.
        lse = stat_ring.index(2 * stage).load(gl.SliceLayout(0, s_layout))
        delta = stat_ring.index(2 * stage + 1).load(gl.SliceLayout(0, s_layout))
        st_tok = warpgroup_mma(k, q.permute((1, 0)), s_init, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), s_init, use_acc=False, is_async=True)
        # The previous tile's dQ leaves while this tile's S^T and dP^T are on the tensor cores.
        if it > 0:
            _reduce_dq(dq_desc, dq_bufs, dq0, dq1, off_b, prev_h, prev_row0, WG, SHARED_DQ)
        st = warpgroup_mma_wait(1, deps=[st_tok])
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        if (row0 < full_lo) | key_tail:
            keep = gl.expand_dims(keys, 1) < n_keys
            if HAS_RIGHT:
                keep = keep & (gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0) + (shift + right))
            pt = gl.where(keep, pt, 0.0)
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        pt16 = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt16, do, dv, is_async=True)
        ds = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        dst16 = gl.convert_layout(ds, a_layout)
        dk_tok = warpgroup_mma(dst16, q, dk, is_async=True)
        # dS for dQ = dS K goes through shared memory (the MMA reads it transposed).
        if SHARED_DQ:
            # Two slots: a consumer writes slot it % 2 again only after the other has passed iteration it + 1's
            # mbarrier, i.e. finished iteration it's products, which read it.
            slot = it % 2
            ds_bufs.index(2 * slot + WG).store(ds)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(slot), count=1)
            mbarrier.wait(ds_ready.index(slot), (it // 2) & 1)
            dq_tok0 = warpgroup_mma(ds_bufs.index(2 * slot).permute((1, 0)), kd0, dq_init, use_acc=False,
                                    is_async=True)
            dq_tok0 = warpgroup_mma(ds_bufs.index(2 * slot + 1).permute((1, 0)), kd1, dq_tok0, is_async=True)
            dv, dk, dq0, pt16, dst16 = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok0, pt16, dst16])
        else:
            ds_smem = ds_bufs.index(WG)
            ds_smem.store(ds)
            fence_async_shared()
            _partition_barrier()
            dq_tok0 = warpgroup_mma(ds_smem.permute((1, 0)), kd0, dq_init, use_acc=False, is_async=True)
            dq_tok1 = warpgroup_mma(ds_smem.permute((1, 0)), kd1, dq_init, use_acc=False, is_async=True)
            dv, dk, dq0, dq1, pt16, dst16 = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok0, dq_tok1, pt16,
                                                                        dst16])
        mbarrier.arrive(empty.index(stage), count=1)
        prev_h, prev_row0 = _query_block(it, off_hk, group, per_head, q_lo)
    if n_iter > 0:
        _reduce_dq(dq_desc, dq_bufs, dq0, dq1, off_b, prev_h, prev_row0, WG, SHARED_DQ)

    tma.store_wait(0)  # shared memory must outlive the last reduction's read of it
    _store_rows(DK, dk * scale, off_b, off_hk, key0, stride_dkb, stride_dkh, stride_dkn, n_keys, acc_layout, WG_N,
                HEAD_D)
    _store_rows(DV, dv, off_b, off_hk, key0, stride_dvb, stride_dvh, stride_dvn, n_keys, acc_layout, WG_N, HEAD_D)


@gluon.jit
def _reduce_dq(dq_desc, dq_bufs, dq0, dq1, off_b, off_h, row0, WG: gl.constexpr, SHARED_DQ: gl.constexpr):
    """Add this warp group's share of one tile's dQ into the fp32 buffer through its staging buffers and TMA
    reductions, which run on while the warp group goes on: with ``SHARED_DQ`` its column half (dq0), else both
    [64, 32] column halves over its keys (dq0, dq1)."""
    # The staging buffers' previous reductions must have read them.
    tma.store_wait(0)
    _partition_barrier()
    if SHARED_DQ:
        dq_bufs.index(WG).reshape([TILE_M, DQ_N]).store(dq0)
    else:
        dq_bufs.index(2 * WG).reshape([TILE_M, DQ_N]).store(dq0)
        dq_bufs.index(2 * WG + 1).reshape([TILE_M, DQ_N]).store(dq1)
    fence_async_shared()
    _partition_barrier()
    if SHARED_DQ:
        _tma_reduce_add(dq_desc, [off_b, off_h, row0, WG * DQ_N], dq_bufs.index(WG))
    else:
        _tma_reduce_add(dq_desc, [off_b, off_h, row0, 0], dq_bufs.index(2 * WG))
        _tma_reduce_add(dq_desc, [off_b, off_h, row0, DQ_N], dq_bufs.index(2 * WG + 1))


@gluon.jit
def _one_pass_producer(q_desc, k_desc, v_desc, kd_desc, do_desc, k_bufs, v_bufs, kd_bufs, q_ring, do_ring,
                       stat_ring, kv_bar, ready, empty, LseUnits, Delta, off_b, off_hk, start_n, group, q_lo,
                       per_head, n_heads, n_queries, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    SPLITS: gl.constexpr = HEAD_D // DQ_N
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes
                    + 2 * SPLITS * kd_desc.block_type.nbytes)
    for wg in gl.static_range(2):
        _tma_load(k_desc, [off_b, off_hk, start_n + wg * WG_N, 0], kv_bar, k_bufs.index(wg))
        _tma_load(v_desc, [off_b, off_hk, start_n + wg * WG_N, 0], kv_bar, v_bufs.index(wg))
        for part in gl.static_range(SPLITS):
            _tma_load(kd_desc, [off_b, off_hk, start_n + wg * WG_N, part * DQ_N], kv_bar,
                      kd_bufs.index(wg * SPLITS + part))
    _stream_queries(q_desc, do_desc, q_ring, do_ring, ready, empty, off_b, off_hk, group, q_lo, per_head, STAGES,
                    stat_ring, LseUnits, Delta, n_heads, n_queries, True)


@gluon.jit
def _gluon_bwd_one_pass_kernel(q_desc, k_desc, v_desc, kd_desc, do_desc, dq_desc, LseUnits, Delta, DK, DV,
                               stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads,
                               kv_heads, group, n_queries, n_keys, n_n_blocks, shift, right, qk_scale, scale,
                               HEAD_D: gl.constexpr, STAGES: gl.constexpr, HAS_RIGHT: gl.constexpr,
                               DS_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                               SHARED_DQ: gl.constexpr):
    SPLITS: gl.constexpr = HEAD_D // DQ_N
    off_b, off_hk, start_n, q_lo, full_lo, per_head = _kv_program(n_n_blocks, kv_heads, n_queries, shift, right,
                                                                  2 * WG_N, HAS_RIGHT)
    # A ring stage is ready when its TMA bytes have landed and the producer has stored its rows' statistics.
    k_bufs, v_bufs, q_ring, do_ring, kv_bar, ready, empty = _buffers(k_desc, v_desc, q_desc, do_desc, STAGES, 2, 2,
                                                                     2)
    stat_ring = gl.allocate_shared_memory(gl.float32, [2 * STAGES, TILE_M],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    kd_bufs = gl.allocate_shared_memory(kd_desc.dtype, [2 * SPLITS] + kd_desc.block_type.shape, kd_desc.layout)
    # Shared dQ: two slots of both consumers' dS^T tiles, one staging buffer per consumer, and an mbarrier per slot
    # that both consumers arrive on once their tile is stored.  Else each consumer's own dS^T and two halves, and
    # no such mbarriers (``ds_ready`` is then a placeholder the consumers never touch).
    ds_bufs = gl.allocate_shared_memory(kd_desc.dtype, [4 if SHARED_DQ else 2, WG_N, TILE_M], DS_LAYOUT)
    dq_bufs = gl.allocate_shared_memory(dq_desc.dtype, [2 if SHARED_DQ else 2 * SPLITS] + dq_desc.block_type.shape,
                                        dq_desc.layout)
    if SHARED_DQ:
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(2):
            mbarrier.init(ds_ready.index(slot), count=2)
    else:
        ds_ready = ready

    gl.warp_specialize([
        (_one_pass_consumer, (k_bufs, v_bufs, kd_bufs, q_ring, do_ring, stat_ring, ds_bufs, dq_bufs, ds_ready,
                              kv_bar, ready, empty, LseUnits, Delta, DK, DV, dq_desc, off_b, off_hk, start_n,
                              stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, group,
                              n_queries, n_keys, shift, right, qk_scale, scale, q_lo, full_lo, per_head, HEAD_D,
                              STAGES, HAS_RIGHT, 0, SHARED_DQ)),
        (_one_pass_consumer, (k_bufs, v_bufs, kd_bufs, q_ring, do_ring, stat_ring, ds_bufs, dq_bufs, ds_ready,
                              kv_bar, ready, empty, LseUnits, Delta, DK, DV, dq_desc, off_b, off_hk, start_n + WG_N,
                              stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, n_heads, group,
                              n_queries, n_keys, shift, right, qk_scale, scale, q_lo, full_lo, per_head, HEAD_D,
                              STAGES, HAS_RIGHT, 1, SHARED_DQ)),
        (_one_pass_producer, (q_desc, k_desc, v_desc, kd_desc, do_desc, k_bufs, v_bufs, kd_bufs, q_ring, do_ring,
                              stat_ring, kv_bar, ready, empty, LseUnits, Delta, off_b, off_hk, start_n, group, q_lo,
                              per_head, n_heads, n_queries, HEAD_D, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@functools.lru_cache(maxsize=None)
def _ds_layout(dtype):
    """The shared-memory layout of a consumer's [64 keys, 64 queries] dS^T tile."""
    return gl.NVMMASharedLayout.get_default_for([KEYS_PER_CONSUMER, QUERY_BLOCK],
                                                gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def gluon_backward_one_pass(q, k, v, grad_out, lse_units, delta, dk, dv, dq_acc, scale: float, causal_right: int,
                         shift: int, stages: int = 2, shared_dq: bool | None = None) -> None:
    """dK/dV as ``gluon_backward_kv`` plus dq_acc += dS K (unscaled) for the same operands; dq_acc is a contiguous
    fp32 [B, H, M, D] buffer the caller zeroes first and scales afterwards.  Head dims in ``ONE_PASS_HEAD_DIMS``.
    ``shared_dq``: the consumers share their dS^T tiles (default: causal calls while ``ONE_PASS_SHARED_DQ_CAUSAL``)."""
    batch, heads, n_queries, head_d = q.shape
    if head_d not in ONE_PASS_HEAD_DIMS:
        raise ValueError(f"the one-pass backward is built for head dims {ONE_PASS_HEAD_DIMS}, not {head_d}")
    kv_heads, n_keys = k.shape[1], k.shape[2]
    n_n_blocks = triton.cdiv(n_keys, 2 * KEYS_PER_CONSUMER)
    has_right = causal_right >= 0
    if shared_dq is None:
        shared_dq = has_right and ONE_PASS_SHARED_DQ_CAUSAL
    regs, maxnreg = REGISTERS[2]
    _gluon_bwd_one_pass_kernel[(n_n_blocks * batch * kv_heads,)](
        _descriptor(q, QUERY_BLOCK), _descriptor(k, KEYS_PER_CONSUMER), _descriptor(v, KEYS_PER_CONSUMER),
        _descriptor(k, KEYS_PER_CONSUMER, DQ_SPLIT), _descriptor(grad_out, QUERY_BLOCK),
        _descriptor(dq_acc, QUERY_BLOCK, DQ_SPLIT), lse_units, delta, dk, dv, dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), heads, kv_heads, heads // kv_heads, n_queries,
        n_keys, n_n_blocks, shift if has_right else 0, causal_right if has_right else 0, scale * LOG2E, scale,
        HEAD_D=head_d, STAGES=stages, HAS_RIGHT=has_right, DS_LAYOUT=_ds_layout(q.dtype),
        CONSUMER_REGS=regs, PRODUCER_REGS=24, SHARED_DQ=shared_dq,
        num_warps=4, maxnreg=maxnreg, **FP_FUSION)
