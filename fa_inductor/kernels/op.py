"""The registered attention ops: ``torch.ops.fa_inductor.flash_attention_forward`` / ``..._backward``.

Layering: Triton kernels (flash_fwd.py, flash_bwd.py) -> host launchers -> these ops.  Both are
``torch.library.triton_op`` s, so torch.compile and export trace into them and Inductor sees the Triton kernels;
the op body doubles as the fake (meta) implementation.  The forward op returns (out, lse) and carries an
autograd formula that calls the backward op; the gradient of ``lse`` is honoured too, so callers that use
the logsumexp get exact gradients.

Operands are 4-D: query [B, H, M, D], key [B, HK, N, D], value [B, HK, N, DV] with H a multiple of HK, any
strides.  ``is_causal`` masks key j for query i unless j <= i (``bottom_right=False``: SDPA's top-left
alignment) or j <= i + N - M (``bottom_right=True``).  Rows with no visible key give out = 0, lse = -inf.

Devices: CUDA tensors run the Triton kernels.  CPU tensors go to the opaque ops
``fa_inductor::attention_forward_cpu`` / ``..._backward_cpu`` (opaque, so compiling a CPU graph neither unrolls
their loops nor specialises on sequence length), which run the same Triton kernels through Triton's interpreter
when it is enabled (``TRITON_INTERPRET=1`` before import) and otherwise an exact blockwise PyTorch computation
with memory linear in sequence length.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from . import blockwise
from .common import dot_options, empty_lse, empty_output, is_interpreted
from .configs import Direction, default_config
from .flash_bwd import _bwd_kv_kernel, flash_backward
from .flash_fwd import _flash_fwd_kernel, flash_forward

__all__ = ["flash_attention_forward", "flash_attention_backward", "cpu_runs_interpreter"]


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpu_runs_interpreter(dtype: torch.dtype) -> bool:
    """Whether CPU tensors of ``dtype`` run the Triton kernels (through the interpreter) rather than the
    blockwise path; other dtypes (fp64) always take the blockwise path."""
    return dtype in KERNEL_DTYPES and is_interpreted(_flash_fwd_kernel) and is_interpreted(_bwd_kv_kernel)


def _empty_grads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _run_forward(query, key, value, scale, is_causal, bottom_right):
    out = empty_output(query, value)
    lse = empty_lse(query)
    if out.numel() > 0:
        cfg = default_config(query.device, query.dtype, query.shape[-1], value.shape[-1], Direction.FORWARD)
        flash_forward(query, key, value, out, lse, scale, is_causal, bottom_right, cfg,
                      dot_options(query.dtype, interpreted=query.device.type == "cpu"))
    return out, lse


def _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, bottom_right):
    if query.numel() == 0 or key.numel() == 0:
        # No queries or no keys: every gradient is zero, as in the math formula.
        return tuple(torch.zeros_like(t) for t in (query, key, value))
    dq, dk, dv = _empty_grads(query, key, value)
    head_d, head_dv = query.shape[-1], value.shape[-1]
    cfg_kv = default_config(query.device, query.dtype, head_d, head_dv, Direction.BACKWARD_KV)
    cfg_q = default_config(query.device, query.dtype, head_d, head_dv, Direction.BACKWARD_Q)
    flash_backward(grad_out, query, key, value, out, lse, grad_lse, dq, dk, dv, scale, is_causal, bottom_right,
                   cfg_kv, cfg_q, dot_options(query.dtype, interpreted=query.device.type == "cpu"))
    return dq, dk, dv


# --- CPU: opaque custom ops ------------------------------------------------------------------------------

@torch.library.custom_op("fa_inductor::attention_forward_cpu", mutates_args=(), device_types="cpu")
def _forward_cpu(query: Tensor, key: Tensor, value: Tensor, scale: float, is_causal: bool,
                 bottom_right: bool) -> tuple[Tensor, Tensor]:
    if cpu_runs_interpreter(query.dtype):
        return _run_forward(query, key, value, scale, is_causal, bottom_right)
    out, lse = blockwise.blockwise_forward(query, key, value, scale, is_causal, bottom_right)
    result = empty_output(query, value)
    result.copy_(out)
    return result, lse


@_forward_cpu.register_fake
def _(query, key, value, scale, is_causal, bottom_right):
    return empty_output(query, value), empty_lse(query)


@torch.library.custom_op("fa_inductor::attention_backward_cpu", mutates_args=(), device_types="cpu")
def _backward_cpu(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                  grad_lse: Optional[Tensor], scale: float, is_causal: bool,
                  bottom_right: bool) -> tuple[Tensor, Tensor, Tensor]:
    if cpu_runs_interpreter(query.dtype):
        return _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, bottom_right)
    grads = blockwise.blockwise_backward(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                                         bottom_right)
    results = _empty_grads(query, key, value)
    for result, grad in zip(results, grads):
        result.copy_(grad)
    return results


@_backward_cpu.register_fake
def _(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, bottom_right):
    return _empty_grads(query, key, value)


# --- the public ops -------------------------------------------------------------------------------------

def _forward_impl(query: Tensor, key: Tensor, value: Tensor, scale: float, is_causal: bool,
                  bottom_right: bool) -> tuple[Tensor, Tensor]:
    if query.device.type == "cpu":
        return torch.ops.fa_inductor.attention_forward_cpu(query, key, value, scale, is_causal, bottom_right)
    return _run_forward(query, key, value, scale, is_causal, bottom_right)


def _backward_impl(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                   grad_lse: Optional[Tensor], scale: float, is_causal: bool,
                   bottom_right: bool) -> tuple[Tensor, Tensor, Tensor]:
    if query.device.type == "cpu":
        return torch.ops.fa_inductor.attention_backward_cpu(grad_out, query, key, value, out, lse, grad_lse,
                                                            scale, is_causal, bottom_right)
    return _run_backward(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, bottom_right)


flash_attention_forward = torch.library.triton_op("fa_inductor::flash_attention_forward", _forward_impl,
                                                  mutates_args=())
flash_attention_backward = torch.library.triton_op("fa_inductor::flash_attention_backward", _backward_impl,
                                                   mutates_args=())


# --- autograd -------------------------------------------------------------------------------------------

_FORWARD_ARGS = tuple(inspect.signature(_forward_impl).parameters)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["query"], args["key"], args["value"], out, lse)
    ctx.options = {name: args[name] for name in ("scale", "is_causal", "bottom_right")}
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fa_inductor.flash_attention_backward(grad_out, query, key, value, out, lse, grad_lse,
                                                                **ctx.options)
    grads = {"query": dq, "key": dk, "value": dv}
    return tuple(grads.get(name) for name in _FORWARD_ARGS)


flash_attention_forward.register_autograd(_backward, setup_context=_setup_context)
