"""Exact attention in plain PyTorch with memory linear in sequence length: the op's path for CPU tensors.

The same algorithm as the Triton kernels, written with whole-tensor operations: keys are visited in blocks of
``KEY_BLOCK`` rows with an online softmax, so the largest temporary is [B, H, M, KEY_BLOCK] instead of
[B, H, M, N].  Products run in fp32 for 16-bit inputs (fp64 for fp64 inputs).  Grouped-query attention views
the query heads as [B, HK, GROUP, M, D] so K and V are broadcast, never repeated.  Causal masking and the
fully-masked-row rule (output 0, LSE -inf, gradient 0) match the kernels.
"""

from __future__ import annotations

import torch

__all__ = ["KEY_BLOCK", "blockwise_forward", "blockwise_backward"]

KEY_BLOCK = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, E] -> [B, HK, GROUP, L, E] in the accumulation dtype."""
    batch, heads, length, width = x.shape
    return x.to(dtype).reshape(batch, kv_heads, heads // kv_heads, length, width)


def _key_end(n_queries: int, n_keys: int, is_causal: bool, shift: int) -> int:
    """Keys past this index are masked for every query row."""
    return min(n_keys, max(n_queries + shift, 0)) if is_causal else n_keys


def _causal_keep(rows: torch.Tensor, start: int, stop: int, shift: int) -> torch.Tensor:
    cols = torch.arange(start, stop, device=rows.device)
    return cols[None, :] <= rows[:, None] + shift


def blockwise_forward(query, key, value, scale: float, is_causal: bool, bottom_right: bool):
    """Returns (out [B, H, M, DV] in the input dtype, lse [B, H, M] fp32)."""
    batch, heads, n_queries, _ = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    acc_dtype = _acc_dtype(query.dtype)
    shift = n_keys - n_queries if bottom_right else 0
    q = _grouped(query, kv_heads, acc_dtype)
    rows = torch.arange(n_queries, device=query.device)
    m = q.new_full(q.shape[:-1], float("-inf"))
    l = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(q.shape[:-1] + (value.shape[-1],))
    for start in range(0, _key_end(n_queries, n_keys, is_causal, shift), KEY_BLOCK):
        stop = min(start + KEY_BLOCK, n_keys)
        k = key[:, :, None, start:stop].to(acc_dtype)
        v = value[:, :, None, start:stop].to(acc_dtype)
        s = (q @ k.transpose(-1, -2)) * scale
        if is_causal:
            s = s.masked_fill(~_causal_keep(rows, start, stop, shift), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = torch.exp(s - m_ref[..., None])
        alpha = torch.exp(m - m_ref)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ v
        m = m_new
    out = acc / l.masked_fill(l == 0, 1.0)[..., None]
    lse = m + torch.log(l)
    out = out.reshape(batch, heads, n_queries, -1).to(query.dtype)
    return out, lse.reshape(batch, heads, n_queries)


def blockwise_backward(grad_out, query, key, value, out, lse, grad_lse, scale: float, is_causal: bool,
                       bottom_right: bool):
    """Returns (dq, dk, dv) with the shapes and dtypes of query, key, value."""
    batch, heads, n_queries, _ = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    acc_dtype = _acc_dtype(query.dtype)
    shift = n_keys - n_queries if bottom_right else 0
    q = _grouped(query, kv_heads, acc_dtype)
    do = _grouped(grad_out, kv_heads, acc_dtype)
    delta = (do * _grouped(out, kv_heads, acc_dtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - _grouped(grad_lse[..., None], kv_heads, acc_dtype)[..., 0]
    lse_g = _grouped(lse[..., None], kv_heads, acc_dtype)[..., 0]
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))  # rows with no key: P = 0
    rows = torch.arange(n_queries, device=query.device)
    dq = torch.zeros_like(q)
    dk = key.new_zeros(key.shape, dtype=acc_dtype)
    dv = value.new_zeros(value.shape, dtype=acc_dtype)
    for start in range(0, _key_end(n_queries, n_keys, is_causal, shift), KEY_BLOCK):
        stop = min(start + KEY_BLOCK, n_keys)
        k = key[:, :, None, start:stop].to(acc_dtype)
        v = value[:, :, None, start:stop].to(acc_dtype)
        p = torch.exp((q @ k.transpose(-1, -2)) * scale - lse_g[..., None])
        if is_causal:
            p = p.masked_fill(~_causal_keep(rows, start, stop, shift), 0.0)
        dv[:, :, start:stop] = (p.transpose(-1, -2) @ do).sum(2)
        ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
        dq += (ds @ k) * scale
        dk[:, :, start:stop] = (ds.transpose(-1, -2) @ q).sum(2) * scale
    dq = dq.reshape(query.shape).to(query.dtype)
    return dq, dk.to(key.dtype), dv.to(value.dtype)
