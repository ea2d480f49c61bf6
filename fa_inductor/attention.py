"""``fa_inductor.scaled_dot_product_attention``: torch's SDPA semantics, computed by the fa_inductor op.

The function validates its arguments as ``torch.nn.functional.scaled_dot_product_attention`` does (errors name
the offending argument), decides whether the op can compute the call exactly, and otherwise falls back to
torch's own SDPA with the reason logged on the ``fa_inductor`` logger.  Broadcast batch/head dimensions are
expanded as stride-0 views (never copied) and grouped-query attention is passed to the op as it is.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "flash_attention", "fallback_reason"]

log = logging.getLogger(__name__)

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _causal_bias_variant(attn_mask) -> Optional[str]:
    """'top_left' / 'bottom_right' when ``attn_mask`` is one of torch's CausalBias objects, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch >= 2.6 has it
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return "top_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention: expected {name} to be a Tensor, got {type(t).__name__}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("scaled_dot_product_attention: expected query, key and value to have the same dtype, "
                           f"got query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if not (query.is_floating_point()):
        raise RuntimeError(f"scaled_dot_product_attention: query must be a floating-point tensor, got {query.dtype}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError("scaled_dot_product_attention: query, key and value must have at least 2 dimensions, "
                           f"got {query.dim()}, {key.dim()}, {value.dim()}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError("scaled_dot_product_attention: query and key must have the same head dim (last "
                           f"dimension), got query {query.shape[-1]} and key {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError("scaled_dot_product_attention: key and value must have the same sequence length "
                           f"(dimension -2), got key {key.shape[-2]} and value {value.shape[-2]}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: attn_mask must be None when is_causal=True")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scaled_dot_product_attention: scale must be a Python number or None, got "
                        f"{type(scale).__name__}")
    batch_dims = -3 if enable_gqa else -2
    try:
        torch.broadcast_shapes(query.shape[:batch_dims], key.shape[:batch_dims], value.shape[:batch_dims])
    except RuntimeError:
        raise RuntimeError("scaled_dot_product_attention: the batch/head dimensions of query "
                           f"{tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} do not "
                           "broadcast (pass enable_gqa=True for grouped-query attention)") from None
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or hq % hk != 0:
            raise RuntimeError("scaled_dot_product_attention: with enable_gqa=True the number of query heads "
                               f"({hq}) must be a multiple of the key heads ({hk}), and key and value must have "
                               f"the same number of heads ({hk} vs {hv})")


def fallback_reason(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0) -> str:
    """Why the op cannot compute this call exactly ('' when it can).  Arguments must be valid."""
    if attn_mask is not None and _causal_bias_variant(attn_mask) is None:
        return "attn_mask tensors are not supported by the kernels yet"
    if dropout_p > 0.0:
        return "dropout_p > 0 is not supported by the kernels yet"
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        return f"inputs must all be 3-D or 4-D, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D"
    devices = {query.device, key.device, value.device}
    if len(devices) != 1:
        return "query, key and value are on different devices: " + ", ".join(sorted(map(str, devices)))
    device = query.device
    if device.type == "cuda":
        if query.dtype not in _CUDA_DTYPES:
            return f"dtype {query.dtype} is not supported by the CUDA kernels (fp16, bf16, fp32)"
        if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
            return f"head dim {max(query.shape[-1], value.shape[-1])} exceeds {MAX_HEAD_DIM}"
    elif device.type == "cpu":
        if query.dtype not in _CPU_DTYPES:
            return f"dtype {query.dtype} is not supported"
    else:
        return f"device type {device.type!r} is not supported"
    if query.shape[-1] == 0 or value.shape[-1] == 0:
        return "head dim 0"
    return ""


def _broadcast_heads(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """Expand to 4-D [B, H, L, E] / [B, HK, L, E] with stride-0 views; returns (q, k, v, squeeze_batch)."""
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    batch = torch.broadcast_shapes(query.shape[:1], key.shape[:1], value.shape[:1])[0]
    hq, hk, hv = query.shape[1], key.shape[1], value.shape[1]
    if enable_gqa and hk == hv and hk != 0 and hq % hk == 0:
        heads, kv_heads = hq, hk
    else:
        heads = kv_heads = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
    query = query.expand(batch, heads, *query.shape[2:])
    key = key.expand(batch, kv_heads, *key.shape[2:])
    value = value.expand(batch, kv_heads, *value.shape[2:])
    return query, key, value, squeeze


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    ``softmax(query @ key^T * scale + mask) @ value`` over the key axis, with ``scale`` defaulting to
    ``1 / sqrt(query.size(-1))``.  Inputs are [..., H, L, E] (3-D or 4-D run the kernels); ``is_causal``
    aligns the mask top-left as SDPA does, and ``attn_mask=torch.nn.attention.bias.causal_lower_right(M, N)``
    (or ``causal_upper_left``) selects the alignment explicitly.  ``enable_gqa`` lets key/value have fewer
    heads than query (a divisor), read in place without repetition.  Rows that no key may attend give 0.

    Calls the kernels cannot compute exactly (for now: tensor masks, dropout, dtypes or head dims the device
    kernels lack) run torch's SDPA instead; the reason is logged on the ``fa_inductor`` logger.
    """
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    reason = fallback_reason(query, key, value, attn_mask, dropout_p)
    if reason:
        if not torch.compiler.is_compiling():
            log.info("scaled_dot_product_attention: using torch SDPA: %s", reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    bottom_right = False
    variant = _causal_bias_variant(attn_mask)
    if variant is not None:
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
            raise RuntimeError("scaled_dot_product_attention: attn_mask (CausalBias) was built for lengths "
                               f"({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) but query/key have "
                               f"({query.shape[-2]}, {key.shape[-2]})")
        is_causal, bottom_right = True, variant == "bottom_right"
    return flash_attention(query, key, value, scale, is_causal, bottom_right, enable_gqa)


def flash_attention(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float], is_causal: bool,
                    bottom_right: bool, enable_gqa: bool, gqa_tiled: bool = False) -> Tensor:
    """The op on validated 3-D/4-D inputs that ``fallback_reason`` accepts (also the target of graph rewrites).

    ``gqa_tiled``: query head h reads key/value head ``h % HK`` (K/V repeated with ``Tensor.repeat``) instead of
    ``h // GROUP``; the query heads are reordered so that the op's grouping applies, and the output put back."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    group = query.shape[-3] // key.shape[-3] if gqa_tiled else 1
    if group > 1:
        query = _swap_head_factors(query, group, key.shape[-3])
    q, k, v, squeeze = _broadcast_heads(query, key, value, enable_gqa)
    out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, float(scale), bool(is_causal), bottom_right)
    out = out.squeeze(0) if squeeze else out
    return _swap_head_factors(out, key.shape[-3], group) if group > 1 else out


def _swap_head_factors(x: Tensor, outer: int, inner: int) -> Tensor:
    """Heads indexed (outer, inner) -> indexed (inner, outer), along dim -3."""
    return x.unflatten(-3, (outer, inner)).transpose(-4, -3).flatten(-4, -3)
