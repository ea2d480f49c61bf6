"""The one reference every test compares against, and the error budget.

``attention_ref`` computes attention in float64 straight from the formula of ``fa_inductor/kernels/masking.py``:
an additive or boolean ``bias``, a sliding ``window`` (left, right) with ``is_causal`` capping the right extent
at 0, top-left or ``bottom_right`` alignment, key/query lengths ``seqlens_k``/``seqlens_q``, ``softcap``,
dropout given as its boolean ``keep`` mask (tests draw it with ``rng.keep_mask``), and a block-sparse
``block_mask``.  The structured masks are built densely by ``dense_visible``; ``lse_ref`` is the matching
natural logsumexp.  Rows with no visible key give 0 (and LSE -inf), without NaN in any gradient.

The budget for an implementation under test is a small multiple of the error that PyTorch's own math attention
makes in the same precision on the same inputs: ``err(ours) <= K * err(torch math) + slack``.

"Same precision" means what it says: by default torch's math SDPA silently upcasts fp16/bf16 to fp32 for its
reductions, which is an fp32 computation with rounded inputs and output.  ``torch_math`` switches that upcast
off (``allow_fp16_bf16_reduction_math_sdp(True)``), so torch computes in the inputs' precision as every
tensor-core attention kernel does (the convention of flash-attention's own tests, whose reference is PyTorch
attention without upcast).  fp32 inputs are unaffected.  With masks beyond causal it passes math SDPA one float
mask in the inputs' dtype; with softcap or dropout, which SDPA lacks, it composes the same operations itself in
the inputs' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

BUDGET = 3.0


def dense_visible(n_queries, n_keys, *, is_causal=False, bottom_right=False, window=(-1, -1), seqlens_q=None,
                  seqlens_k=None, block_mask=None, block_size=128, device="cpu"):
    """The structured masks of masking.py as one boolean tensor [B or 1, H or 1, M, N] (True = visible)."""
    left, right = (w if w >= 0 else -1 for w in window)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    rows = torch.arange(n_queries, device=device).view(1, 1, -1, 1)
    cols = torch.arange(n_keys, device=device).view(1, 1, 1, -1)

    def length(lengths, limit):
        if lengths is None:
            return torch.tensor(limit, device=device)
        return lengths.to(device=device, dtype=torch.int64).clamp(0, limit).view(-1, 1, 1, 1)

    len_q, len_k = length(seqlens_q, n_queries), length(seqlens_k, n_keys)
    shift = len_k - len_q if bottom_right else 0
    visible = (cols < len_k) & (rows < len_q)
    if left >= 0:
        visible = visible & (cols >= rows + shift - left)
    if right >= 0:
        visible = visible & (cols <= rows + shift + right)
    if block_mask is not None:
        blocks = block_mask.to(device=device, dtype=torch.bool)
        visible = visible & blocks[:, :, rows.view(-1) // block_size][..., cols.view(-1) // block_size]
    return visible


def _capped_scores(q, k, v, scale, softcap):
    """Scaled (and softcapped) scores [B, H, M, N] in the inputs' precision, and V repeated to the query heads."""
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s, v


def _ref_scores(q, k, v, scale, is_causal, bottom_right, upcast, bias, window, seqlens_q, seqlens_k, softcap,
                block_mask, block_size):
    """Masked scores [B, H, M, N] and the values repeated to the query heads."""
    if upcast:
        q, k, v = (t.double().cpu() for t in (q, k, v))
        if bias is not None:
            bias = bias.cpu() if bias.dtype == torch.bool else bias.double().cpu()
    s, v = _capped_scores(q, k, v, scale, softcap)
    if bias is not None and bias.dtype == torch.bool:
        s = s.masked_fill(~bias.to(s.device), float("-inf"))
    elif bias is not None:
        s = s + bias.to(device=s.device, dtype=s.dtype)
    visible = dense_visible(q.shape[-2], k.shape[-2], is_causal=is_causal, bottom_right=bottom_right,
                            window=window, seqlens_q=seqlens_q, seqlens_k=seqlens_k, block_mask=block_mask,
                            block_size=block_size, device=s.device)
    return s.masked_fill(~visible, float("-inf")), v


def _safe_softmax(s):
    """(P, LSE) of scores with -inf entries: rows with no finite score give P = 0 and LSE = -inf, and no NaN
    reaches any gradient (the row max is a constant of the softmax, so it is detached)."""
    if s.shape[-1]:
        top = s.detach().amax(-1, keepdim=True)
    else:
        top = s.new_zeros(s.shape[:-1] + (1,))
    top = top.masked_fill(top == float("-inf"), 0.0)
    e = torch.exp(s - top)
    total = e.sum(-1, keepdim=True)
    empty = total == 0
    total = total.masked_fill(empty, 1.0)
    lse = torch.where(empty, float("-inf"), top + torch.log(total))
    return e / total, lse[..., 0]


def attention_ref(q, k, v, scale=None, is_causal=False, bottom_right=False, upcast=True, *, bias=None,
                  window=(-1, -1), seqlens_q=None, seqlens_k=None, softcap=0.0, keep=None, dropout_p=0.0,
                  block_mask=None, block_size=128):
    """[B, H, M, D] x [B, HK, N, D] x [B, HK, N, DV] -> [B, H, M, DV]; grouped-query when HK < H.
    ``keep`` is the [B, H, M, N] dropout keep mask for ``dropout_p``.  Rows with no visible key are 0.
    Differentiable in q, k, v and a float bias."""
    s, v = _ref_scores(q, k, v, scale, is_causal, bottom_right, upcast, bias, window, seqlens_q, seqlens_k,
                       softcap, block_mask, block_size)
    p, _ = _safe_softmax(s)
    if keep is not None:
        # dropout_p = 1 drops everything (torch's dropout gives zeros, not 0/0)
        p = p * keep.to(p.device) / (1.0 - dropout_p) if dropout_p < 1 else p * 0.0
    return p @ v


def lse_ref(q, k, v, scale=None, is_causal=False, bottom_right=False, upcast=True, *, bias=None,
            window=(-1, -1), seqlens_q=None, seqlens_k=None, softcap=0.0, keep=None, dropout_p=0.0,
            block_mask=None, block_size=128):
    """[B, H, M] natural logsumexp of the masked scores (before dropout; -inf for rows with no visible key)."""
    s, _ = _ref_scores(q, k, v, scale, is_causal, bottom_right, upcast, bias, window, seqlens_q, seqlens_k,
                       softcap, block_mask, block_size)
    return _safe_softmax(s)[1]


def torch_math(q, k, v, scale=None, is_causal=False, bottom_right=False, *, bias=None, window=(-1, -1),
               seqlens_q=None, seqlens_k=None, softcap=0.0, keep=None, dropout_p=0.0, block_mask=None,
               block_size=128):
    """PyTorch's own math attention in the inputs' precision and on their device."""
    masked = (bias is not None or tuple(window) != (-1, -1) or seqlens_q is not None or seqlens_k is not None
              or block_mask is not None)
    if not masked and softcap <= 0 and keep is None:
        mask = None
        if is_causal and bottom_right:
            mask, is_causal = causal_lower_right(q.shape[-2], k.shape[-2]), False
        return _math_sdpa(q, k, v, mask, is_causal, scale)
    visible = dense_visible(q.shape[-2], k.shape[-2], is_causal=is_causal, bottom_right=bottom_right,
                            window=window, seqlens_q=seqlens_q, seqlens_k=seqlens_k, block_mask=block_mask,
                            block_size=block_size, device=q.device)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias.to(q.device)
        bias = None
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = mask + bias.to(q.dtype)
    if softcap <= 0 and keep is None:
        return _math_sdpa(q, k, v, mask, False, scale)
    s, v = _capped_scores(q, k, v, scale, softcap)
    s = s + mask
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p) if dropout_p < 1 else p * 0.0
    return p @ v


def _math_sdpa(q, k, v, mask, is_causal, scale):
    previous = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=q.shape[-3] != k.shape[-3])
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(previous)


def max_err(x, ref):
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def slack(ref, depth: int = 1) -> float:
    """Rounding slack: the typical fp32 rounding of a length-``depth`` dot product (the kernels accumulate in
    fp32), 4 sqrt(depth) units in the last place, at the scale of the result or of the unit-variance inputs,
    whichever is larger.  It matters only where torch's error is ~0, e.g. a gradient that is exactly zero in
    exact arithmetic, where torch's cancellation is exact and ours is rounded."""
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    return 4 * math.sqrt(depth) * torch.finfo(torch.float32).eps * max(scale, 1.0)


def assert_within_budget(name, ours, theirs, ref, budget=BUDGET, depth=1):
    e_ours, e_theirs = max_err(ours, ref), max_err(theirs, ref)
    bound = budget * e_theirs + slack(ref, depth)
    assert math.isfinite(e_ours) and e_ours <= bound, (
        f"{name}: error {e_ours:.3e} exceeds budget {bound:.3e} (torch math same precision: {e_theirs:.3e})")
