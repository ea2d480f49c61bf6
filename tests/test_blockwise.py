"""The blockwise CPU path called directly, against the fp64 reference, for every feature of masking.py.

fp64 inputs must agree with ``attention_ref``/``lse_ref`` to rounding (1e-10), forward and backward (with a
gradient flowing into the LSE too); fp32 and bf16 inputs must stay within the error budget of torch's math
attention in the same precision.  ``KEY_BLOCK`` is cut to 16 so that these short sequences span several key
blocks, with lengths that are not multiples of it.
"""

import itertools

import pytest
import torch

from attention_ref import assert_within_budget, attention_ref, lse_ref, max_err, torch_math
from fa_inductor.kernels import blockwise, rng
from fa_inductor.kernels.blockwise import blockwise_backward, blockwise_forward
from fa_inductor.kernels.masking import MaskSpec, window_extents

FP64 = dict(atol=1e-10, rtol=1e-10)
B, H, M, N, D = 2, 3, 19, 37, 8
RNG_STATE = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)


@pytest.fixture(autouse=True)
def _small_key_block(monkeypatch):
    monkeypatch.setattr(blockwise, "KEY_BLOCK", 16)


def make_qkv(batch=B, heads=H, kv_heads=None, m=M, n=N, d=D, dv=None, dtype=torch.float64):
    kv_heads = heads if kv_heads is None else kv_heads
    return (torch.randn(batch, heads, m, d, dtype=dtype), torch.randn(batch, kv_heads, n, d, dtype=dtype),
            torch.randn(batch, kv_heads, n, d if dv is None else dv, dtype=dtype))


def make_spec(is_causal=False, window=(-1, -1), **mask):
    """The op's view of the reference's arguments: causal folded into the window's right extent."""
    left, right = window_extents(is_causal, *window)
    return MaskSpec(left=left, right=right, **mask)


def reference_kwargs(q, k, is_causal=False, rng_state=None, **mask):
    """The reference's arguments: the dropout keep mask drawn in full from ``rng_state``."""
    kwargs = dict(mask, is_causal=is_causal)
    if mask.get("dropout_p", 0.0) > 0:
        kwargs["keep"] = rng.keep_mask(rng_state, q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                       mask["dropout_p"])
    return kwargs


def float_bias(mask):
    bias = mask.get("bias")
    return bias is not None and bias.is_floating_point()


def run_blockwise(q, k, v, scale, grad_out, grad_lse, **mask):
    spec = make_spec(**mask)
    out, lse = blockwise_forward(q, k, v, scale, spec)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = blockwise_backward(grad_out, q, k, v, out, lse, grad_lse, scale, spec, float_bias(mask))
    return out, lse, grads, grad_out


def run_reference(q, k, v, scale, grad_out, grad_lse, upcast=False, **mask):
    """Reference output, LSE and gradients (of q, k, v and a float bias) for the same cotangents."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if float_bias(mask):
        leaves.append(mask["bias"].detach().clone().requires_grad_())
        mask = dict(mask, bias=leaves[3])
    kwargs = reference_kwargs(q, k, **mask)
    out = attention_ref(*leaves[:3], scale, upcast=upcast, **kwargs)
    lse = lse_ref(*leaves[:3], scale, upcast=upcast, **kwargs)
    loss = (out * grad_out.to(out.dtype)).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * grad_lse.to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), lse.detach(), grads + (None,) * (4 - len(grads))


def check_fp64(q, k, v, scale=0.3, **mask):
    """Blockwise against the reference in fp64, forward and backward; returns the blockwise results."""
    grad_lse = torch.randn(q.shape[:-1], dtype=q.dtype)
    out, lse, grads, grad_out = run_blockwise(q, k, v, scale, None, grad_lse, **mask)
    ref_out, ref_lse, ref_grads = run_reference(q, k, v, scale, grad_out, grad_lse, **mask)
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, **FP64)
    torch.testing.assert_close(lse, ref_lse, **FP64)
    for name, ours, theirs in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        if theirs is None:
            assert ours is None, name
            continue
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        torch.testing.assert_close(ours, theirs, **FP64, msg=lambda text: f"{name}: {text}")
    return out, lse, grads


# --- bias and boolean masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("full", list(itertools.product((False, True), repeat=4)),
                         ids=lambda full: "x".join(str(s) if f else "1" for s, f in zip((B, H, M, N), full)))
def test_float_bias_broadcast(full):
    q, k, v = make_qkv()
    shape = tuple(size if f else 1 for size, f in zip((B, H, M, N), full))
    bias = torch.randn(shape, dtype=torch.float64)
    _, _, (_, _, _, dbias) = check_fp64(q, k, v, bias=bias)
    assert dbias.shape == shape


def test_float_bias_with_minus_inf_entries():
    q, k, v = make_qkv()
    bias = torch.randn(B, 1, M, N, dtype=torch.float64)
    bias[torch.rand(B, 1, M, N) < 0.3] = float("-inf")
    bias[0, 0, 4] = float("-inf")  # a fully masked row
    out, lse, (dq, _, _, dbias) = check_fp64(q, k, v, bias=bias)
    assert (out[0, :, 4] == 0).all() and (lse[0, :, 4] == float("-inf")).all() and (dq[0, :, 4] == 0).all()
    assert (dbias[bias == float("-inf")] == 0).all()


@pytest.mark.parametrize("shape", [(B, 1, M, N), (1, H, 1, N), (B, H, M, N)], ids=str)
def test_bool_mask(shape):
    q, k, v = make_qkv()
    mask = torch.rand(shape) < 0.7
    if shape[2] > 1:
        mask[..., 5, :] = False
    out, lse, _ = check_fp64(q, k, v, bias=mask)
    if shape[2] > 1:
        assert (out[..., 5, :] == 0).all() and (lse[..., 5] == float("-inf")).all()


# --- structured masks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, n", [(M, N), (N, M)])
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("window", [(3, -1), (-1, 2), (2, 1), (0, 0), (40, -1), (100, 100)], ids=str)
def test_sliding_window(window, bottom_right, m, n):
    check_fp64(*make_qkv(m=m, n=n), window=window, bottom_right=bottom_right)


@pytest.mark.parametrize("m, n", [(M, N), (N, M)])
@pytest.mark.parametrize("bottom_right", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (4, -1)], ids=["causal", "causal_sliding"])
def test_causal_with_lengths(window, bottom_right, m, n):
    seqlens_q = torch.tensor([m - 6, m + 5], dtype=torch.int32)  # the second clamps to m
    seqlens_k = torch.tensor([n + 3, 9], dtype=torch.int32)
    check_fp64(*make_qkv(m=m, n=n), is_causal=True, window=window, bottom_right=bottom_right,
               seqlens_q=seqlens_q, seqlens_k=seqlens_k)


@pytest.mark.parametrize("which", ["seqlens_k", "seqlens_q"])
def test_zero_length_batch(which):
    q, k, v = make_qkv()
    lengths = {"seqlens_k": torch.tensor([0, N - 5]), "seqlens_q": torch.tensor([M - 4, 0])}
    out, lse, (dq, dk, dv, _) = check_fp64(q, k, v, **{which: lengths[which]}, is_causal=True, bottom_right=True)
    empty = 0 if which == "seqlens_k" else 1
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    assert (dq[empty] == 0).all() and (dk[empty] == 0).all() and (dv[empty] == 0).all()


def test_every_row_empty():
    q, k, v = make_qkv()
    out, lse, grads = check_fp64(q, k, v, seqlens_k=torch.tensor([0, 0]))
    assert (out == 0).all() and (lse == float("-inf")).all() and all((g == 0).all() for g in grads[:3])


@pytest.mark.parametrize("block_size", [8, 24])
@pytest.mark.parametrize("mask_shape", [(B, H), (1, H), (B, 1), (1, 1)], ids=str)
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_block_sparse(causal, mask_shape, block_size):
    q_blocks, k_blocks = -(-M // block_size), -(-N // block_size)
    block_mask = torch.rand(mask_shape + (q_blocks, k_blocks)) < 0.6
    block_mask[..., 0, :] = False  # the first query block sees nothing
    out, _, _ = check_fp64(*make_qkv(), block_mask=block_mask, block_size=block_size,
                           is_causal=causal != "none", bottom_right=causal == "bottom_right")
    assert (out[:, :, :block_size] == 0).all()


def test_block_sparse_with_window_and_lengths():
    """Key blocks that start inside a sparse block (the window's first visible key is not aligned)."""
    block_mask = torch.rand(B, 1, 3, 5) < 0.7
    check_fp64(*make_qkv(), block_mask=block_mask, block_size=8, is_causal=True, window=(5, -1),
               bottom_right=True, seqlens_k=torch.tensor([N, 30]))


# --- softcap, dropout, GQA --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"is_causal": True},
                                   {"bias": torch.randn(1, H, M, 1, dtype=torch.float64)}],
                         ids=["plain", "causal", "bias"])
def test_softcap(extra):
    check_fp64(*make_qkv(), scale=1.0, softcap=2.5, **extra)


@pytest.mark.parametrize("extra", [{}, {"is_causal": True, "bottom_right": True},
                                   {"bias": torch.randn(B, 1, M, N, dtype=torch.float64), "softcap": 3.0}],
                         ids=["plain", "causal", "bias_softcap"])
def test_dropout(extra):
    out, _, _ = check_fp64(*make_qkv(), dropout_p=0.3, rng_state=RNG_STATE, **extra)
    q, k, v = make_qkv()
    plain, _ = blockwise_forward(q, k, v, 0.3, make_spec(**extra))
    dropped, _ = blockwise_forward(q, k, v, 0.3, make_spec(dropout_p=0.3, rng_state=RNG_STATE, **extra))
    assert not torch.allclose(plain, dropped)


@pytest.mark.parametrize("extra", [{}, {"is_causal": True}], ids=["plain", "causal"])
def test_dropout_of_everything_gives_zeros(extra):
    """dropout_p = 1 drops every probability: the output and dv are exactly 0 (not 0 / 0 = NaN), as with torch's
    dropout; the LSE is that of the scores, so dq and dk carry only the LSE's gradient (checked by check_fp64)."""
    out, lse, grads = check_fp64(*make_qkv(), dropout_p=1.0, rng_state=RNG_STATE, **extra)
    assert not out.any() and not grads[2].any() and torch.isfinite(lse).all()


def test_keep_mask_key_range_is_a_slice_of_the_full_mask():
    full = rng.keep_mask(RNG_STATE, B, H, M, N, 0.4)
    assert torch.equal(rng.keep_mask(RNG_STATE, B, H, M, N, 0.4, col_start=5, col_stop=21), full[..., 5:21])
    assert torch.equal(rng.keep_mask(RNG_STATE, B, H, M, N, 0.4, col_start=30), full[..., 30:])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query(kv_heads):
    heads = 4
    q, k, v = make_qkv(heads=heads, kv_heads=kv_heads, dv=5)
    check_fp64(q, k, v, is_causal=True, bias=torch.randn(1, heads, M, N, dtype=torch.float64),
               block_mask=torch.rand(1, heads, 3, 5) < 0.7, block_size=8, dropout_p=0.2, rng_state=RNG_STATE)


@pytest.mark.parametrize("key_block", [5, 16, 256])
def test_key_block_size_changes_nothing(monkeypatch, key_block):
    q, k, v = make_qkv()
    mask = dict(bias=torch.randn(B, 1, M, N, dtype=torch.float64), window=(6, 3), softcap=4.0,
                seqlens_k=torch.tensor([N, 20]), dropout_p=0.1, rng_state=RNG_STATE)
    monkeypatch.setattr(blockwise, "KEY_BLOCK", key_block)
    check_fp64(q, k, v, **mask)


# --- finite masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_min_mask_equals_eager(dtype):
    """A mask of finfo.min leaves fully masked rows an ordinary (uniform) softmax: the values eager computes,
    forward and backward, with no overflow."""
    q, k, v = make_qkv(dtype=dtype)
    allowed = torch.rand(B, 1, M, N) < 0.6
    allowed[1, 0, 7] = False
    bias = torch.zeros(B, 1, M, N, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    scale = 0.3
    out, lse, grads, grad_out = run_blockwise(q, k, v, scale, None, None, bias=bias)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    eager = torch.softmax((leaves[0] @ leaves[1].transpose(-1, -2)) * scale + leaves[3], dim=-1) @ leaves[2]
    eager_grads = torch.autograd.grad(eager, leaves, grad_out)
    tol = FP64 if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, eager.detach(), **tol)
    torch.testing.assert_close(out[1, :, 7], v[1].mean(-2), **tol)  # uniform over every key
    assert torch.isfinite(lse).all()
    for name, ours, theirs in zip(("dq", "dk", "dv", "dbias"), grads, eager_grads):
        torch.testing.assert_close(ours, theirs, **tol, msg=lambda text: f"{name}: {text}")


# --- lower precision: the error budget --------------------------------------------------------------------

LOW_PRECISION_CASES = {
    "bias_window_lengths_softcap": lambda dtype: dict(
        bias=torch.randn(B, 1, M, N, dtype=dtype), is_causal=True, window=(7, -1), bottom_right=True,
        seqlens_k=torch.tensor([N, 25]), softcap=5.0),
    "dropout_block_sparse": lambda dtype: dict(
        dropout_p=0.25, rng_state=RNG_STATE, block_mask=torch.rand(1, H, 3, 5) < 0.7, block_size=8),
}


@pytest.mark.parametrize("case", sorted(LOW_PRECISION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_within_budget(dtype, case):
    mask = LOW_PRECISION_CASES[case](dtype)
    q, k, v = make_qkv(dtype=dtype)
    scale = D ** -0.5
    out, lse, grads, grad_out = run_blockwise(q, k, v, scale, None, None, **mask)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse, ref_grads = run_reference(q, k, v, scale, grad_out, None, upcast=True, **mask)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if float_bias(mask):
        leaves.append(mask["bias"].clone().requires_grad_())
        mask = dict(mask, bias=leaves[3])
    theirs = torch_math(*leaves[:3], scale, **reference_kwargs(q, k, **mask))
    their_grads = torch.autograd.grad(theirs, leaves, grad_out)

    assert_within_budget("out", out, theirs, ref_out, depth=N)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) <= 1e-4 * (1 + ref_lse[finite].abs().max().item())
    for name, ours, torch_grad, ref in zip(("dq", "dk", "dv", "dbias"), grads, their_grads, ref_grads):
        assert ours.dtype == torch_grad.dtype
        assert_within_budget(name, ours, torch_grad, ref, depth=max(M, N))


# --- the reference helpers agree with each other ---------------------------------------------------------

@pytest.mark.parametrize("mask", [
    dict(bias=torch.randn(B, 1, M, N, dtype=torch.float64), window=(4, 2), seqlens_q=torch.tensor([M, 10])),
    dict(is_causal=True, bottom_right=True, softcap=2.0, dropout_p=0.3, rng_state=RNG_STATE,
         bias=torch.rand(1, H, M, N) < 0.8),
], ids=["sdpa_mask", "composed"])
def test_torch_math_matches_reference_in_fp64(mask):
    q, k, v = make_qkv()
    kwargs = reference_kwargs(q, k, **mask)
    torch.testing.assert_close(torch_math(q, k, v, 0.3, **kwargs), attention_ref(q, k, v, 0.3, **kwargs), **FP64)


def test_bias_of_wrong_shape_is_rejected():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="bias"):
        blockwise_forward(q, k, v, 0.3, MaskSpec(bias=torch.zeros(B, 2, M, N, dtype=torch.float64)))
