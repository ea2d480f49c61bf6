"""Exact attention in plain PyTorch with memory linear in sequence length: the op's path for CPU tensors.

The same algorithm as the Triton kernels, written with whole-tensor operations: keys are visited in blocks of
``KEY_BLOCK`` rows with an online softmax, so the largest temporary is [B, H, M, KEY_BLOCK] instead of
[B, H, M, N].  Products run in fp32 for 16-bit inputs (fp64 for fp64 inputs).  Grouped-query attention views
the query heads as [B, HK, GROUP, M, D] so K and V (and a bias or block mask shared by all heads) are
broadcast, never repeated.

Everything ``masking.py`` defines is computed here one key block at a time: the additive or boolean bias (read
through its size-1 broadcast dims), softcapping, the structured masks (key/query lengths, sliding windows with
top-left or bottom-right alignment, block-sparse masks), and dropout, whose keep mask ``rng.keep_mask`` draws
for the block's key columns only.  Blocks with no visible element are skipped.  The softmax runs in natural
units, so a finite mask such as ``torch.finfo(dtype).min`` gives eager's values.  Fully masked rows give
output 0, LSE -inf and gradient 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import rng
from .masking import MaskSpec

__all__ = ["KEY_BLOCK", "blockwise_forward", "blockwise_backward"]

KEY_BLOCK = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _head_grouped(x: Tensor, kv_heads: int) -> Tensor:
    """A view of [X, H or 1, ...] as [X, HK, GROUP, ...], or [X, 1, 1, ...] when the head dim broadcasts."""
    return x.unsqueeze(2) if x.shape[1] == 1 else x.unflatten(1, (kv_heads, -1))


def _finite_or_zero(m: Tensor) -> Tensor:
    """The row maximum to subtract: 0 for rows with no visible key so far (max -inf), keeping exp(-inf) = 0."""
    return m.masked_fill(m == float("-inf"), 0.0)


def _both(a: Optional[Tensor], b: Tensor) -> Tensor:
    return b if a is None else a & b


class _Problem:
    """One call's sizes and masks, with the per-block pieces read from them.

    Per-batch lengths are [B, 1, 1] int64 tensors (None when absent); every mask a block produces broadcasts
    against the grouped scores [B, HK, GROUP, M, block].
    """

    def __init__(self, query: Tensor, key: Tensor, scale: float, spec: MaskSpec):
        self.batch, self.heads, self.n_queries, _ = query.shape
        self.kv_heads, self.n_keys = key.shape[1], key.shape[2]
        self.acc_dtype = _acc_dtype(query.dtype)
        self.scale = scale
        self.spec = spec
        self.device = query.device
        full = (self.batch, self.heads, self.n_queries, self.n_keys)
        for name, mask, dims in (("bias", spec.bias, 4), ("block_mask", spec.block_mask, 2)):
            if mask is None:
                continue
            if mask.dim() != 4 or any(size not in (1, f) for size, f in zip(mask.shape[:dims], full)):
                raise ValueError(f"{name} of shape {tuple(mask.shape)}: its first {dims} dims must each be 1 "
                                 f"or {full[:dims]}")

        def clamped(lengths: Optional[Tensor], limit: int) -> Optional[Tensor]:
            if lengths is None:
                return None
            return lengths.to(device=self.device, dtype=torch.int64).clamp(0, limit).view(-1, 1, 1)

        self.q_len = clamped(spec.seqlens_q, self.n_queries)
        self.k_len = clamped(spec.seqlens_k, self.n_keys)
        q_len = self.q_len if self.q_len is not None else torch.tensor(self.n_queries, device=self.device)
        k_len = self.k_len if self.k_len is not None else torch.tensor(self.n_keys, device=self.device)
        self.shift = (k_len - q_len if spec.bottom_right else torch.zeros_like(q_len)).reshape(-1, 1, 1)
        self.key_start, self.key_stop = self._key_range(*torch.broadcast_tensors(q_len, k_len, self.shift))

    def _key_range(self, q_len: Tensor, k_len: Tensor, shift: Tensor) -> tuple[int, int]:
        """Keys outside [start, stop) are invisible to every query row of every batch."""
        spec = self.spec
        lo = (shift - spec.left).clamp(min=0) if spec.left >= 0 else torch.zeros_like(shift)
        hi = torch.minimum(k_len, q_len + shift + spec.right) if spec.right >= 0 else k_len
        live = (q_len > 0) & (hi > lo)
        if not bool(live.any()):
            return 0, 0
        return int(lo[live].min()), int(hi[live].max())

    def grouped(self, x: Tensor) -> Tensor:
        """[B, H, L, E] -> [B, HK, GROUP, L, E] in the accumulation dtype."""
        return _head_grouped(x, self.kv_heads).to(self.acc_dtype)

    def blocks(self):
        """(start, stop, visible) for each key block with a visible element; ``visible`` is a boolean mask
        broadcasting against the block's scores, or None when every element is visible."""
        for start in range(self.key_start, self.key_stop, KEY_BLOCK):
            stop = min(start + KEY_BLOCK, self.key_stop)
            visible = self._visible(start, stop)
            if visible is None or bool(visible.any()):
                yield start, stop, visible

    def _visible(self, start: int, stop: int) -> Optional[Tensor]:
        spec = self.spec
        rows = torch.arange(self.n_queries, device=self.device).view(-1, 1)
        cols = torch.arange(start, stop, device=self.device).view(1, -1)
        visible = None
        if self.k_len is not None:
            visible = _both(visible, cols < self.k_len)
        if self.q_len is not None:
            visible = _both(visible, rows < self.q_len)
        if spec.left >= 0 or spec.right >= 0:
            offset = cols - rows - self.shift  # j - (i + shift_b)
            if spec.left >= 0:
                visible = _both(visible, offset >= -spec.left)
            if spec.right >= 0:
                visible = _both(visible, offset <= spec.right)
        if visible is not None:
            visible = visible[:, None, None]
        if spec.block_mask is not None:
            size = spec.block_size
            blocks = spec.block_mask[..., start // size:(stop - 1) // size + 1].to(device=self.device,
                                                                                  dtype=torch.bool)
            blocks = blocks.index_select(2, rows.view(-1) // size)
            blocks = blocks.index_select(3, cols.view(-1) // size - start // size)
            visible = _both(visible, _head_grouped(blocks, self.kv_heads))
        if spec.bias_kind == 2:
            visible = _both(visible, self._bias_block(start, stop))
        return visible

    def _bias_block(self, start: int, stop: int) -> Tensor:
        bias = self.spec.bias
        if bias.shape[-1] != 1:
            bias = bias[..., start:stop]
        return _head_grouped(bias.to(self.device), self.kv_heads)

    def scores(self, q: Tensor, k: Tensor, start: int, stop: int,
               visible: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Masked scores of one key block, and tanh(raw / softcap) for the backward (None without softcap)."""
        s = (q @ k.transpose(-1, -2)) * self.scale
        capped = None
        if self.spec.softcap > 0:
            capped = torch.tanh(s / self.spec.softcap)
            s = capped * self.spec.softcap
        if self.spec.bias_kind == 1:
            s = s + self._bias_block(start, stop).to(self.acc_dtype)
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        return s, capped

    def dropout_scale(self, start: int, stop: int) -> Optional[Tensor]:
        """keep * ``spec.drop_scale`` (1 / (1 - p), 0 at p = 1) for the block's elements (None without
        dropout)."""
        spec = self.spec
        if not spec.has_dropout:
            return None
        keep = rng.keep_mask(spec.rng_state, self.batch, self.heads, self.n_queries, self.n_keys,
                             spec.dropout_p, col_start=start, col_stop=stop)
        return _head_grouped(keep, self.kv_heads).to(self.acc_dtype) * spec.drop_scale


def _online_softmax(problem: _Problem, q: Tensor, key: Tensor, value: Optional[Tensor]):
    """Row maximum m, row sum l of exp(s - m), and (with ``value``) the unnormalised output."""
    m = q.new_full(q.shape[:-1], float("-inf"))
    l = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(q.shape[:-1] + (value.shape[-1],)) if value is not None else None
    for start, stop, visible in problem.blocks():
        k = key[:, :, None, start:stop].to(problem.acc_dtype)
        s, _ = problem.scores(q, k, start, stop, visible)
        m_new = torch.maximum(m, s.amax(-1))
        m_ref = _finite_or_zero(m_new)
        p = torch.exp(s - m_ref[..., None])
        alpha = torch.exp(m - m_ref)
        l = l * alpha + p.sum(-1)
        if value is not None:
            keep = problem.dropout_scale(start, stop)
            if keep is not None:
                p = p * keep
            acc = acc * alpha[..., None] + p @ value[:, :, None, start:stop].to(problem.acc_dtype)
        m = m_new
    return m, l, acc


def blockwise_forward(query: Tensor, key: Tensor, value: Tensor, scale: float,
                      spec: MaskSpec) -> tuple[Tensor, Tensor]:
    """Returns (out [B, H, M, DV] in the input dtype, lse [B, H, M] fp32, fp64 for fp64 inputs)."""
    problem = _Problem(query, key, scale, spec)
    batch, heads, n_queries = problem.batch, problem.heads, problem.n_queries
    m, l, acc = _online_softmax(problem, problem.grouped(query), key, value)
    out = acc / l.masked_fill(l == 0, 1.0)[..., None]
    lse = m + torch.log(l)
    out = out.reshape(batch, heads, n_queries, -1).to(query.dtype)
    return out, lse.reshape(batch, heads, n_queries)


def blockwise_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                       grad_lse: Optional[Tensor], scale: float, spec: MaskSpec,
                       bias_requires_grad: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Returns (dq, dk, dv, dbias): dq, dk, dv with the shapes and dtypes of query, key, value; dbias, when
    ``bias_requires_grad``, with the float bias's shape and dtype (dS summed over its broadcast dims), else
    None.  ``grad_lse`` (or None) is the gradient flowing into the LSE output."""
    problem = _Problem(query, key, scale, spec)
    acc_dtype = problem.acc_dtype
    q = problem.grouped(query)
    do = problem.grouped(grad_out)
    delta = (do * problem.grouped(out)).sum(-1)
    if grad_lse is not None:
        delta = delta - problem.grouped(grad_lse[..., None])[..., 0]
    if spec.natural_units:
        # P = exp(s - m) / l with the row statistics recomputed: next to a finite mask of about -3.4e38 the
        # stored LSE has absorbed log(l) (the row max swamps it), and exp(s - lse) would be l times too large.
        m, l, _ = _online_softmax(problem, q, key, None)
        row_base = _finite_or_zero(m)
        row_norm = 1.0 / l.masked_fill(l == 0, float("inf"))
    else:
        row_base = problem.grouped(lse[..., None])[..., 0]
        row_base = row_base.masked_fill(row_base == float("-inf"), float("inf"))  # rows with no key: P = 0
        row_norm = None
    dq = torch.zeros_like(q)
    dk = key.new_zeros(key.shape, dtype=acc_dtype)
    dv = value.new_zeros(value.shape, dtype=acc_dtype)
    dbias = None
    if bias_requires_grad:
        if spec.bias_kind != 1:
            raise ValueError("a bias gradient needs a floating-point bias")
        dbias = spec.bias.new_zeros(spec.bias.shape, dtype=acc_dtype)
    for start, stop, visible in problem.blocks():
        k = key[:, :, None, start:stop].to(acc_dtype)
        v = value[:, :, None, start:stop].to(acc_dtype)
        s, capped = problem.scores(q, k, start, stop, visible)
        p = torch.exp(s - row_base[..., None])
        if row_norm is not None:
            p = p * row_norm[..., None]
        dp = do @ v.transpose(-1, -2)
        keep = problem.dropout_scale(start, stop)
        if keep is not None:
            dv[:, :, start:stop] = ((p * keep).transpose(-1, -2) @ do).sum(2)
            dp = dp * keep
        else:
            dv[:, :, start:stop] = (p.transpose(-1, -2) @ do).sum(2)
        ds = p * (dp - delta[..., None])
        if dbias is not None:
            _add_bias_grad(dbias, ds.flatten(1, 2), start, stop)
        if capped is not None:
            ds = ds * (1.0 - capped * capped)
        dq += (ds @ k) * scale
        dk[:, :, start:stop] = (ds.transpose(-1, -2) @ q).sum(2) * scale
    dq = dq.reshape(query.shape).to(query.dtype)
    if dbias is not None:
        dbias = dbias.to(spec.bias.dtype)
    return dq, dk.to(key.dtype), dv.to(value.dtype), dbias


def _add_bias_grad(dbias: Tensor, ds: Tensor, start: int, stop: int) -> None:
    """Adds one key block's dS [B, H, M, block] to the bias gradient, summed over the bias's size-1 dims."""
    reduced = [dim for dim in range(4) if dbias.shape[dim] == 1 and ds.shape[dim] != 1]
    if reduced:
        ds = ds.sum(reduced, keepdim=True)
    if dbias.shape[-1] == 1:
        dbias += ds
    else:
        dbias[..., start:stop] += ds
