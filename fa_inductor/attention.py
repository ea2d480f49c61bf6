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

from .kernels.masking import SPARSE_BLOCK
from .kernels.op import eager_applies, eager_attention
from .kernels.rng import new_rng_state

__all__ = ["scaled_dot_product_attention", "block_sparse_attention", "flash_attention", "fallback_reason"]

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


def _broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` (same result, same RuntimeError) without its host cost for static shapes;
    traced calls and symbolic sizes go to torch's."""
    if torch.compiler.is_compiling() or not all(type(size) is int for shape in shapes for size in shape):
        return torch.broadcast_shapes(*shapes)
    if all(shape == shapes[0] for shape in shapes[1:]):
        return torch.Size(shapes[0])
    ndim = max(len(shape) for shape in shapes)
    result = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if result[i] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} cannot be broadcast together")
                result[i] = size
    return torch.Size(result)


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
        _broadcast_shapes(query.shape[:batch_dims], key.shape[:batch_dims], value.shape[:batch_dims])
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
    if (isinstance(attn_mask, Tensor) and _causal_bias_variant(attn_mask) is None
            and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point())):
        return f"attn_mask of dtype {attn_mask.dtype} (the kernels take bool or floating-point masks)"
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        return f"inputs must all be 3-D or 4-D, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D"
    mask_tensor = isinstance(attn_mask, Tensor) and _causal_bias_variant(attn_mask) is None
    tensors = [query, key, value] + ([attn_mask] if mask_tensor else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return "query, key, value and attn_mask are on different devices: " + ", ".join(sorted(map(str, devices)))
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
    batch = _broadcast_shapes(query.shape[:1], key.shape[:1], value.shape[:1])[0]
    hq, hk, hv = query.shape[1], key.shape[1], value.shape[1]
    if enable_gqa and hk == hv and hk != 0 and hq % hk == 0:
        heads, kv_heads = hq, hk
    else:
        heads = kv_heads = _broadcast_shapes((hq,), (hk,), (hv,))[0]
    return _expand(query, batch, heads), _expand(key, batch, kv_heads), _expand(value, batch, kv_heads), squeeze


def _expand(x: Tensor, batch, heads) -> Tensor:
    """``x`` [b, h, L, E] expanded to [batch, heads, L, E]; ``x`` itself when that changes nothing and the sizes
    are static (a view costs host time on every eager call; symbolic sizes are never compared, no guard)."""
    lead = (*x.shape[:2], batch, heads)
    if all(type(size) is int for size in lead) and lead[:2] == lead[2:]:
        return x
    return x.expand(batch, heads, *x.shape[2:])


def _validate_extensions(query: Tensor, window_size, key_lengths, query_lengths, softcap, bottom_right) -> None:
    """Checks of the keyword-only arguments that torch's SDPA does not have."""
    if window_size is not None:
        if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
            raise TypeError(f"scaled_dot_product_attention: window_size must be a pair of ints (left, right), "
                            f"-1 for unbounded, got {window_size!r}")
    for name, lengths in (("key_lengths", key_lengths), ("query_lengths", query_lengths)):
        if lengths is None:
            continue
        if not isinstance(lengths, Tensor) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"scaled_dot_product_attention: {name} must be an integer tensor of shape (batch,)")
        if query.dim() != 4 or lengths.shape != (query.shape[0],):
            raise RuntimeError(f"scaled_dot_product_attention: {name} must have shape (batch,) = "
                               f"({query.shape[0] if query.dim() == 4 else '?'},) for 4-D inputs, got "
                               f"{tuple(lengths.shape)} with {query.dim()}-D query")
        if lengths.device != query.device:
            raise RuntimeError(f"scaled_dot_product_attention: {name} must be on {query.device}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap < 0):
        raise ValueError(f"scaled_dot_product_attention: softcap must be a number >= 0 or None, got {softcap!r}")
    if not isinstance(bottom_right, bool):
        raise TypeError(f"scaled_dot_product_attention: bottom_right must be a bool, got {bottom_right!r}")


def _validate_mask(query: Tensor, key: Tensor, attn_mask) -> None:
    if not isinstance(attn_mask, Tensor) or _causal_bias_variant(attn_mask) is not None:
        return
    target = (*query.shape[:-1], key.shape[-2])  # [..., H, M, N]
    try:
        if _broadcast_shapes(attn_mask.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does not "
                           f"broadcast to the attention shape {tuple(target)}") from None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask=None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, window_size: Optional[tuple[int, int]] = None,
                                 key_lengths: Optional[Tensor] = None, query_lengths: Optional[Tensor] = None,
                                 softcap: Optional[float] = None, bottom_right: bool = False) -> Tensor:
    """Attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``, plus masks that
    never exist in memory.

    ``softmax(query @ key^T * scale + mask) @ value`` over the key axis, with ``scale`` defaulting to
    ``1 / sqrt(query.size(-1))``.  Inputs are [..., H, L, E] (3-D or 4-D run the kernels).

    SDPA's arguments: ``attn_mask`` is a boolean mask (True = attend) or a float additive bias broadcastable
    to [B, H, M, N], read through its strides (a broadcast dim is never expanded in memory); a float bias that
    requires grad gets its gradient, in its own shape.  ``dropout_p`` drops attention probabilities inside the
    kernel (seeded from torch's generator, so ``torch.manual_seed`` reproduces it).  ``is_causal`` aligns the
    causal mask top-left as SDPA does; ``attn_mask=torch.nn.attention.bias.causal_lower_right(M, N)`` (or
    ``causal_upper_left``) selects the alignment explicitly.  ``enable_gqa`` lets key/value have fewer heads
    than query (a divisor), read in place without repetition.

    Keyword-only extensions (no mask tensor is built for any of them; fully masked key blocks are skipped):

    - ``window_size=(left, right)``: query i sees keys i - left ... i + right (-1: unbounded on that side);
      a Mistral-style sliding window of W keys is ``(W - 1, 0)``.  Combines with ``is_causal`` (right = 0).
    - ``key_lengths``: int tensor (batch,); keys at or past ``key_lengths[b]`` are padding, never attended.
    - ``query_lengths``: int tensor (batch,); query rows at or past ``query_lengths[b]`` produce 0.
    - ``softcap``: Gemma 2 logit capping, scores become ``softcap * tanh(scores / softcap)`` before the mask.
    - ``bottom_right``: align causal masks and windows to the last key (row i's diagonal is key
      i + Lk - Lq, with the per-sequence lengths when given), as in prefill with a KV cache.

    Rows that no key may attend give 0 (with -inf masks; a finite additive mask such as ``finfo.min`` gives what
    the formula gives).  Calls the kernels cannot compute (dtypes, head dims or devices they lack, 5-D inputs)
    run torch's SDPA instead with the reason logged on the ``fa_inductor`` logger, or raise when they use an
    extension torch's SDPA does not have.
    """
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _validate_extensions(query, window_size, key_lengths, query_lengths, softcap, bottom_right)
    _validate_mask(query, key, attn_mask)
    return _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                     key_lengths, query_lengths, softcap, bottom_right, None, SPARSE_BLOCK)


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, block_mask: Tensor, *,
                           block_size: int = SPARSE_BLOCK, attn_mask=None, dropout_p: float = 0.0,
                           is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                           window_size: Optional[tuple[int, int]] = None, key_lengths: Optional[Tensor] = None,
                           query_lengths: Optional[Tensor] = None, softcap: Optional[float] = None,
                           bottom_right: bool = False) -> Tensor:
    """Block-sparse FlashAttention: ``scaled_dot_product_attention`` restricted to the (query block, key block)
    pairs that ``block_mask`` keeps.

    ``block_mask`` is a boolean tensor [..., ceil(M / block_size), ceil(N / block_size)] broadcastable over the
    batch and head dims of the query (e.g. [QB, KB], [H, QB, KB] or [B, H, QB, KB]); element (i, j) of the
    attention is visible only when block (i // block_size, j // block_size) is True.  ``block_size`` is 128 by
    default (any power of two >= 16).  The kernels visit only the kept blocks, forward and backward, through
    per-row block lists, so time scales with the density.  All other arguments are as in
    ``scaled_dot_product_attention`` and combine with the block mask.
    """
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _validate_extensions(query, window_size, key_lengths, query_lengths, softcap, bottom_right)
    _validate_mask(query, key, attn_mask)
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool:
        raise TypeError("block_sparse_attention: block_mask must be a boolean tensor")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_sparse_attention: block_size must be a power of two >= 16, got {block_size!r}")
    blocks = (-(-query.shape[-2] // block_size), -(-key.shape[-2] // block_size))
    if block_mask.dim() < 2 or tuple(block_mask.shape[-2:]) != blocks:
        raise RuntimeError(f"block_sparse_attention: block_mask must end in {blocks} (query blocks, key blocks) "
                           f"for lengths {query.shape[-2]}, {key.shape[-2]} and block_size {block_size}, "
                           f"got {tuple(block_mask.shape)}")
    return _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size,
                     key_lengths, query_lengths, softcap, bottom_right, block_mask, block_size)


def _dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, key_lengths,
              query_lengths, softcap, bottom_right, block_mask, block_size) -> Tensor:
    extensions = [name for name, used in (
        ("window_size", window_size is not None), ("key_lengths", key_lengths is not None),
        ("query_lengths", query_lengths is not None), ("softcap", bool(softcap)), ("bottom_right", bottom_right),
        ("block_mask", block_mask is not None)) if used]
    reason = fallback_reason(query, key, value, attn_mask, dropout_p)
    if reason:
        if extensions:
            raise NotImplementedError(f"fa_inductor attention: {', '.join(extensions)} need the fa_inductor "
                                      f"kernels, which cannot run this call: {reason}")
        if not torch.compiler.is_compiling():
            log.info("scaled_dot_product_attention: using torch SDPA: %s", reason)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    variant = _causal_bias_variant(attn_mask)
    if variant is not None:
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (query.shape[-2], key.shape[-2]):
            raise RuntimeError("scaled_dot_product_attention: attn_mask (CausalBias) was built for lengths "
                               f"({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) but query/key have "
                               f"({query.shape[-2]}, {key.shape[-2]})")
        if bottom_right and variant == "top_left":
            raise RuntimeError("scaled_dot_product_attention: bottom_right=True contradicts causal_upper_left")
        is_causal, bottom_right, attn_mask = True, variant == "bottom_right", None
    left, right = window_size if window_size is not None else (-1, -1)
    return flash_attention(query, key, value, scale, is_causal, bottom_right, enable_gqa, attn_mask=attn_mask,
                           dropout_p=dropout_p, window=(left, right), seqlens_q=query_lengths,
                           seqlens_k=key_lengths, softcap=float(softcap or 0.0), block_mask=block_mask,
                           block_size=block_size)


def flash_attention(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float], is_causal: bool,
                    bottom_right: bool, enable_gqa: bool, gqa_tiled: bool = False, *, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, window: tuple[int, int] = (-1, -1), seqlens_q: Optional[Tensor] = None,
                    seqlens_k: Optional[Tensor] = None, softcap: float = 0.0, block_mask: Optional[Tensor] = None,
                    block_size: int = SPARSE_BLOCK, nan_empty_rows: bool = False) -> Tensor:
    """The op on validated 3-D/4-D inputs that ``fallback_reason`` accepts (also the target of graph rewrites).

    ``gqa_tiled``: query head h reads key/value head ``h % HK`` (K/V repeated with ``Tensor.repeat``) instead of
    ``h // GROUP``; the query heads (and the head dims of the masks) are reordered so that the op's grouping
    applies, and the output put back.  ``attn_mask`` and ``block_mask`` broadcast as in SDPA (leading dims).
    ``nan_empty_rows``: rows with no visible key give NaN, as a plain ``torch.softmax`` over -inf scores does
    (the rewrite of hand-written attention with a mask tensor), instead of SDPA's 0."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    group = query.shape[-3] // key.shape[-3] if gqa_tiled else 1
    q, k, v, squeeze = _broadcast_heads(query, key, value, enable_gqa)
    batch, heads = q.shape[:2]
    bias = _as_4d(attn_mask, batch, heads) if attn_mask is not None else None
    blocks = _as_4d(block_mask, batch, heads) if block_mask is not None else None
    if group > 1:
        q = _swap_head_factors(q, group, key.shape[-3])
        bias, blocks = (_swap_head_factors(t, group, key.shape[-3]) if t is not None and t.shape[1] > 1 else t
                        for t in (bias, blocks))
    rng_state = new_rng_state(q.device) if dropout_p > 0 else None
    args = (q, k, v, float(scale), bool(is_causal), bool(bottom_right), bias, int(window[0]), int(window[1]),
            seqlens_q, seqlens_k, float(softcap), float(dropout_p), rng_state, blocks, int(block_size))
    if eager_applies(q, k, v, bias, seqlens_q, seqlens_k, rng_state, blocks):
        out, lse = eager_attention(*args)  # same computation, less host time per call
    else:
        out, lse = torch.ops.fa_inductor.flash_attention_forward(*args)
    if nan_empty_rows:
        out = out.masked_fill((lse == float("-inf")).unsqueeze(-1), float("nan"))
    if group > 1:
        out = _swap_head_factors(out, key.shape[-3], group)
    return out.squeeze(0) if squeeze else out


def _as_4d(mask: Tensor, batch: int, heads: int) -> Tensor:
    """A mask broadcastable to [B, H, *, *] as a 4-D view whose leading dims are 1 or full (no copy)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dim() > 4:
        mask = mask.reshape(-1, *mask.shape[-3:])
    if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
        mask = mask.expand(batch, heads, *mask.shape[2:])
    return mask


def _swap_head_factors(x: Tensor, outer: int, inner: int) -> Tensor:
    """Heads indexed (outer, inner) -> indexed (inner, outer), along dim -3."""
    return x.unflatten(-3, (outer, inner)).transpose(-4, -3).flatten(-4, -3)
