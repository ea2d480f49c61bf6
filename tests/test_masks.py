"""Masks, bias, sliding windows, lengths, softcapping, dropout and block-sparse attention in the kernels.

Every case runs the op forward and backward (bias gradient included) and compares against the fp64 reference
of ``attention_ref`` within the error budget.  "cpu" cases run the Triton kernels through the interpreter on a
machine without CUDA (see conftest.py; 16x16 tiles, so short sequences span several blocks); "cuda" cases run
on the GPU in fp16/bf16 at lengths that are not multiples of the tiles.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fa_inductor
from attention_ref import assert_within_budget, attention_ref, lse_ref, max_err, torch_math
from fa_inductor.kernels import rng

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, requires_cuda]


def _bias(shape, kind, dtype, device, full):
    """A float bias (``kind='float'``), a -inf/0 bias ('neg_inf'), a finfo.min padding bias ('finfo_min') or a
    boolean mask ('bool') of ``shape`` (dims 1 or as in ``full``)."""
    if kind == "bool":
        return torch.rand(shape, device=device) > 0.3
    if kind == "float":
        return torch.randn(shape, device=device).to(dtype)
    if kind == "neg_inf":
        return torch.where(torch.rand(shape, device=device) > 0.4, 0.0, float("-inf")).to(dtype)
    if kind in ("padding_bool", "padding_neg_inf"):
        # keys past each batch element's length are masked: whole key blocks die (block lists skip them)
        lengths = torch.tensor([13] + [full[3]] * (full[0] - 1), device=device).view(-1, 1, 1, 1)
        live = (torch.arange(full[3], device=device).view(1, 1, 1, -1) < lengths).expand(shape)
        return live if kind == "padding_bool" else torch.where(live, 0.0, float("-inf")).to(dtype)
    if kind == "finfo_min":
        # Hugging Face's padding bias: keys past each batch's length get finfo.min; batch 0 masks every key of
        # the even rows, whose softmax is then uniform over finite scores (what eager computes), not 0.
        n = full[3]
        lengths = torch.tensor([n // 2] + [n] * (full[0] - 1), device=device).view(-1, 1, 1, 1)
        keys = torch.arange(n, device=device).view(1, 1, 1, -1)
        rows = torch.arange(full[2], device=device).view(1, 1, -1, 1)
        masked = (keys >= lengths) | ((rows % 2 == 0) & (torch.arange(full[0], device=device).view(-1, 1, 1, 1) == 0))
        return torch.where(masked, torch.finfo(dtype).min, 0.0).to(dtype).expand(full[0], 1, full[2], n)[
            tuple(slice(None) if s > 1 else slice(0, 1) for s in shape)]
    raise ValueError(kind)


def run_masked(device, dtype, batch, heads, kv_heads, m, n, d, *, is_causal=False, bottom_right=False,
               bias_shape=None, bias_kind="float", window=(-1, -1), seqlens_q=None, seqlens_k=None, softcap=0.0,
               dropout_p=0.0, block_mask=None, block_size=128, scale=None, backward=True):
    torch.manual_seed(1)
    q = torch.randn(batch, heads, m, d, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, n, d, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, n, d, device=device).to(dtype)
    full = (batch, heads, m, n)
    bias = _bias(bias_shape, bias_kind, dtype, device, full) if bias_shape is not None else None
    bias_grad = backward and bias is not None and bias.is_floating_point() and bias_kind == "float"
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    as_tensor = lambda x: None if x is None else torch.tensor(x, device=device, dtype=torch.int32)  # noqa: E731
    seqlens_q, seqlens_k = as_tensor(seqlens_q), as_tensor(seqlens_k)
    rng_state = keep = None
    if dropout_p > 0:
        rng_state = torch.tensor([1234567890123, 77], dtype=torch.int64, device=device)
        keep = rng.keep_mask(rng_state, batch, heads, m, n, dropout_p)
    ref_kwargs = dict(window=window, seqlens_q=seqlens_q, seqlens_k=seqlens_k, softcap=softcap, keep=keep,
                      dropout_p=dropout_p, block_mask=block_mask, block_size=block_size)

    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    bias_leaf = bias.detach().requires_grad_(bias_grad) if bias is not None else None
    out, lse = torch.ops.fa_inductor.flash_attention_forward(
        *leaves, scale, is_causal, bottom_right, attn_bias=bias_leaf, window_left=window[0],
        window_right=window[1], seqlens_q=seqlens_q, seqlens_k=seqlens_k, softcap=softcap, dropout_p=dropout_p,
        rng_state=rng_state, block_mask=block_mask, block_size=block_size)
    assert out.shape == (batch, heads, m, d) and out.dtype == dtype

    ref_in = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref_bias = bias.detach().double().requires_grad_(bias_grad) if bias is not None and bias.is_floating_point() \
        else bias
    ref = attention_ref(*ref_in, scale, is_causal, bottom_right, False, bias=ref_bias, **ref_kwargs)
    math_in = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    math_bias = bias.detach().requires_grad_(bias_grad) if bias is not None and bias_grad else bias
    theirs = torch_math(*math_in, scale, is_causal, bottom_right, bias=math_bias, **ref_kwargs)
    assert_within_budget("out", out, theirs, ref, depth=d)

    lse_expected = lse_ref(*(t.detach() for t in ref_in), scale, is_causal, bottom_right, False,
                           bias=None if ref_bias is None else ref_bias.detach(), **ref_kwargs)
    finite = torch.isfinite(lse_expected)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), "rows with no visible key must have LSE -inf"
    if finite.any():
        assert max_err(lse[finite], lse_expected[finite]) <= 1e-3 * (1 + lse_expected[finite].abs().max().item())

    if backward:
        grad = torch.randn_like(out)
        wrt = leaves + ([bias_leaf] if bias_grad else [])
        ours = torch.autograd.grad(out, wrt, grad)
        ref.backward(grad.double())
        theirs.backward(grad)
        names = ["dq", "dk", "dv"] + (["dbias"] if bias_grad else [])
        refs = ref_in + ([ref_bias] if bias_grad else [])
        mine = math_in + ([math_bias] if bias_grad else [])
        for name, g, r, t in zip(names, ours, refs, mine):
            assert g.shape == r.shape and g.dtype == dtype, name
            assert torch.isfinite(g).all(), name
            assert_within_budget(name, g, t.grad, r.grad, depth=max(d, n if name == "dbias" else d))
    return out


# --- cases -------------------------------------------------------------------------------------------------
# (batch, heads, kv_heads, M, N, D) for the interpreter: GQA 2:1, lengths not multiples of the 16-row tiles
# (two query tiles, two key tiles: every stage and boundary of the kernels' loops is exercised).
CPU_SHAPE = (2, 2, 1, 21, 27, 16)
CPU_FULL = (2, 2, 21, 27)

BIAS_SHAPES = [tuple(full if keep else 1 for keep, full in zip(flags, CPU_FULL))
               for flags in itertools.product((False, True), repeat=4)]

CASES = {
    "causal_top_left": dict(is_causal=True),
    "causal_bottom_right": dict(is_causal=True, bottom_right=True),
    "window_both": dict(window=(5, 3)),
    "window_left_causal": dict(window=(7, -1), is_causal=True),
    "window_right_only": dict(window=(-1, 4)),
    "window_bottom_right": dict(window=(6, 0), bottom_right=True),
    "window_wider_than_sequence": dict(window=(500, 500)),
    "window_zero": dict(window=(0, 0)),
    "seqlens_k": dict(seqlens_k=[19, 27]),
    "seqlens_q": dict(seqlens_q=[13, 21]),
    "seqlens_all_masked_batch": dict(seqlens_k=[0, 17], seqlens_q=[21, 0]),
    "seqlens_causal_bottom_right": dict(seqlens_q=[12, 21], seqlens_k=[20, 27], is_causal=True, bottom_right=True),
    "seqlens_window_bias": dict(seqlens_k=[25, 15], window=(9, 2), bias_shape=(2, 1, 1, 27)),
    "bool_mask": dict(bias_shape=(2, 1, 21, 27), bias_kind="bool"),
    "bool_mask_causal": dict(bias_shape=(1, 2, 21, 27), bias_kind="bool", is_causal=True),
    "neg_inf_bias": dict(bias_shape=(2, 2, 21, 27), bias_kind="neg_inf"),
    "finfo_min_padding_rows": dict(bias_shape=(2, 1, 21, 27), bias_kind="finfo_min"),
    # padding biases: the kernels skip the key blocks past the last live key (masking.bias_key_bounds)
    "padding_bool_key_bounds": dict(bias_shape=(2, 1, 1, 27), bias_kind="padding_bool"),
    "padding_neg_inf_key_bounds": dict(bias_shape=(2, 2, 1, 27), bias_kind="padding_neg_inf"),
    "padding_finfo_min_key_bounds": dict(bias_shape=(2, 1, 1, 27), bias_kind="finfo_min"),
    "padding_key_bounds_causal": dict(bias_shape=(2, 1, 1, 27), bias_kind="padding_bool", is_causal=True),
    "padding_key_bounds_softcap": dict(bias_shape=(2, 1, 1, 27), bias_kind="padding_neg_inf", softcap=2.0),
    "softcap": dict(softcap=2.5),
    "softcap_bias_causal": dict(softcap=2.0, bias_shape=(1, 2, 21, 27), is_causal=True),
    "dropout": dict(dropout_p=0.3),
    "dropout_causal_bias": dict(dropout_p=0.2, is_causal=True, bias_shape=(2, 1, 1, 27)),
    "dropout_all": dict(dropout_p=1.0),
    "negative_scale_masked": dict(scale=-0.3, window=(4, 4)),
}


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_bias_broadcast(bias_shape):
    run_masked("cpu", torch.float32, *CPU_SHAPE, bias_shape=bias_shape)


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_cases(name):
    run_masked("cpu", torch.float32, *CPU_SHAPE, **CASES[name])


def test_cpu_bf16_bias_window():
    run_masked("cpu", torch.bfloat16, *CPU_SHAPE, bias_shape=(2, 2, 21, 27), window=(8, 0))


SPARSE_CASES = {
    "broadcast_heads": dict(mask_shape=(2, 1)),
    "per_head": dict(mask_shape=(2, 2)),
    "causal": dict(mask_shape=(1, 2), is_causal=True),
    "window_lengths": dict(mask_shape=(2, 2), window=(12, 3), seqlens_k=[27, 19]),
    "empty_rows": dict(mask_shape=(1, 1), density=0.0),
}


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_cpu_block_sparse(name):
    case = dict(SPARSE_CASES[name])
    mask_shape, density = case.pop("mask_shape"), case.pop("density", 0.5)
    block = 16  # the interpreter's tile: two query blocks by two key blocks at the CPU lengths
    torch.manual_seed(3)
    blocks = torch.rand(*mask_shape, math.ceil(21 / block), math.ceil(27 / block)) < density
    run_masked("cpu", torch.float32, *CPU_SHAPE, block_mask=blocks, block_size=block, **case)


# --- dropout: reproducibility, keep rate, fresh draws ----------------------------------------------------------

def test_dropout_keep_rate_within_statistical_bounds():
    state = torch.tensor([42, 0], dtype=torch.int64)
    for p in (0.1, 0.5, 0.9):
        keep = rng.keep_mask(state, 4, 8, 128, 256, p)
        n = keep.numel()
        rate = keep.double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(rate - (1 - p)) < 5 * sigma, (p, rate)
    # different heads/rows/offsets draw different words
    a = rng.keep_mask(state, 1, 2, 64, 64, 0.5)
    assert not torch.equal(a[0, 0], a[0, 1])
    b = rng.keep_mask(torch.tensor([42, 1]), 1, 2, 64, 64, 0.5)
    assert not torch.equal(a, b)


def test_dropout_manual_seed_reproduces_and_differs_between_calls():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    torch.manual_seed(5)
    a = fa_inductor.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    b = fa_inductor.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    c = fa_inductor.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)


# --- the public functions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sdpa_attn_mask_matches_torch(mask_kind):
    q, k, v = (torch.randn(2, 3, 19, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(19, 23) > 0.3 if mask_kind == "bool" else torch.randn(3, 1, 23, requires_grad=True)
    k2, v2 = (torch.randn(2, 3, 23, 16, requires_grad=True) for _ in range(2))
    out = fa_inductor.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    expected = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    leaves = [q, k2, v2] + ([mask] if mask_kind == "float" else [])
    ours = torch.autograd.grad(out.square().sum(), leaves)
    theirs = torch.autograd.grad(expected.square().sum(), leaves)
    for g, t in zip(ours, theirs):
        assert g.shape == t.shape
        torch.testing.assert_close(g, t, atol=5e-5, rtol=5e-5)


def test_sdpa_keyword_extensions():
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    lengths = torch.tensor([30, 11])
    out = fa_inductor.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True, window_size=(6, 0),
                                                   key_lengths=lengths, softcap=3.0)
    ref = attention_ref(q, k[:, :2], v[:, :2], window=(6, 0), seqlens_k=lengths, softcap=3.0)
    assert max_err(out, ref) < 1e-5
    out = fa_inductor.scaled_dot_product_attention(q[:, :, :7], k, v, is_causal=True, bottom_right=True,
                                                   query_lengths=torch.tensor([7, 3]))
    ref = attention_ref(q[:, :, :7], k, v, is_causal=True, bottom_right=True, seqlens_q=torch.tensor([7, 3]))
    assert max_err(out, ref) < 1e-5


def test_block_sparse_attention_public():
    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    blocks = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    out = fa_inductor.block_sparse_attention(q, k, v, blocks, block_size=32)
    ref = attention_ref(q, k, v, block_mask=blocks.view(1, 1, 3, 3), block_size=32)
    assert max_err(out, ref) < 1e-5
    with pytest.raises(RuntimeError, match="block_mask must end in"):
        fa_inductor.block_sparse_attention(q, k, v, blocks[:2], block_size=32)
    with pytest.raises(ValueError, match="power of two"):
        fa_inductor.block_sparse_attention(q, k, v, blocks, block_size=24)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=5), TypeError, "window_size"),
    (dict(key_lengths=torch.tensor([1.0, 2.0])), TypeError, "key_lengths"),
    (dict(key_lengths=torch.tensor([1, 2, 3])), RuntimeError, "key_lengths"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(attn_mask=torch.ones(4, 7, dtype=torch.bool)), RuntimeError, "attn_mask"),
])
def test_extension_argument_errors(kwargs, error, match):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    with pytest.raises(error, match=match):
        fa_inductor.scaled_dot_product_attention(q, k, v, **kwargs)


def test_extensions_on_unsupported_inputs_raise():
    q, k, v = (torch.randn(1, 2, 2, 5, 8) for _ in range(3))
    with pytest.raises((NotImplementedError, RuntimeError), match="window_size|key_lengths|4-D"):
        fa_inductor.scaled_dot_product_attention(q, k, v, window_size=(2, 0))


def test_bias_gradient_under_compile():
    q, k, v = (torch.randn(2, 2, 24, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 24, 24, requires_grad=True)

    def f(q, k, v, bias):
        return fa_inductor.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum(), (q, k, v, bias))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=5e-5, rtol=5e-5)


# --- GPU -----------------------------------------------------------------------------------------------------
GPU_SHAPE = (2, 4, 2, 300, 333)
GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("name", list(CASES), ids=str)
@pytest.mark.gpu
@requires_cuda
def test_gpu_cases(name, dtype, d):
    case = dict(CASES[name])
    if "bias_shape" in case:
        case["bias_shape"] = tuple(f if s > 1 else 1 for s, f in zip(case["bias_shape"], (2, 4, 300, 333)))
    for key in ("seqlens_q", "seqlens_k"):
        if key in case:
            limit = 300 if key == "seqlens_q" else 333
            case[key] = [min(limit, x * 9) for x in case[key]]
    if "window" in case:
        case["window"] = tuple(w * 10 if w > 0 else w for w in case["window"])
    run_masked("cuda", GPU_DTYPES[dtype], *GPU_SHAPE, d, **case)


# A bias broadcast over every dim is one scalar per call: its exact gradient is 0 (softmax is shift-invariant),
# and what remains is rounding.  FlashAttention's Delta = rowsum(dO * O) reads the bf16-rounded output, so the
# summed gradient carries that rounding (measured on an H200: 0.12 against torch's 0.03); a known limit.
_SCALAR_BIAS = pytest.mark.xfail(reason="scalar-bias gradient (exactly 0) carries the bf16 rounding of O in "
                                        "Delta; a known limit of the FlashAttention backward", strict=False)


@pytest.mark.parametrize("bias_shape", [pytest.param(s, marks=_SCALAR_BIAS) if s == (1, 1, 1, 1) else s
                                        for s in BIAS_SHAPES[::3] + [BIAS_SHAPES[-1]]],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@requires_cuda
def test_gpu_bias_broadcast(bias_shape):
    shape = tuple(f if s > 1 else 1 for s, f in zip(bias_shape, (2, 4, 300, 333)))
    run_masked("cuda", torch.bfloat16, *GPU_SHAPE, 64, bias_shape=shape)


@pytest.mark.parametrize("name", list(SPARSE_CASES))
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.gpu
@requires_cuda
def test_gpu_block_sparse(name, block):
    case = dict(SPARSE_CASES[name])
    mask_shape, density = case.pop("mask_shape"), case.pop("density", 0.5)
    if "window" in case:
        case["window"] = (200, 30)
        case["seqlens_k"] = [333, 250]
    mask_shape = tuple(4 if s == 2 and i == 1 else s for i, s in enumerate(mask_shape))
    torch.manual_seed(3)
    blocks = torch.rand(*mask_shape, math.ceil(300 / block), math.ceil(333 / block), device="cuda") < density
    run_masked("cuda", torch.bfloat16, *GPU_SHAPE, 128, block_mask=blocks, block_size=block, **case)


@pytest.mark.gpu
@requires_cuda
def test_gpu_dropout_cuda_graph_replays_draw_fresh_numbers():
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):  # warm up (compiles the kernels) outside the capture
        fa_inductor.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa_inductor.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out), "each replay must draw fresh dropout masks"
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@requires_cuda
def test_gpu_masks_under_compile_and_dynamic_lengths():
    def f(q, k, v, bias, lengths):
        return fa_inductor.scaled_dot_product_attention(q, k, v, attn_mask=bias, key_lengths=lengths,
                                                        window_size=(64, 0))

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (200, 257):
        q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        bias = torch.randn(1, 4, 1, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lengths = torch.tensor([n, n // 2], device="cuda")
        out = compiled(q, k, v, bias, lengths)
        ref = attention_ref(q, k, v, bias=bias.expand(2, 4, n, n), window=(64, 0), seqlens_k=lengths)
        theirs = torch_math(q, k, v, bias=bias, window=(64, 0), seqlens_k=lengths)
        assert_within_budget("out", out, theirs, ref, depth=64)
        out.sum().backward()
        assert bias.grad.shape == bias.shape and torch.isfinite(bias.grad).all()
