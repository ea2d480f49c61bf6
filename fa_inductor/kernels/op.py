"""The registered attention ops: ``torch.ops.fa_inductor.flash_attention_forward`` / ``..._backward``.

Layering: Triton kernels (flash_fwd.py, flash_bwd.py) -> host launchers -> these ops.  Both are
``torch.library.triton_op`` s, so torch.compile and export trace into them and Inductor sees the Triton kernels;
the op body doubles as the fake (meta) implementation.  The forward op returns (out, lse) and carries an
autograd formula that calls the backward op; the gradients of ``lse`` and of a float ``attn_bias`` are
honoured too.

Operands are 4-D: query [B, H, M, D], key [B, HK, N, D], value [B, HK, N, DV] with H a multiple of HK, any
strides.  ``is_causal`` masks key j for query i unless j <= i (``bottom_right=False``: SDPA's top-left
alignment) or j <= i + N - M (``bottom_right=True``).  The optional arguments (all default to "off") are
defined in ``masking.py``: ``attn_bias`` (float bias or boolean mask, 4-D, each dim 1 or full), ``window_left``
/ ``window_right`` (-1 = unbounded), ``seqlens_q`` / ``seqlens_k`` (int [B]), ``softcap`` (0 = off),
``dropout_p`` with ``rng_state`` (int64 [seed, offset], ``rng.new_rng_state``), ``block_mask`` (bool
[Bm, Hm, ceil(M / block_size), ceil(N / block_size)]).  Rows with no visible key give out = 0, lse = -inf.

Devices: CUDA tensors run the Triton kernels, except on sm90 where ``gluon_applies`` routes calls to the
warp-specialised Gluon kernels through the opaque ops ``fa_inductor::hopper_attention_forward`` /
``..._backward`` (Gluon kernels cannot go through ``wrap_triton``).  CPU tensors go to the opaque ops
``fa_inductor::attention_forward_cpu`` / ``..._backward_cpu`` (opaque, so compiling a CPU graph neither unrolls
their loops nor specialises on sequence length), which run the same Triton kernels through Triton's interpreter
when it is enabled (``TRITON_INTERPRET=1`` before import) and otherwise an exact blockwise PyTorch computation
with memory linear in sequence length.

Eager calls of the public functions on plain tensors (``eager_applies``: no compiler, tracer, mode, subclass or
functorch transform) take ``eager_attention`` instead: the same op bodies, called as Python functions with the
Triton kernels launched directly, which saves the dispatcher's and ``wrap_triton``'s host time; inside
``EagerAttention`` (an autograd.Function) when autograd records the call, bare otherwise.  Everything that records
or transforms the call sees the registered ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
from typing import Optional

import torch
from torch import Tensor

from . import blockwise
from .common import direct_launches, dot_options, empty_lse, empty_output, is_interpreted
from . import autotune
from .arch import current_arch, device_capability
from .configs import INTERPRETER_CONFIG, Direction
from . import flash_decode
from .flash_bwd import _bwd_kv_kernel, flash_backward, scale_rows
from .flash_fwd import _flash_fwd_kernel, flash_forward
from .masking import SPARSE_BLOCK, MaskSpec, window_extents

__all__ = ["flash_attention_forward", "flash_attention_backward", "cpu_runs_interpreter", "mask_spec",
           "GLUON_ENV", "gluon_applies", "gluon_backward_applies", "EagerAttention", "eager_applies",
           "eager_attention"]

# FA_INDUCTOR_GLUON=0 keeps every call on the portable Triton kernels (A/B comparisons, debugging).
GLUON_ENV = "FA_INDUCTOR_GLUON"
# Head dims whose backward runs the Gluon dK/dV and dQ passes (at 256 the dK/dV kernel that splits its warp groups
# by role: 1.7x the Triton backward on the H100, README.md there, "Issue 7, fourth pass").  At head dim 64 they
# measured no faster than the Triton passes (README.md, "The Gluon backward"), so it stays on Triton ...
GLUON_BACKWARD_HEAD_DIMS = (128, 256)
# ... except that with a causal mask the Triton dK/dV pass followed by the Gluon dQ pass (128-key blocks) measured
# 3-4 % faster than both Triton passes (README.md there, "Issue 7, third pass"); without one it was slower.
GLUON_DQ_CAUSAL_HEAD_DIMS = (64,)
GLUON_DQ_CAUSAL_BLOCK_KEYS = 128
# Head dims whose backward is one pass (``gluon_bwd.gluon_backward_one_pass``: dQ added into fp32 by TMA
# reductions from the dK/dV program, 5 matrix products per tile pair instead of 7).  At head dim 64 it took 0-12 %
# less time than the routes above on the H100 with one key head per query head (benchmarks/reference/README.md,
# "Issue 7, thirteenth pass").  ``ONE_PASS_GROUPED``: grouped query heads take it too; in the Llama-3.2-1B-shaped
# model at 16k tokens (32 query heads over 8) the training step took 359.6-362.8 ms against 364.1-365.2 ms with
# the two passes, four interleaved runs each ("fourteenth pass").  Its dQ sums in no fixed order, so calls made
# under ``torch.use_deterministic_algorithms`` keep the two passes.
ONE_PASS_HEAD_DIMS = (64,)
ONE_PASS_GROUPED = True


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpu_runs_interpreter(dtype: torch.dtype) -> bool:
    """Whether CPU tensors of ``dtype`` run the Triton kernels (through the interpreter) rather than the
    blockwise path; other dtypes (fp64) always take the blockwise path."""
    return dtype in KERNEL_DTYPES and is_interpreted(_flash_fwd_kernel) and is_interpreted(_bwd_kv_kernel)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"fa_inductor attention op: {message}")


def mask_spec(query: Tensor, key: Tensor, is_causal: bool, bottom_right: bool, attn_bias: Optional[Tensor],
              window_left: int, window_right: int, seqlens_q: Optional[Tensor], seqlens_k: Optional[Tensor],
              softcap: float, dropout_p: float, rng_state: Optional[Tensor], block_mask: Optional[Tensor],
              block_size: int) -> MaskSpec:
    """Check the optional arguments against the operands and bundle them (errors name the argument)."""
    batch, heads, n_queries, _ = query.shape
    n_keys = key.shape[2]
    full = (batch, heads, n_queries, n_keys)
    if attn_bias is not None:
        _check(attn_bias.dim() == 4 and all(s in (1, f) for s, f in zip(attn_bias.shape, full)),
               f"attn_bias must be 4-D with each dim 1 or equal to {full}, got {tuple(attn_bias.shape)}")
        _check(attn_bias.dtype == torch.bool or attn_bias.is_floating_point(),
               f"attn_bias must be bool or floating point, got {attn_bias.dtype}")
        _check(attn_bias.device == query.device, "attn_bias must be on the device of query")
    for name, lengths in (("seqlens_q", seqlens_q), ("seqlens_k", seqlens_k)):
        if lengths is not None:
            _check(lengths.shape == (batch,) and not lengths.is_floating_point() and lengths.dtype != torch.bool,
                   f"{name} must be an integer tensor of shape ({batch},), got {lengths.dtype} "
                   f"{tuple(lengths.shape)}")
            _check(lengths.device == query.device, f"{name} must be on the device of query")
    _check(softcap >= 0.0, f"softcap must be >= 0 (0 = off), got {softcap}")
    _check(0.0 <= dropout_p <= 1.0, f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0:
        _check(rng_state is not None and rng_state.shape == (2,) and rng_state.dtype == torch.int64,
               "dropout_p > 0 needs rng_state, an int64 tensor [seed, offset] (rng.new_rng_state)")
        _check(rng_state.device == query.device, "rng_state must be on the device of query")
    if block_mask is not None:
        _check(block_size >= 16 and block_size & (block_size - 1) == 0,
               f"block_size must be a power of two >= 16, got {block_size}")
        blocks = (-(-n_queries // block_size), -(-n_keys // block_size))
        _check(block_mask.dim() == 4 and block_mask.shape[0] in (1, batch) and block_mask.shape[1] in (1, heads)
               and tuple(block_mask.shape[2:]) == blocks,
               f"block_mask must be [1 or {batch}, 1 or {heads}, {blocks[0]}, {blocks[1]}] for block_size "
               f"{block_size}, got {tuple(block_mask.shape)}")
        _check(block_mask.device == query.device, "block_mask must be on the device of query")
    left, right = window_extents(is_causal, window_left, window_right)
    return MaskSpec(bias=attn_bias, left=left, right=right, bottom_right=bottom_right, seqlens_q=seqlens_q,
                    seqlens_k=seqlens_k, softcap=float(softcap), dropout_p=float(dropout_p),
                    rng_state=rng_state if dropout_p > 0 else None, block_mask=block_mask, block_size=block_size)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _configs(query: Tensor, value: Tensor, spec: MaskSpec, *directions: str) -> list:
    """One config per direction (``autotune.select_config``): memo, cache, shipped table, tuning, baseline."""
    if query.device.type != "cuda":
        return [INTERPRETER_CONFIG for _ in directions]
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    arch = current_arch(index)
    # Tuning allocates and times its own tensors; never while a CUDA graph is being captured.
    can_tune = not torch.cuda.is_current_stream_capturing()
    extras = (spec.has_dropout or spec.softcap > 0 or spec.block_mask is not None or spec.seqlens_q is not None
              or spec.seqlens_k is not None)
    configs = []
    for direction in directions:
        problem = autotune.problem_for(direction, query.dtype, query.shape[-1], value.shape[-1],
                                       spec.left >= 0 or spec.right >= 0, spec.bias is not None, query.shape[2],
                                       value.shape[2], extras, query.shape[1] // value.shape[1])
        measure = (lambda p=problem: autotune.kernel_timer(p, torch.device("cuda", index))) if can_tune else None
        cfg = autotune.select_config(problem, arch, _gpu_name(index), measure)
        if spec.block_mask is not None:
            # Kernel tiles must divide the sparse blocks (both are powers of two).
            cfg = dataclasses.replace(cfg, block_m=min(cfg.block_m, spec.block_size),
                                      block_n=min(cfg.block_n, spec.block_size))
        configs.append(cfg)
    return configs


def _empty_grads(query: Tensor, key: Tensor, value: Tensor, attn_bias: Optional[Tensor], bias_requires_grad: bool):
    dbias = (torch.empty_like(attn_bias) if bias_requires_grad and attn_bias is not None
             else query.new_empty((0,)))
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dbias


def _triton_forward(query, key, value, out, lse, scale, spec) -> None:
    (cfg,) = _configs(query, value, spec, Direction.FORWARD)
    flash_forward(query, key, value, out, lse, scale, spec, cfg,
                  dot_options(query.dtype, interpreted=query.device.type == "cpu"))


def _triton_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, dbias, scale, spec) -> None:
    cfg_kv, cfg_q = _configs(query, value, spec, Direction.BACKWARD_KV, Direction.BACKWARD_Q)
    flash_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, dbias, scale, spec, cfg_kv, cfg_q,
                   dot_options(query.dtype, interpreted=query.device.type == "cpu"))


def _run_forward(query, key, value, scale, spec, direct=False):
    """(out, lse) on CUDA tensors.  ``direct``: call the Hopper op's function itself, not the registered op
    (the eager path of ``EagerAttention``, which no tracer sees)."""
    batch, heads, n_queries, _ = query.shape
    has_output = batch * heads * n_queries * value.shape[-1] > 0
    decode = has_output and flash_decode.eligible(query, key, spec)
    if has_output and not decode and gluon_applies(query, key, value, scale, spec):
        # The Hopper op allocates its own outputs.
        hopper = _hopper_forward_fn if direct else torch.ops.fa_inductor.hopper_attention_forward
        return hopper(query, key, value, scale, spec.right, spec.bottom_right)
    out = empty_output(query, value)
    lse = empty_lse(query)
    if decode:
        dot = dot_options(query.dtype, interpreted=query.device.type == "cpu")
        flash_decode.flash_decode(query, key, value, out, lse, scale, spec, dot)
    elif has_output:
        _triton_forward(query, key, value, out, lse, scale, spec)
    return out, lse


# --- Hopper: the Gluon forward behind an opaque op ------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gluon_forward_module():
    """``gluon_fwd`` when this Triton has Gluon's Hopper API in the form the kernel is written against (Triton
    3.6 and newer: ``warp_specialize`` taking (function, args) pairs), else None.  Imported on first use, never
    at import of the package."""
    import triton

    try:
        if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
            return None
        from . import gluon_fwd
    except (ImportError, AttributeError, ValueError):
        return None
    return gluon_fwd


def _gluon_usable(*tensors: Tensor) -> bool:
    """The checks that depend on the data, made when the op runs: a capability-9.0 device, non-empty query and
    key sets, and operands TMA can read."""
    module = _gluon_forward_module()
    query, key = tensors[0], tensors[1]
    return (module is not None and query.shape[2] > 0 and key.shape[2] > 0
            and device_capability(query.device.index) == (9, 0)
            and all(module.tma_compatible(t) for t in tensors))


def gluon_applies(query: Tensor, key: Tensor, value: Tensor, scale: float, spec: MaskSpec) -> bool:
    """Whether the forward goes to the Gluon warp-specialised kernel (``gluon_fwd.py``): ``_gluon_eligible``
    and a head dim in ``gluon_fwd.HEAD_DIMS``."""
    head_d = _gluon_eligible(query, key, value, scale, spec)
    return head_d is not None and head_d in _gluon_forward_module().HEAD_DIMS


def _gluon_eligible(query: Tensor, key: Tensor, value: Tensor, scale: float, spec: MaskSpec) -> Optional[int]:
    """The head dim when a call may take the Gluon kernels, else None: an sm90 GPU, a Triton with Gluon, 16-bit
    operands with one static head dim, and no feature beyond a causal / right-window mask.  Decided from dtypes,
    static head dims and options only (no guard on lengths or strides); what depends on the data (alignment,
    strides, empty key sets) is checked again when the op runs, which falls back to the Triton kernels."""
    if (query.device.type != "cuda" or os.environ.get(GLUON_ENV, "1").strip() == "0"
            or query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype
            or value.dtype != query.dtype or scale < 0):
        return None
    head_d = query.shape[-1]
    # Symbolic head dims (dynamic shapes) stay on Triton rather than add a guard.
    if not (isinstance(head_d, int) and isinstance(key.shape[-1], int) and isinstance(value.shape[-1], int)
            and head_d == key.shape[-1] == value.shape[-1]):
        return None
    if (spec.bias is not None or spec.left >= 0 or spec.seqlens_q is not None or spec.seqlens_k is not None
            or spec.softcap > 0 or spec.has_dropout or spec.block_mask is not None):
        return None
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    if current_arch(index).name != "sm90" or _gluon_forward_module() is None:
        return None
    return head_d


def gluon_backward_applies(query: Tensor, key: Tensor, value: Tensor, scale: float, spec: MaskSpec) -> bool:
    """Whether the backward goes to the Hopper op, i.e. runs Gluon passes: ``_gluon_eligible``, and a head dim
    in ``GLUON_BACKWARD_HEAD_DIMS``, in ``GLUON_DQ_CAUSAL_HEAD_DIMS`` with a causal mask, or in
    ``ONE_PASS_HEAD_DIMS`` with as many key heads as query heads."""
    # _gluon_eligible first: it turns symbolic head dims away before the membership tests could guard on them.
    head_d = _gluon_eligible(query, key, value, scale, spec)
    return head_d is not None and (_gluon_backward_head_dim(head_d, spec.right)
                                   or _one_pass_shape(head_d, query.shape[1], key.shape[1]))


def _one_pass_shape(head_d: int, heads, kv_heads) -> bool:
    """Whether the one-pass backward is measured for this head dim and head count (static head counts only: a
    symbolic one stays on the other routes rather than add a guard), with Triton able to build it."""
    if head_d not in ONE_PASS_HEAD_DIMS or not (isinstance(heads, int) and isinstance(kv_heads, int)):
        return False
    from .gluon_bwd import ONE_PASS_AVAILABLE
    return (heads == kv_heads or ONE_PASS_GROUPED) and ONE_PASS_AVAILABLE


def _gluon_backward_head_dim(head_d: int, right: int) -> bool:
    """Whether the backward has Gluon passes at this head dim and mask (``right`` == 0: causal)."""
    return head_d in GLUON_BACKWARD_HEAD_DIMS or (head_d in GLUON_DQ_CAUSAL_HEAD_DIMS and right == 0)


def _count(name: str) -> None:
    from torch._dynamo.utils import counters

    counters["fa_inductor"][name] += 1


def _hopper_forward_fn(query: Tensor, key: Tensor, value: Tensor, scale: float, right: int,
                    bottom_right: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) for a call ``gluon_applies`` accepted.  Opaque to the compiler (Inductor calls it as
    an extern kernel), because Gluon kernels cannot go through ``wrap_triton``.  Runs the Gluon kernel when the
    operands suit TMA on a capability-9.0 device, else the Triton forward; counters["fa_inductor"] records
    which ("gluon_forward" / "gluon_forward_fallback")."""
    out = empty_output(query, value)
    lse = empty_lse(query)
    if _gluon_usable(query, key, value) and query.shape[-1] in _gluon_forward_module().HEAD_DIMS:
        _gluon_forward_module().gluon_forward(query, key, value, out, lse, scale, right,
                                              _shift(query, key, bottom_right))
        _count("gluon_forward")
    else:
        # The body of an opaque op only ever sees real tensors: nothing to trace.
        with direct_launches():
            _triton_forward(query, key, value, out, lse, scale, MaskSpec(right=right, bottom_right=bottom_right))
        _count("gluon_forward_fallback")
    return out, lse


_hopper_forward = torch.library.custom_op("fa_inductor::hopper_attention_forward", _hopper_forward_fn,
                                          mutates_args=(), device_types="cuda")


@_hopper_forward.register_fake
def _(query, key, value, scale, right, bottom_right):
    return empty_output(query, value), empty_lse(query)


def _shift(query: Tensor, key: Tensor, bottom_right: bool) -> int:
    return key.shape[2] - query.shape[2] if bottom_right else 0


def _hopper_backward_fn(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                     grad_lse: Optional[Tensor], scale: float, right: int,
                     bottom_right: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for a call ``gluon_backward_applies`` accepted, opaque for the same reason as the forward. When
    ``_gluon_usable``: at ``ONE_PASS_HEAD_DIMS`` with one key head per query head, or grouped heads while
    ``ONE_PASS_GROUPED`` (and no deterministic algorithms asked for), the one-pass kernel runs; else the dK/dV and dQ
    passes run the Gluon kernels at ``GLUON_BACKWARD_HEAD_DIMS``, and at ``GLUON_DQ_CAUSAL_HEAD_DIMS`` with a causal
    mask the dK/dV pass stays the Triton kernel (the preprocess always is); else the whole Triton backward runs.
    counters["fa_inductor"] records which ("gluon_backward", with "gluon_backward_one_pass" for the first, /
    "gluon_backward_fallback")."""
    spec = MaskSpec(right=right, bottom_right=bottom_right)
    dq, dk, dv, _ = _empty_grads(query, key, value, None, False)
    usable = _gluon_usable(query, key, value, grad_out) and dk.stride(3) == 1 and dv.stride(3) == 1
    # The body of an opaque op only ever sees real tensors: Triton kernels launch directly.
    with direct_launches():
        if (usable and _one_pass_shape(query.shape[-1], query.shape[1], key.shape[1])
                and not torch.are_deterministic_algorithms_enabled()):
            _one_pass_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, scale, spec, right,
                               bottom_right)
            _count("gluon_backward")
            _count("gluon_backward_one_pass")
        elif usable and _gluon_backward_head_dim(query.shape[-1], right):
            from .gluon_bwd import gluon_backward_kv, gluon_backward_q

            shift = _shift(query, key, bottom_right)
            both = query.shape[-1] in GLUON_BACKWARD_HEAD_DIMS
            dq_options = {} if both else {"block_keys": GLUON_DQ_CAUSAL_BLOCK_KEYS}

            def gluon_kv_pass(lse_units, delta):
                gluon_backward_kv(query, key, value, grad_out, lse_units, delta, dk, dv, scale, right, shift)

            def q_pass(lse_units, delta):
                gluon_backward_q(query, key, value, grad_out, lse_units, delta, dq, scale, right, shift,
                                 **dq_options)

            # A replaced pass does not read its Triton config (any will do); the dQ pass always is replaced.
            if both:
                kv_pass, cfg_kv = gluon_kv_pass, INTERPRETER_CONFIG
            else:
                kv_pass, (cfg_kv,) = None, _configs(query, value, spec, Direction.BACKWARD_KV)
            flash_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, None, scale, spec, cfg_kv,
                           INTERPRETER_CONFIG, dot_options(query.dtype, interpreted=False), kv_pass=kv_pass,
                           q_pass=q_pass)
            _count("gluon_backward")
        else:
            _triton_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, None, scale, spec)
            _count("gluon_backward_fallback")
    return dq, dk, dv


def _one_pass_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, scale, spec, right,
                       bottom_right, stages: int = 2, shared_dq: Optional[bool] = None) -> None:
    """The preprocess, then ``gluon_backward_one_pass`` (dK, dV, and dQ summed into an fp32 buffer; ``stages``:
    its ring depth, ``shared_dq``: whether its consumers share dS^T, default by mask), then dQ scaled into ``dq``
    (``scale_rows``)."""
    from .gluon_bwd import gluon_backward_one_pass

    shift = _shift(query, key, bottom_right)
    dq_sum = torch.zeros(query.shape, device=query.device, dtype=torch.float32)

    def one_pass(lse_units, delta):
        gluon_backward_one_pass(query, key, value, grad_out, lse_units, delta, dk, dv, dq_sum, scale, right, shift,
                                stages=stages, shared_dq=shared_dq)

    def scale_dq(lse_units, delta):
        scale_rows(dq_sum, dq, scale)

    # The passes replaced read no Triton config (any will do).
    flash_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, None, scale, spec,
                   INTERPRETER_CONFIG, INTERPRETER_CONFIG, dot_options(query.dtype, interpreted=False),
                   kv_pass=one_pass, q_pass=scale_dq)


_hopper_backward = torch.library.custom_op("fa_inductor::hopper_attention_backward", _hopper_backward_fn,
                                           mutates_args=(), device_types="cuda")


@_hopper_backward.register_fake
def _(grad_out, query, key, value, out, lse, grad_lse, scale, right, bottom_right):
    return _empty_grads(query, key, value, None, False)[:3]


def _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, spec, bias_requires_grad, direct=False):
    """(dq, dk, dv, dbias) on CUDA tensors; ``direct`` as in ``_run_forward``."""
    bias = spec.bias if bias_requires_grad else None
    if query.numel() == 0 or key.numel() == 0:
        # No queries or no keys: every gradient is zero, as in the math formula.
        zeros = tuple(torch.zeros_like(t) for t in (query, key, value))
        return zeros + (torch.zeros_like(bias) if bias is not None else query.new_empty((0,)),)
    if bias is None and grad_out.dtype == query.dtype and gluon_backward_applies(query, key, value, scale, spec):
        hopper = _hopper_backward_fn if direct else torch.ops.fa_inductor.hopper_attention_backward
        dq, dk, dv = hopper(grad_out, query, key, value, out, lse, grad_lse, scale, spec.right, spec.bottom_right)
        return dq, dk, dv, query.new_empty((0,))
    dq, dk, dv, dbias = _empty_grads(query, key, value, bias, bias is not None)
    dbias32 = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
    _triton_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, dbias32, scale, spec)
    if bias is not None:
        dbias.copy_(dbias32)
    return dq, dk, dv, dbias


# --- CPU: opaque custom ops ------------------------------------------------------------------------------

def _forward_cpu_fn(query: Tensor, key: Tensor, value: Tensor, scale: float, is_causal: bool, bottom_right: bool,
                 attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                 seqlens_q: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None, softcap: float = 0.0,
                 dropout_p: float = 0.0, rng_state: Optional[Tensor] = None, block_mask: Optional[Tensor] = None,
                 block_size: int = SPARSE_BLOCK) -> tuple[Tensor, Tensor]:
    spec = mask_spec(query, key, is_causal, bottom_right, attn_bias, window_left, window_right, seqlens_q,
                     seqlens_k, softcap, dropout_p, rng_state, block_mask, block_size)
    if cpu_runs_interpreter(query.dtype):
        return _run_forward(query, key, value, scale, spec)
    out, lse = blockwise.blockwise_forward(query, key, value, scale, spec)
    result = empty_output(query, value)
    result.copy_(out)
    return result, lse


_forward_cpu = torch.library.custom_op("fa_inductor::attention_forward_cpu", _forward_cpu_fn, mutates_args=(),
                                       device_types="cpu")


@_forward_cpu.register_fake
def _(query, key, value, *args, **kwargs):
    return empty_output(query, value), empty_lse(query)


def _backward_cpu_fn(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                  grad_lse: Optional[Tensor], scale: float, is_causal: bool, bottom_right: bool,
                  attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                  seqlens_q: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None, softcap: float = 0.0,
                  dropout_p: float = 0.0, rng_state: Optional[Tensor] = None, block_mask: Optional[Tensor] = None,
                  block_size: int = SPARSE_BLOCK,
                  bias_requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = mask_spec(query, key, is_causal, bottom_right, attn_bias, window_left, window_right, seqlens_q,
                     seqlens_k, softcap, dropout_p, rng_state, block_mask, block_size)
    if cpu_runs_interpreter(query.dtype):
        return _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, spec, bias_requires_grad)
    grads = blockwise.blockwise_backward(grad_out, query, key, value, out, lse, grad_lse, scale, spec,
                                         bias_requires_grad and attn_bias is not None)
    results = _empty_grads(query, key, value, attn_bias, bias_requires_grad)
    for result, grad in zip(results, grads):
        if grad is not None:
            result.copy_(grad)
    return results


_backward_cpu = torch.library.custom_op("fa_inductor::attention_backward_cpu", _backward_cpu_fn, mutates_args=(),
                                        device_types="cpu")
_BACKWARD_SIGNATURE = inspect.signature(_backward_cpu_fn)


@_backward_cpu.register_fake
def _(*args, **kwargs):
    bound = _BACKWARD_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return _empty_grads(a["query"], a["key"], a["value"], a["attn_bias"], a["bias_requires_grad"])


# --- the public ops -------------------------------------------------------------------------------------

def _attention_forward(direct: bool, query: Tensor, key: Tensor, value: Tensor, scale: float, is_causal: bool,
                       bottom_right: bool, attn_bias: Optional[Tensor] = None, window_left: int = -1,
                       window_right: int = -1, seqlens_q: Optional[Tensor] = None,
                       seqlens_k: Optional[Tensor] = None, softcap: float = 0.0, dropout_p: float = 0.0,
                       rng_state: Optional[Tensor] = None, block_mask: Optional[Tensor] = None,
                       block_size: int = SPARSE_BLOCK) -> tuple[Tensor, Tensor]:
    """The forward op's body; ``direct`` calls the opaque device ops as Python functions (``EagerAttention``)."""
    if query.device.type == "cpu":
        cpu = _forward_cpu_fn if direct else torch.ops.fa_inductor.attention_forward_cpu
        return cpu(query, key, value, scale, is_causal, bottom_right, attn_bias, window_left, window_right,
                   seqlens_q, seqlens_k, softcap, dropout_p, rng_state, block_mask, block_size)
    spec = mask_spec(query, key, is_causal, bottom_right, attn_bias, window_left, window_right, seqlens_q,
                     seqlens_k, softcap, dropout_p, rng_state, block_mask, block_size)
    return _run_forward(query, key, value, scale, spec, direct)


def _attention_backward(direct: bool, grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                        lse: Tensor, grad_lse: Optional[Tensor], scale: float, is_causal: bool, bottom_right: bool,
                        attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                        seqlens_q: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
                        softcap: float = 0.0, dropout_p: float = 0.0, rng_state: Optional[Tensor] = None,
                        block_mask: Optional[Tensor] = None, block_size: int = SPARSE_BLOCK,
                        bias_requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward op's body: (dq, dk, dv, dbias), dbias in attn_bias's shape when ``bias_requires_grad``,
    else empty; ``direct`` as in ``_attention_forward``."""
    if query.device.type == "cpu":
        cpu = _backward_cpu_fn if direct else torch.ops.fa_inductor.attention_backward_cpu
        return cpu(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, bottom_right, attn_bias,
                   window_left, window_right, seqlens_q, seqlens_k, softcap, dropout_p, rng_state, block_mask,
                   block_size, bias_requires_grad)
    spec = mask_spec(query, key, is_causal, bottom_right, attn_bias, window_left, window_right, seqlens_q,
                     seqlens_k, softcap, dropout_p, rng_state, block_mask, block_size)
    return _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, spec, bias_requires_grad, direct)


def _forward_impl(query: Tensor, key: Tensor, value: Tensor, scale: float, is_causal: bool, bottom_right: bool,
                  attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                  seqlens_q: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None, softcap: float = 0.0,
                  dropout_p: float = 0.0, rng_state: Optional[Tensor] = None, block_mask: Optional[Tensor] = None,
                  block_size: int = SPARSE_BLOCK) -> tuple[Tensor, Tensor]:
    return _attention_forward(False, query, key, value, scale, is_causal, bottom_right, attn_bias, window_left,
                              window_right, seqlens_q, seqlens_k, softcap, dropout_p, rng_state, block_mask,
                              block_size)


def _backward_impl(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                   grad_lse: Optional[Tensor], scale: float, is_causal: bool, bottom_right: bool,
                   attn_bias: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                   seqlens_q: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None, softcap: float = 0.0,
                   dropout_p: float = 0.0, rng_state: Optional[Tensor] = None, block_mask: Optional[Tensor] = None,
                   block_size: int = SPARSE_BLOCK,
                   bias_requires_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _attention_backward(False, grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                               bottom_right, attn_bias, window_left, window_right, seqlens_q, seqlens_k, softcap,
                               dropout_p, rng_state, block_mask, block_size, bias_requires_grad)


flash_attention_forward = torch.library.triton_op("fa_inductor::flash_attention_forward", _forward_impl,
                                                  mutates_args=())
flash_attention_backward = torch.library.triton_op("fa_inductor::flash_attention_backward", _backward_impl,
                                                   mutates_args=())


# --- autograd -------------------------------------------------------------------------------------------

_FORWARD_ARGS = tuple(inspect.signature(_forward_impl).parameters)
_SAVED = ("query", "key", "value", "attn_bias", "seqlens_q", "seqlens_k", "rng_state", "block_mask")
_OPTIONS = ("scale", "is_causal", "bottom_right", "window_left", "window_right", "softcap", "dropout_p",
            "block_size")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(*(args[name] for name in _SAVED), out, lse)
    ctx.options = {name: args[name] for name in _OPTIONS}
    ctx.bias_requires_grad = ctx.needs_input_grad[_FORWARD_ARGS.index("attn_bias")]
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, grad_lse, direct: bool):
    *saved, out, lse = ctx.saved_tensors
    saved = dict(zip(_SAVED, saved))
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    backward = (functools.partial(_attention_backward, True) if direct
                else torch.ops.fa_inductor.flash_attention_backward)
    dq, dk, dv, dbias = backward(
        grad_out, saved["query"], saved["key"], saved["value"], out, lse, grad_lse, **ctx.options,
        attn_bias=saved["attn_bias"], seqlens_q=saved["seqlens_q"], seqlens_k=saved["seqlens_k"],
        rng_state=saved["rng_state"], block_mask=saved["block_mask"], bias_requires_grad=ctx.bias_requires_grad)
    grads = {"query": dq, "key": dk, "value": dv, "attn_bias": dbias if ctx.bias_requires_grad else None}
    return tuple(grads.get(name) for name in _FORWARD_ARGS)


def _backward(ctx, grad_out, grad_lse):
    return _gradients(ctx, grad_out, grad_lse, direct=False)


class EagerAttention(torch.autograd.Function):
    """``flash_attention_forward`` with its autograd formula for plain eager calls (``eager_applies``): the same
    functions and kernels, called as Python functions rather than through the dispatcher, which costs each
    registered op (and the custom-op autograd wrapper) tens to hundreds of microseconds of host time per call.
    ``apply`` takes the forward op's arguments, all positional, and returns (out, lse)."""

    # forward takes ctx itself (no ``setup_context``): with a separate setup_context, ``Function.apply`` binds
    # the arguments through ``inspect.signature`` on every call (70 against 20-24 us per apply on a CPU here).
    # Functorch transforms, which need setup_context, never reach this class (``eager_applies``).
    @staticmethod
    def forward(ctx, *inputs):
        output = _eager_forward(inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        with _profiled("fa_inductor::flash_attention_backward"), direct_launches():
            return _gradients(ctx, grad_out, grad_lse, direct=True)


def eager_attention(*inputs):
    """(out, lse) of ``flash_attention_forward`` for a call ``eager_applies`` accepted; takes the forward op's
    arguments, all positional.  When autograd records the call (grad mode on and an input that requires grad, or
    a forward-mode AD level open) this is ``EagerAttention.apply``; otherwise (inference: ``torch.no_grad``,
    ``torch.inference_mode``, inputs without grad) the op's body runs without an autograd.Function, which saves
    the host the Function's 20-35 us per call."""
    if _records_grad(inputs):
        return EagerAttention.apply(*inputs)
    return _eager_forward(inputs)


def _eager_forward(inputs) -> tuple[Tensor, Tensor]:
    """The forward op's body on its positional arguments, with the kernels launched directly (the eager path)."""
    with _profiled("fa_inductor::flash_attention_forward"), direct_launches():
        return _attention_forward(True, *inputs)


_DIFFERENTIABLE = tuple(_FORWARD_ARGS.index(name) for name in ("query", "key", "value", "attn_bias"))


def _records_grad(inputs) -> bool:
    """Whether autograd would record a call on ``inputs`` (the forward op's positional arguments)."""
    # An open forward-AD level may carry tangents on plain-looking tensors: let the Function see the call.
    if getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return True
    return torch.is_grad_enabled() and any(inputs[i] is not None and inputs[i].requires_grad for i in _DIFFERENTIABLE)


def _profiled(name: str):
    """A profiler range named as the op would be, while a profiler runs (traces look the same either way)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()


def eager_applies(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on ``tensors`` may use ``EagerAttention`` instead of the registered op: plain tensors (no
    subclass: fake, functional, distributed ...), and nothing that records or transforms the call (a compiler,
    the TorchScript tracer, a dispatch or function mode such as make_fx's, a functorch transform).  Anything else
    takes the op."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if dispatch_modes is None or function_modes is None or functorch is None:
        return False
    if dispatch_modes() or function_modes() or functorch() is not None:
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)
