"""Host-side helpers shared by the kernel launchers and the registered op."""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "LOG2E_JIT", "FP_FUSION", "launch", "direct_launches", "divides", "is_interpreted",
           "dot_options", "mma", "round_to", "empty_output", "empty_lse", "sm_count", "head_group", "tile_coords"]

LOG2E = math.log2(math.e)
# The same constant for use inside @triton.jit functions (Triton reads only constexpr globals).
LOG2E_JIT = tl.constexpr(LOG2E)


def is_interpreted(kernel) -> bool:
    """True when Triton decorated ``kernel`` for its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has the interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


_LAUNCH = threading.local()


@contextlib.contextmanager
def direct_launches():
    """Within this context ``launch`` calls kernels directly.  For code that no tracer can see (the eager path,
    ``op.EagerAttention``): ``wrap_triton`` would route each launch through its higher-order op, which costs
    about 0.1-0.2 ms of host time per launch outside ``torch.library.triton_op``."""
    previous = getattr(_LAUNCH, "direct", False)
    _LAUNCH.direct = True
    try:
        yield
    finally:
        _LAUNCH.direct = previous


# Compile options of every direct launch (Gluon kernels included).  The kernels are written for fused multiply-adds
# (the softmax takes one FMA per score, s * scale - m); Triton 3.9 warns when a launch leaves FP fusion to its
# default, and 3.10 turns that default off.  Launches through ``wrap_triton`` cannot carry compile options:
# Inductor compiles those kernels itself, under Triton's default.
FP_FUSION = {"enable_fp_fusion": True}


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``wrap_triton`` so that torch.compile / export see the kernel.  An interpreted kernel
    (CPU tensors under ``TRITON_INTERPRET=1``, always inside an opaque op) and any kernel inside
    ``direct_launches`` is called directly, with ``FP_FUSION``."""
    if is_interpreted(kernel) or getattr(_LAUNCH, "direct", False):
        kernel[grid](*args, **kwargs, **FP_FUSION)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# L2 bytes that the K and V of one group of heads (``head_group``) may take: a sixth of the H100's 50 MB (two
# halves of 25 MB), so that the tiles in flight re-read K and V from L2.
GROUP_L2_BYTES = 8 << 20
MAX_HEAD_GROUP = 8


def head_group(causal: bool, bytes_per_head) -> int:
    """How many heads a causal forward or dQ launch interleaves (``tile_coords``).  Under a causal mask the tiles
    of a head differ in length and go longest first; with one head at a time the last head's long tiles start
    near the end of the launch and leave the other SMs idle while they finish (a tail of 3-7 % at 4k tokens in a
    list-scheduling model of the H100's 132 SMs).  Taking the tiles of several heads block-major puts the short
    ones last.  The tiles of a head all read its K and V from the first key on, so a group's K / V
    (``bytes_per_head`` each) is what L2 must hold: it is capped at ``GROUP_L2_BYTES``.  Without a causal mask,
    or with a symbolic length (no guard is added), heads go one at a time.  (The dK/dV passes keep one head at a
    time: their programs read Q and dO from different rows at once, and interleaved heads overflowed L2.)"""
    if not causal or not isinstance(bytes_per_head, int) or bytes_per_head <= 0:
        return 1
    return max(1, min(MAX_HEAD_GROUP, GROUP_L2_BYTES // bytes_per_head))


@triton.jit
def tile_coords(tile, n_blocks, n_bh, head_group, REVERSE: tl.constexpr):
    """(head index, block index) of the ``tile``-th program: heads taken ``head_group`` at a time and block-major
    within a group; ``REVERSE`` counts blocks from the last (``head_group``)."""
    per_group = head_group * n_blocks
    grp = tile // per_group
    rem = tile % per_group
    in_group = tl.minimum(head_group, n_bh - grp * head_group)
    bh = grp * head_group + rem % in_group
    block = rem // in_group
    if REVERSE:
        block = n_blocks - 1 - block
    return bh, block


def divides(block: int, n) -> bool:
    """Whether ``n`` is a known multiple of ``block``.  A symbolic length (dynamic shapes) answers False
    without adding a guard, so the masked kernel variant serves every length and nothing recompiles."""
    return isinstance(n, int) and n % block == 0


def dot_options(dtype: torch.dtype, interpreted: bool) -> dict:
    """The kernels' arithmetic flags.  fp32 products follow torch's TF32 switch for matmuls.

    ``SOFT_BF16`` works around two gaps of the Triton interpreter with bf16, so that CPU tests see the GPU's
    arithmetic: it multiplies bf16 tiles as raw integers (operands are widened to fp32 first, which is exact:
    the product of two bf16 values fits fp32, and the GPU accumulates in fp32), and it truncates fp32 -> bf16
    instead of rounding to nearest even (``round_to`` rounds the fp32 bits first).  Never set on a GPU."""
    tf32 = dtype == torch.float32 and not interpreted and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "SOFT_BF16": interpreted and dtype == torch.bfloat16}


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 ``x`` to ``dtype`` with round-to-nearest-even (see ``dot_options`` for ``SOFT_BF16``)."""
    if SOFT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, H, M, DV] output stored as [B, M, H, DV] in memory, the layout attention outputs are reshaped to
    next (``out.transpose(1, 2).reshape(B, M, H * DV)`` is then free).  Real and fake paths both use this."""
    batch, heads, n_queries, _ = query.shape
    return query.new_empty((batch, n_queries, heads, value.shape[-1])).transpose(1, 2)


def empty_lse(query: torch.Tensor) -> torch.Tensor:
    batch, heads, n_queries, _ = query.shape
    return query.new_empty((batch, heads, n_queries),
    dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
