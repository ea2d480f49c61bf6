"""The one reference every test compares against, and the error budget.

``attention_ref`` computes attention in float64 straight from the formula.  The budget for an implementation
under test is a small multiple of the error that PyTorch's own math attention makes in the same precision on the
same inputs: ``err(ours) <= K * err(torch math) + slack``.

"Same precision" means what it says: by default torch's math SDPA silently upcasts fp16/bf16 to fp32 for its
reductions, which is an fp32 computation with rounded inputs and output.  ``torch_math`` switches that upcast
off (``allow_fp16_bf16_reduction_math_sdp(True)``), so torch computes in the inputs' precision as every
tensor-core attention kernel does (the convention of flash-attention's own tests, whose reference is PyTorch
attention without upcast).  fp32 inputs are unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

BUDGET = 3.0


def attention_ref(q, k, v, scale=None, is_causal=False, bottom_right=False, upcast=True):
    """[B, H, M, D] x [B, HK, N, D] x [B, HK, N, DV] -> [B, H, M, DV]; grouped-query when HK < H.
    Rows with no visible key are 0.  Differentiable."""
    if upcast:
        q, k, v = (t.double().cpu() for t in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if is_causal:
        m, n = q.shape[-2], k.shape[-2]
        keep = torch.ones(m, n, dtype=torch.bool, device=s.device).tril(n - m if bottom_right else 0)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), 0.0, p)  # fully masked rows
    return p @ v


def torch_math(q, k, v, scale=None, is_causal=False, bottom_right=False):
    """PyTorch's own math attention in the inputs' precision and on their device."""
    mask = None
    if is_causal and bottom_right:
        mask, is_causal = causal_lower_right(q.shape[-2], k.shape[-2]), False
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
