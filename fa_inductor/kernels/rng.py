"""Counter-based random numbers for attention dropout: Philox-4x32 (Salmon et al., SC'11) with 7 rounds.

Every attention probability P[b, h, i, j] gets its own 128-bit counter (j, i, b * H + h, offset) under the
64-bit key ``seed``, so the keep decision of one element depends on nothing else: the forward kernel draws it,
the backward kernels draw it again instead of storing a mask, and the PyTorch twin below reproduces it exactly
(tests use it as the reference keep-mask, the CPU blockwise path uses it to compute).  Seven rounds is the
smallest count that passes BigCrush for Philox-4x32; only the first output word is used.

``rng_state`` is an int64 tensor ``[seed, offset]`` drawn from torch's generator on the tensors' device
(``new_rng_state``), so ``torch.manual_seed`` reproduces a run, and CUDA-graph replays (whose generator
advances its Philox offset on each replay) and Inductor (which functionalises ``randint``) draw fresh values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ROUNDS", "new_rng_state", "keep_threshold", "keep_mask", "philox_keep"]

ROUNDS = 7
_ROUNDS_JIT = tl.constexpr(ROUNDS)  # for @triton.jit code (Triton reads only constexpr globals)
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
_U32 = 0xFFFFFFFF


def new_rng_state(device: torch.device) -> torch.Tensor:
    """[seed, offset] (int64) drawn from the default generator of ``device``."""
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def keep_threshold(dropout_p: float) -> int:
    """An element is kept when its 32-bit random word is >= this: P(keep) = 1 - dropout_p, to 2^-32."""
    return min(_U32 + 1, max(0, round(dropout_p * 2.0**32)))


@triton.jit
def philox_keep(seed, offset, col, row, head, threshold):
    """Keep mask (True = keep) for the elements whose counters are (col, row, head, offset); ``col`` and
    ``row`` are broadcastable int32 index tensors, ``seed`` and ``offset`` int64 scalars."""
    zero = col * 0 + row * 0  # every word gets the full tile shape
    c0 = (col + zero).to(tl.uint32)
    c1 = (row + zero).to(tl.uint32)
    c2 = (zero + head).to(tl.uint32)
    c3 = (zero + (offset & 0xFFFFFFFF)).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(_ROUNDS_JIT):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0.to(tl.int64) >= threshold


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32 and m < 2^32: the product fits 64 bits; int64 wraps, and the masks recover both halves.
    prod = a * m
    return (prod >> 32) & _U32, prod & _U32


def keep_mask(rng_state: torch.Tensor, batch: int, heads: int, n_queries: int, n_keys: int,
              dropout_p: float, col_start: int = 0, col_stop: int | None = None) -> torch.Tensor:
    """The [B, H, M, N] boolean keep mask the kernels draw for ``rng_state`` (PyTorch, any device); with
    ``col_start``/``col_stop``, only its key columns [col_start, col_stop) ([B, H, M, col_stop - col_start]),
    drawn without the rest, so a caller visiting keys in blocks needs memory for one block only."""
    seed, offset = (int(x) for x in rng_state.tolist())
    device = rng_state.device
    col_stop = n_keys if col_stop is None else col_stop
    c0 = torch.arange(col_start, col_stop, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    c1 = torch.arange(n_queries, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    c2 = torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    c0, c1, c2 = torch.broadcast_tensors(c0, c1, c2)
    c3 = torch.full_like(c0, offset & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c0 >= keep_threshold(dropout_p)
