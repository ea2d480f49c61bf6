"""Numerics of the fa_inductor op, forward and backward, against the fp64 reference.

On a machine without CUDA the "cpu" cases run the Triton kernels through the interpreter (see conftest.py);
the "cuda" cases run on the GPU and skip cleanly without one.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

import fa_inductor  # noqa: F401  (registers the ops)
from fa_inductor.kernels.common import (GROUP_L2_BYTES, MAX_HEAD_GROUP, direct_launches, head_group, launch,
                                       tile_coords)
from attention_ref import assert_within_budget, attention_ref, max_err, torch_math

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, requires_cuda]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CAUSAL = {"none": (False, False), "top_left": (True, False), "bottom_right": (True, True)}


def make_qkv(batch, heads, kv_heads, m, n, d, dv, dtype, device, layout="bhld"):
    """q [B, H, M, D], k [B, HK, N, D], v [B, HK, N, DV] in one of several memory layouts:
    bhld: contiguous; blhd: transposed views of [B, L, H, D] tensors (what models produce);
    fused: views of one [B, L, H + 2 HK, D] projection; strided: every dim strided, last stride 2."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    if layout == "bhld":
        return rand(batch, heads, m, d), rand(batch, kv_heads, n, d), rand(batch, kv_heads, n, dv)
    if layout == "blhd":
        return (rand(batch, m, heads, d).transpose(1, 2), rand(batch, n, kv_heads, d).transpose(1, 2),
                rand(batch, n, kv_heads, dv).transpose(1, 2))
    if layout == "fused":
        assert m == n and d == dv
        qkv = rand(batch, m, heads + 2 * kv_heads, d)
        return (qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads:heads + kv_heads].transpose(1, 2),
                qkv[:, :, heads + kv_heads:].transpose(1, 2))
    if layout == "strided":
        return (rand(batch, heads, m, 2 * d)[..., ::2], rand(batch, kv_heads, n, 2 * d)[..., ::2],
                rand(batch, kv_heads, n, 2 * dv)[..., ::2])
    raise ValueError(layout)


def run_case(batch, heads, kv_heads, m, n, d, dv, dtype, device, causal="none", layout="bhld", scale=None,
             backward=True):
    is_causal, bottom_right = CAUSAL[causal]
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, d, dv, dtype, device, layout)
    scale_f = 1.0 / math.sqrt(d) if scale is None else scale
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    out, lse = torch.ops.fa_inductor.flash_attention_forward(*leaves, scale_f, is_causal, bottom_right)
    assert out.shape == (batch, heads, m, dv) and out.dtype == dtype and lse.shape == (batch, heads, m)

    ref_in = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref = attention_ref(*ref_in, scale=scale_f, is_causal=is_causal, bottom_right=bottom_right, upcast=False)
    math_in = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    theirs = torch_math(*math_in, scale=scale_f, is_causal=is_causal, bottom_right=bottom_right)
    assert_within_budget("out", out, theirs, ref, depth=max(d, dv))

    # logsumexp against fp64 (rows with no visible key: -inf)
    s = (ref_in[0] @ ref_in[1].repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * scale_f
    if is_causal:
        keep = torch.ones(m, n, dtype=torch.bool, device=device).tril(n - m if bottom_right else 0)
        s = s.masked_fill(~keep, float("-inf"))
    lse_ref = torch.logsumexp(s.detach(), -1)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert max_err(lse[finite], lse_ref[finite]) <= 1e-3 * (1 + lse_ref[finite].abs().max().item())

    if backward:
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, leaves, grad)
        ref.backward(grad.double())
        theirs.backward(grad)
        for name, g, r, t in zip("qkv", ours, ref_in, math_in):
            assert g.shape == r.shape and g.dtype == dtype
            assert_within_budget(f"d{name}", g, t.grad, r.grad, depth=max(d, dv))


# --- interpreter / CPU grid: awkward shapes, small enough for the interpreter -----------------------------

CPU_CASES = [
    # batch, heads, kv_heads, m, n, d, dv, dtype, causal, layout
    (1, 2, 2, 17, 17, 16, 16, "fp32", "none", "bhld"),
    (2, 2, 2, 97, 97, 64, 64, "fp32", "top_left", "bhld"),
    (1, 4, 1, 37, 97, 40, 40, "fp32", "bottom_right", "bhld"),   # MQA, cross lengths
    (1, 8, 1, 17, 33, 80, 80, "bf16", "none", "blhd"),           # GQA 8:1
    (1, 2, 2, 1, 97, 96, 96, "fp16", "bottom_right", "bhld"),    # one query row (decode)
    (2, 2, 2, 97, 17, 32, 48, "fp32", "bottom_right", "bhld"),   # rows with no visible key; DV != D
    (1, 2, 2, 97, 97, 128, 128, "bf16", "top_left", "fused"),
    (1, 2, 1, 33, 33, 160, 160, "fp32", "none", "strided"),
    (1, 1, 1, 20, 20, 192, 192, "fp16", "top_left", "bhld"),
    (1, 1, 1, 17, 25, 256, 200, "bf16", "none", "bhld"),
    (1, 4, 2, 64, 64, 64, 64, "bf16", "top_left", "blhd"),       # lengths that are multiples of the block
    (1, 2, 2, 1, 1, 16, 16, "fp32", "top_left", "bhld"),
    (2, 3, 3, 17, 97, 24, 24, "fp16", "none", "blhd"),
    (1, 2, 2, 97, 17, 40, 40, "bf16", "top_left", "bhld"),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_kernels(case):
    *shape, dtype, causal, layout = case
    run_case(*shape, DTYPES[dtype], "cpu", causal, layout)


@pytest.mark.parametrize("scale", [0.3, -0.2, 0.0])
def test_cpu_scales(scale):
    run_case(1, 2, 2, 33, 40, 32, 32, torch.float32, "cpu", "top_left", scale=scale)


def test_cpu_opcheck():
    for is_causal, bottom_right in CAUSAL.values():
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 17, 21, 16, 24, torch.float32, "cpu"))
        torch.library.opcheck(torch.ops.fa_inductor.flash_attention_forward.default,
                              (q, k, v, 0.25, is_causal, bottom_right))
        out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, 0.25, is_causal, bottom_right)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, 0.25,
                is_causal, bottom_right)
        torch.library.opcheck(torch.ops.fa_inductor.flash_attention_backward.default, args)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_lse_gradient(dtype, tol):
    """d(lse)/d(scores) = P: callers that differentiate through the logsumexp get exact gradients.
    fp64 takes the blockwise CPU path, fp32 the kernels (interpreted on a CPU-only machine)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in make_qkv(1, 2, 2, 17, 23, 16, 16, torch.float32, "cpu"))
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, 0.25, True, True)
    (lse.sin().sum() + out.sum()).backward()
    ours = [t.grad for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * 0.25
    keep = torch.ones(17, 23, dtype=torch.bool).tril(23 - 17)
    s = s.masked_fill(~keep, float("-inf"))
    (torch.logsumexp(s, -1).sin().sum() + (torch.softmax(s, -1) @ vd).sum()).backward()
    for g, t in zip(ours, (qd, kd, vd)):
        assert max_err(g, t.grad) <= tol


def test_no_keys_gives_zeros():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 5, 0, 16, 16, torch.float32, "cpu"))
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, 0.25, False, False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --- GPU grid ---------------------------------------------------------------------------------------------

HEAD_DIMS = [16, 40, 64, 80, 96, 128, 160, 192, 256]


@pytest.mark.parametrize("causal", list(CAUSAL))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.gpu
@requires_cuda
def test_gpu_head_dims(dtype, head_dim, causal):
    run_case(2, 3, 3, 97, 300, head_dim, head_dim, DTYPES[dtype], "cuda", causal)


@pytest.mark.parametrize("lengths", [(1, 1), (17, 17), (97, 97), (1025, 1025), (4097, 4097), (1, 4097),
                                     (1025, 97), (97, 1025), (4097, 1025)], ids=lambda ls: f"{ls[0]}x{ls[1]}")
@pytest.mark.parametrize("causal", list(CAUSAL))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.gpu
@requires_cuda
def test_gpu_lengths(lengths, causal, head_dim):
    run_case(1, 2, 2, *lengths, head_dim, head_dim, torch.bfloat16, "cuda", causal)


@pytest.mark.parametrize("layout", ["bhld", "blhd", "fused", "strided"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("causal", ["none", "top_left"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.gpu
@requires_cuda
def test_gpu_gqa_layouts(layout, heads, causal, dtype):
    run_case(2, *heads, 257, 257, 64, 64, DTYPES[dtype], "cuda", causal, layout)


@pytest.mark.parametrize("dims", [(64, 128), (128, 64), (96, 40), (256, 128)])
@pytest.mark.gpu
@requires_cuda
def test_gpu_value_head_dim(dims):
    run_case(2, 4, 2, 129, 200, *dims, torch.bfloat16, "cuda", "bottom_right")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32_follows_tf32_switch(tf32):
    q, k, v = make_qkv(1, 2, 2, 256, 256, 64, 64, torch.float32, "cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, 0.125, False, False)
        theirs = torch_math(q, k, v, scale=0.125)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ref = attention_ref(q, k, v, scale=0.125)
    assert_within_budget("out", out, theirs, ref)
    if not tf32:
        assert max_err(out, ref) < 1e-5  # IEEE fp32 products, not TF32


@pytest.mark.gpu
@requires_cuda
def test_gpu_grid_beyond_65535_heads():
    heads = 70_000
    q, k, v = (t.requires_grad_() for t in make_qkv(1, heads, heads, 16, 16, 16, 16, torch.bfloat16, "cuda"))
    out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, 0.25, True, False)
    out.sum().backward()
    sl = slice(heads - 4, heads)
    sub = [t.detach()[:, sl].double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*sub, scale=0.25, is_causal=True, upcast=False)
    ref.sum().backward()
    assert max_err(out[:, sl], ref) < 2e-2
    assert max_err(q.grad[:, sl], sub[0].grad) < 5e-2 and max_err(v.grad[:, sl], sub[2].grad) < 5e-2


@pytest.mark.gpu
@pytest.mark.gpu_memory
@requires_cuda
@pytest.mark.parametrize("is_causal", [True, False])
def test_gpu_int64_offsets(is_causal):
    """Tensors of more than 2**31 elements: offsets of the last heads overflow 32 bits."""
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs ~40 GiB of GPU memory")
    heads, length, d = 2**17 + 8, 128, 128
    assert heads * length * d > 2**31
    q, k, v = (t.requires_grad_() for t in make_qkv(1, heads, heads, length, length, d, d, torch.bfloat16, "cuda"))
    out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, d ** -0.5, is_causal, False)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    sl = slice(heads - 3, heads)
    sub = [t.detach()[:, sl].double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*sub, scale=d ** -0.5, is_causal=is_causal, upcast=False)
    ref.backward(grad[:, sl].double())
    assert max_err(out[:, sl], ref) < 2e-2
    for g, r in zip((dq, dk, dv), sub):
        assert max_err(g[:, sl], r.grad) < 5e-2


@pytest.mark.gpu
@requires_cuda
def test_gpu_opcheck():
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 130, 70, 64, 32, torch.bfloat16, "cuda"))
    for is_causal, bottom_right in CAUSAL.values():
        torch.library.opcheck(torch.ops.fa_inductor.flash_attention_forward.default,
                              (q, k, v, 0.125, is_causal, bottom_right))



# --- program order -----------------------------------------------------------------------------------------

@triton.jit
def _order_kernel(Out, n_blocks, n_bh, group, REVERSE: tl.constexpr):
    pid = tl.program_id(0)
    bh, block = tile_coords(pid, n_blocks, n_bh, group, REVERSE)
    tl.store(Out + 2 * pid, bh)
    tl.store(Out + 2 * pid + 1, block)


@pytest.mark.parametrize("n_blocks,n_bh,group,reverse", [(5, 7, 3, True), (4, 6, 1, True), (3, 8, 8, False),
                                                         (6, 5, 8, True), (1, 4, 2, False)])
def test_tile_coords_is_a_permutation_in_grouped_order(n_blocks, n_bh, group, reverse):
    """``common.tile_coords`` (the program order of every forward and backward kernel) visits each (head, block)
    once, keeps heads in groups of ``group`` (the last one partial), and within a group goes block-major: with
    ``reverse`` (causal, longest rows first) from the last block down."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((n_blocks * n_bh, 2), -1, dtype=torch.int32, device=device)
    _order_kernel[(n_blocks * n_bh,)](out, n_blocks, n_bh, group, REVERSE=reverse)
    pairs = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(pairs) == [(h, b) for h in range(n_bh) for b in range(n_blocks)]
    expected = []
    for first in range(0, n_bh, group):
        heads = range(first, min(n_bh, first + group))
        for rank in range(n_blocks):
            expected += [(h, n_blocks - 1 - rank if reverse else rank) for h in heads]
    assert pairs == expected


def test_direct_launches_ask_for_fp_fusion():
    """Triton 3.10 turns floating-point fusion off by default; a direct launch asks for it, and keeps the caller's
    arguments as they were."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    with direct_launches():
        launch(Kernel(), (3,), 1, BLOCK=2, num_warps=4)
    assert calls == [((3,), (1,), {"BLOCK": 2, "num_warps": 4, "enable_fp_fusion": True})]


def test_head_group_choice():
    assert head_group(False, 1 << 20) == 1, "without a causal mask the tiles are equal: one head at a time"
    assert head_group(True, 1 << 20) == MAX_HEAD_GROUP
    assert head_group(True, GROUP_L2_BYTES // 2) == 2
    assert head_group(True, 4 * GROUP_L2_BYTES) == 1

    class Symbolic:  # stands for a SymInt: not an int, so no length is read (and no guard added)
        pass

    assert head_group(True, Symbolic()) == 1


# --- dQ out of the one-pass backward's fp32 sum ------------------------------------------------------------

def _scale_rows_case(device, dtype, layout, n_rows=77, head_d=64):
    from fa_inductor.kernels.flash_bwd import scale_rows

    src = torch.randn(2, 3, n_rows, head_d, device=device) * 1e3
    if layout == "bmhd":  # the layout of a projection's output viewed as [B, H, M, D]
        dst = torch.full((2, n_rows, 3, head_d), float("nan"), device=device, dtype=dtype).transpose(1, 2)
    else:
        dst = torch.full(src.shape, float("nan"), device=device, dtype=dtype)
    scale = 0.3
    scale_rows(src, dst, scale)
    return dst, torch.mul(src, scale).to(dtype)


@pytest.mark.parametrize("layout", ["bhmd", "bmhd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scale_rows_matches_torch_on_every_layout(layout, dtype):
    """Every element written (the NaN fill would show a skipped row past a block), each rounded once from
    fp32 as torch rounds it.  bf16 is left to the GPU test: the interpreter truncates fp32 -> bf16."""
    dst, expected = _scale_rows_case("cpu", dtype, layout)
    assert torch.equal(dst, expected)


def test_scale_rows_rejects_what_it_cannot_write():
    from fa_inductor.kernels.flash_bwd import scale_rows

    src = torch.zeros(1, 2, 8, 64)
    for bad_src, bad_dst in [(src.half(), torch.empty_like(src)),  # not fp32
                             (src, torch.empty(1, 2, 64, 8).transpose(2, 3)),  # rows not unit-stride
                             (torch.zeros(1, 2, 8, 80), torch.empty(1, 2, 8, 80))]:  # head dim 80
        with pytest.raises(ValueError, match="scale_rows needs"):
            scale_rows(bad_src, bad_dst, 1.0)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layout", ["bhmd", "bmhd"])
def test_gpu_scale_rows_matches_torch(layout):
    for dtype in (torch.bfloat16, torch.float16):
        dst, expected = _scale_rows_case("cuda", dtype, layout, n_rows=1000)
        assert torch.equal(dst, expected)
