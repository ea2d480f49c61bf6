"""The Hopper Gluon kernels (``kernels/gluon_fwd.py``, ``kernels/gluon_bwd.py``): which calls take them, their
numerics on awkward shapes, and the fallbacks that keep everything else on the Triton kernels.

The GPU cases need an sm90 device and a Triton with Gluon; they skip cleanly elsewhere.  The host-side checks
(TMA compatibility) run wherever Gluon imports.
"""

from __future__ import annotations

import pytest
import torch

import fa_inductor  # noqa: F401  (registers the ops)
from fa_inductor.attention import flash_attention
from fa_inductor.kernels import op as op_module
from fa_inductor.kernels.common import empty_output
from attention_ref import assert_within_budget, attention_ref, lse_ref, torch_math
from test_kernels import CAUSAL, make_qkv, run_case


gluon_fwd = op_module._gluon_forward_module()  # None where the op would not use it
needs_gluon = pytest.mark.skipif(gluon_fwd is None, reason="this Triton has no Gluon Hopper API")
on_hopper = pytest.mark.skipif(
    gluon_fwd is None or not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm90 GPU and Gluon")


def _counters():
    from torch._dynamo.utils import counters

    return counters["fa_inductor"]


def _captured_launches(monkeypatch, module, kernel_name: str) -> list:
    """Replace ``module.<kernel_name>`` by a stand-in whose launches record their keyword arguments (the
    constexprs a launcher chose) into the returned list, so that routing tests run on the host."""
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(module, kernel_name, Kernel())
    return launches


# --- host side ---------------------------------------------------------------------------------------------

@needs_gluon
def test_register_budgets_fit_the_register_file():
    """``gluon_fwd.REGISTERS`` under Triton's warp-group register allocation: the one-warp producer is padded to
    a warp group, the worker consumers get what is asked, the default partition (the first consumer) what is left
    of the launch budget.  Every warp group's registers must fit the 64K of an SM together (a budget that does not
    hangs in ``setmaxnreg``), and the first consumer must get at least what the others get."""
    for consumers, (consumer_regs, maxnreg) in gluon_fwd.REGISTERS.items():
        threads = 32 * 4 * (consumers + 1)  # the consumers and the padded producer warp group
        assert maxnreg % 8 == 0 and maxnreg * threads <= 64 * 1024, (consumers, maxnreg)
        # What Triton hands the default partition: the launch budget less what the workers hold, per thread.
        pool = maxnreg * 128 + (consumers - 1) * (maxnreg - consumer_regs) * 128 + (maxnreg - 24) * 128
        default_regs = pool // 128 // 8 * 8
        assert default_regs >= consumer_regs, (consumers, default_regs)
        total = 128 * (default_regs + (consumers - 1) * consumer_regs + 24)
        assert total <= 64 * 1024, (consumers, total)


@needs_gluon
def test_tma_store_staging_fits_shared_memory():
    """At ``TMA_STORE_HEAD_DIMS`` the O staging buffers sit next to Q's buffers and the K / V ring: all of it must
    fit an H100's 227 KB of shared memory per block (a kernel that asks for more fails to launch)."""
    limit = 227 * 1024
    for head_d in gluon_fwd.HEAD_DIMS:
        consumers = gluon_fwd.CONSUMERS.get(head_d, 2)
        tiles = 2 * consumers * gluon_fwd.ROWS_PER_CONSUMER * head_d * 2  # Q buffers and O staging, 16-bit
        ring = 2 * 2 * gluon_fwd.BLOCK_N[head_d] * head_d * 2  # K and V, two stages
        fits = tiles + ring + 1024 <= limit  # with room for the mbarriers
        assert fits or head_d not in gluon_fwd.TMA_STORE_HEAD_DIMS, head_d
    assert 128 in gluon_fwd.TMA_STORE_HEAD_DIMS


@needs_gluon
@pytest.mark.parametrize("head_d,causal,n_keys,pingpong", [
    (64, True, 2048, True), (64, True, 4096, True), (64, True, 4104, False), (64, False, 2048, False),
    (128, True, 2048, False), (256, True, 2048, False)])
def test_forward_takes_turns_only_where_it_was_measured_faster(head_d, causal, n_keys, pingpong, monkeypatch):
    """The launcher's default ``pingpong`` (consumers issuing MMAs in turns): causal calls within
    ``PINGPONG_CAUSAL_MAX_KEYS`` only, the measured range (``benchmarks/reference``, "fourteenth pass").  The
    launch is captured on the host, so this runs without a GPU."""
    launches = _captured_launches(monkeypatch, gluon_fwd, "_gluon_fwd_kernel")
    monkeypatch.setattr(gluon_fwd, "sm_count", lambda device: 132)
    q = torch.empty(2, 8, 1024, head_d, dtype=torch.bfloat16)
    k = torch.empty(2, 8, n_keys, head_d, dtype=torch.bfloat16)
    gluon_fwd.gluon_forward(q, k, k, torch.empty_like(q), torch.empty(2, 8, 1024), 0.125, 0 if causal else -1,
                            n_keys - 1024)
    assert len(launches) == 1 and launches[0]["PINGPONG"] is pingpong
    assert launches[0]["HAS_RIGHT"] is causal


@needs_gluon
def test_tma_compatible_layouts():
    x = torch.empty(2, 64, 4, 128, dtype=torch.bfloat16)
    assert gluon_fwd.tma_compatible(x.transpose(1, 2))  # [B, L, H, D] memory read as [B, H, L, D]
    assert gluon_fwd.tma_compatible(torch.empty(2, 4, 64, 128, dtype=torch.float16))
    # Length-1 dims may carry any stride.
    assert gluon_fwd.tma_compatible(torch.empty(1, 1, 64, 64, dtype=torch.bfloat16).as_strided(
        (1, 1, 64, 64), (3, 5, 64, 1)))
    assert not gluon_fwd.tma_compatible(torch.empty(2, 4, 64, 128, dtype=torch.float32))  # 16-bit only
    assert not gluon_fwd.tma_compatible(torch.empty(2, 4, 64, 256, dtype=torch.bfloat16)[..., ::2])
    assert not gluon_fwd.tma_compatible(torch.empty(2, 4, 64, 68, dtype=torch.bfloat16)[..., :64])  # rows 136 B apart
    assert not gluon_fwd.tma_compatible(torch.empty(2 * 4 * 64 * 64 + 1, dtype=torch.bfloat16)[1:].view(
        2, 4, 64, 64))  # base 2 bytes past an aligned address
    assert not gluon_fwd.tma_compatible(torch.empty(1, 1, 64, 64, dtype=torch.bfloat16).expand(2, 4, 64, 64))


ROUTES = [
    # head dim, causal, forward on Gluon, backward through the Hopper op (Gluon passes)
    (64, False, True, True),  # one pass (one key head per query head)
    (64, True, True, True),
    (128, False, True, True),
    (128, True, True, True),
    (256, False, True, True),  # the role-split dK/dV kernel
    (256, True, True, True),
    (96, False, False, False),
    (32, True, False, False),
]


@needs_gluon
@pytest.mark.parametrize("head_d,causal,forward,backward", ROUTES)
def test_routing_by_head_dim_and_features(head_d, causal, forward, backward, monkeypatch):
    """Which passes take the Gluon kernels on an sm90 device: decided from dtypes, static head dims and the mask
    alone, so fake CUDA tensors and ``FA_INDUCTOR_ARCH=sm90`` check it without a GPU.  fp32, a bias, a left
    window, dropout or the env switch keep every head dim on Triton."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fa_inductor.kernels.masking import MaskSpec

    monkeypatch.setenv("FA_INDUCTOR_ARCH", "sm90")
    monkeypatch.delenv(op_module.GLUON_ENV, raising=False)

    def make(dtype):
        with FakeTensorMode():
            return [torch.empty(1, 4, 256, head_d, device="cuda", dtype=dtype) for _ in range(3)]

    q, k, v = make(torch.bfloat16)
    right = 0 if causal else -1
    spec = MaskSpec(right=right)
    assert op_module.gluon_applies(q, k, v, head_d ** -0.5, spec) == forward
    assert op_module.gluon_backward_applies(q, k, v, head_d ** -0.5, spec) == backward
    q16, k16, v16 = make(torch.float16)
    assert op_module.gluon_applies(q16, k16, v16, head_d ** -0.5, spec) == forward
    assert op_module.gluon_backward_applies(q16, k16, v16, head_d ** -0.5, spec) == backward
    q32, k32, v32 = make(torch.float32)
    off = [(q32, k32, v32, spec), (q, k, v, MaskSpec(right=right, left=8)),
           (q, k, v, MaskSpec(right=right, dropout_p=0.1)), (q, k, v, MaskSpec(right=right, softcap=5.0))]
    for args in off:
        assert not op_module.gluon_applies(*args[:3], head_d ** -0.5, args[3])
        assert not op_module.gluon_backward_applies(*args[:3], head_d ** -0.5, args[3])
    monkeypatch.setenv(op_module.GLUON_ENV, "0")
    assert not op_module.gluon_applies(q, k, v, head_d ** -0.5, spec)
    assert not op_module.gluon_backward_applies(q, k, v, head_d ** -0.5, spec)


@needs_gluon
def test_one_pass_backward_refuses_head_dims_it_is_not_built_for():
    """The one-pass kernel holds a tile's dQ as two 32-column halves, i.e. head dim 64 only: another head dim is
    a clear error before anything launches (the op never routes one there)."""
    from fa_inductor.kernels.gluon_bwd import ONE_PASS_HEAD_DIMS, gluon_backward_one_pass

    assert ONE_PASS_HEAD_DIMS == (64,) and set(op_module.ONE_PASS_HEAD_DIMS) <= set(ONE_PASS_HEAD_DIMS)
    q = torch.empty(1, 2, 64, 128, dtype=torch.bfloat16)
    stats = torch.empty(1, 2, 64)
    with pytest.raises(ValueError, match="head dims"):
        gluon_backward_one_pass(q, q, q, q, stats, stats, q, q, q.float(), 0.1, -1, 0)


@needs_gluon
@pytest.mark.parametrize("right,shared", [(-1, False), (0, True), (40, True)])
def test_one_pass_consumers_share_ds_only_under_a_causal_mask(right, shared, monkeypatch):
    """The one-pass launcher's default ``shared_dq``: the consumers share their dS^T tiles (one dQ reduction per
    query tile and program) under a causal or right-bounded mask only, where it measured faster
    (``benchmarks/reference``, "fifteenth pass").  The launch is captured on the host, so this runs without a
    GPU."""
    from fa_inductor.kernels import gluon_bwd

    launches = _captured_launches(monkeypatch, gluon_bwd, "_gluon_bwd_one_pass_kernel")
    q = torch.empty(1, 4, 256, 64, dtype=torch.bfloat16)
    k = torch.empty(1, 2, 256, 64, dtype=torch.bfloat16)
    stats = torch.empty(1, 4, 256)
    gluon_bwd.gluon_backward_one_pass(q, k, k, q, stats, stats, k, k, q.float(), 0.125, right, 0)
    assert len(launches) == 1 and launches[0]["SHARED_DQ"] is shared
    assert launches[0]["HAS_RIGHT"] is (right >= 0)
    monkeypatch.setattr(gluon_bwd, "ONE_PASS_SHARED_DQ_CAUSAL", False)
    gluon_bwd.gluon_backward_one_pass(q, k, k, q, stats, stats, k, k, q.float(), 0.125, right, 0)
    assert launches[1]["SHARED_DQ"] is False


@needs_gluon
@pytest.mark.parametrize("grouped_one_pass", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_heads_route_the_head_dim_64_backward(causal, grouped_one_pass, monkeypatch):
    """At head dim 64 grouped query heads take the one-pass backward as well (``ONE_PASS_GROUPED``, the shipped
    choice).  With that switched off they keep the two passes: a causal call Triton dK/dV + Gluon dQ, a call
    without a mask the Triton backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fa_inductor.kernels.masking import MaskSpec

    monkeypatch.setenv("FA_INDUCTOR_ARCH", "sm90")
    monkeypatch.delenv(op_module.GLUON_ENV, raising=False)
    with FakeTensorMode():
        q = torch.empty(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.empty(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    spec = MaskSpec(right=0 if causal else -1)
    monkeypatch.setattr(op_module, "ONE_PASS_GROUPED", grouped_one_pass)
    assert op_module.gluon_backward_applies(q, k, v, 0.125, spec) == (causal or grouped_one_pass)
    assert op_module._one_pass_shape(64, 8, 8) and op_module._one_pass_shape(64, 8, 2) == grouped_one_pass
    assert not op_module._one_pass_shape(128, 8, 8) and not op_module._one_pass_shape(128, 8, 2)


# --- GPU: numerics -----------------------------------------------------------------------------------------

SHAPES = [
    # batch, heads, kv_heads, M, N, causal, bottom_right, layout
    (2, 4, 4, 256, 256, False, False, "bhld"),
    (2, 4, 4, 1000, 1000, True, False, "bhld"),
    (1, 8, 2, 333, 777, False, False, "blhd"),
    (1, 8, 2, 300, 777, True, True, "blhd"),
    (2, 3, 1, 129, 65, False, False, "bhld"),
    (1, 2, 2, 700, 600, True, False, "bhld"),  # more queries than keys, top-left: the last rows see every key
    (1, 2, 2, 600, 520, True, True, "blhd"),  # bottom-right with M > N: the first 80 rows see nothing
    (1, 2, 2, 64, 4096, True, True, "blhd"),
    (2, 4, 4, 384, 384, True, False, "fused"),
    # More tiles than an H100 has SMs: the routed causal forward at head dims 64 and 128 runs its persistent grid,
    # programs claiming tiles of different lengths from the counter; so does the non-causal one at head dim 64.
    (4, 16, 4, 1000, 1000, True, False, "blhd"),
    (4, 16, 4, 1000, 1000, False, False, "bhld"),
]


@pytest.mark.parametrize("head_d", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}-{s[7]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_matches_reference(shape, head_d, dtype):
    batch, heads, kv_heads, m, n, causal, bottom_right, layout = shape
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, dtype, "cuda", layout)
    scale = head_d ** -0.5
    before = _counters()["gluon_forward"]
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, causal, bottom_right)
    assert _counters()["gluon_forward"] == before + 1, "the call did not take the Gluon kernel"
    ref = attention_ref(q, k, v, scale, causal, bottom_right)
    theirs = torch_math(q, k, v, scale, causal, bottom_right)
    assert_within_budget("out", out, theirs, ref, depth=n)
    ref_lse = lse_ref(q, k, v, scale, causal, bottom_right).to(lse.device)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)
    if not finite.all():
        assert (out[~finite] == 0).all(), "rows that see no key must give 0"


@pytest.mark.parametrize("head_d,consumers,block_n,late", [
    (64, 2, 128, False), (64, 3, 128, False), (128, 2, 128, False), (128, 3, 64, False), (256, 2, 64, False),
    (64, 2, 128, True), (128, 2, 128, True), (256, 2, 64, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}-{s[7]}")
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_kernel_tilings(shape, head_d, consumers, block_n, late):
    """The forward kernel called directly with two and three consumer warp groups (128 / 192 query rows a
    program) and with either consumer loop (``late``: P's bf16 copy and row sums and O's rescaling one iteration
    later), whichever the op routes to: output and LSE within budget of fp64 on every shape of the routed test
    (tails of both tile sizes, GQA, both causal alignments, rows that see no key)."""
    batch, heads, kv_heads, m, n, causal, bottom_right, layout = shape
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, torch.bfloat16, "cuda", layout)
    scale = head_d ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    shift = n - m if (causal and bottom_right) else 0
    gluon_fwd.gluon_forward(q, k, v, out, lse, scale, 0 if causal else -1, shift, block_n=block_n,
                            consumers=consumers, late=late)
    ref = attention_ref(q, k, v, scale, causal, bottom_right)
    assert_within_budget("out", out, torch_math(q, k, v, scale, causal, bottom_right), ref, depth=n)
    ref_lse = lse_ref(q, k, v, scale, causal, bottom_right).to(lse.device)
    finite = torch.isfinite(ref_lse)
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_d,consumers,late", [(64, 3, False), (128, 2, True), (128, 2, False), (256, 2, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}-{s[7]}")
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_persistent_and_grouped(shape, head_d, consumers, late):
    """The forward's tile schedules: a persistent grid of 5 programs (so every program runs several tiles, its
    K / V ring and Q buffer carried across them, with tiles of different lengths under a causal mask) taking
    every fifth tile or claiming tiles from the counter, and a program per tile with heads interleaved 3 at a
    time (a partial last group on most shapes)."""
    batch, heads, kv_heads, m, n, causal, bottom_right, layout = shape
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, torch.bfloat16, "cuda", layout)
    scale = head_d ** -0.5
    shift = n - m if (causal and bottom_right) else 0
    ref = attention_ref(q, k, v, scale, causal, bottom_right)
    theirs = torch_math(q, k, v, scale, causal, bottom_right)
    ref_lse = lse_ref(q, k, v, scale, causal, bottom_right).to(q.device)
    finite = torch.isfinite(ref_lse)
    for schedule in (dict(persistent=True, programs=5, dynamic=False), dict(persistent=True, programs=5, dynamic=True),
                     dict(persistent=False, group_heads=3)):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), device="cuda")
        gluon_fwd.gluon_forward(q, k, v, out, lse, scale, 0 if causal else -1, shift, consumers=consumers,
                                late=late, **schedule)
        assert_within_budget(f"out {schedule}", out, theirs, ref, depth=n)
        assert (lse[~finite] == float("-inf")).all()
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("head_d,consumers,late", [(64, 3, False), (64, 2, False), (128, 2, True), (128, 2, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}-{s[7]}")
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_tma_store_matches_register_stores(shape, head_d, consumers, late):
    """O written through shared memory and TMA stores (``tma_store``, routed at ``TMA_STORE_HEAD_DIMS``) is
    bit-identical to O stored from registers, in every schedule: tails past the last row, the causal partial
    first tile (rows below 0 store from registers, the rest of the tile through TMA), several tiles a program.
    An output TMA cannot write (a misaligned base) takes the register stores."""
    batch, heads, kv_heads, m, n, causal, bottom_right, layout = shape
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, torch.bfloat16, "cuda", layout)
    scale = head_d ** -0.5
    shift = n - m if (causal and bottom_right) else 0
    for schedule in (dict(persistent=False), dict(persistent=True, programs=5)):
        results = []
        for tma_store in (False, True):
            out = empty_output(q, v).fill_(float("nan"))
            lse = torch.full(q.shape[:3], float("nan"), device="cuda")
            gluon_fwd.gluon_forward(q, k, v, out, lse, scale, 0 if causal else -1, shift, consumers=consumers,
                                    late=late, tma_store=tma_store, **schedule)
            results.append((out, lse))
        (out_r, lse_r), (out_t, lse_t) = results
        assert not out_r.isnan().any()
        assert torch.equal(out_t, out_r) and torch.equal(lse_t, lse_r), schedule
    # An output view whose base is 2 bytes past a 16-byte boundary: not tma_compatible, stored from registers.
    storage = torch.full((out_r.numel() + 1,), float("nan"), device="cuda", dtype=out_r.dtype)
    shifted = storage[1:].view(out_r.shape)
    assert not gluon_fwd.tma_compatible(shifted)
    gluon_fwd.gluon_forward(q, k, v, shifted, torch.empty_like(lse_r), scale, 0 if causal else -1, shift,
                            consumers=consumers, late=late, tma_store=True)
    assert torch.equal(shifted, out_r.contiguous())


@pytest.mark.parametrize("head_d,consumers,late", [(64, 3, False), (64, 2, False), (128, 2, True), (128, 2, False),
                                                   (256, 2, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}-{s[7]}")
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_pingpong_matches_free_issue(shape, head_d, consumers, late):
    """Consumers that issue their MMAs in turns (``pingpong``) compute exactly what free-running ones do: the
    turns only order the issues.  Bit-identical in every schedule, including those where the warp groups of a
    tile stream different numbers of key blocks (a causal mask, rows past the last or below 0), which must still
    take as many turns as the others or the ring of turns would stall."""
    batch, heads, kv_heads, m, n, causal, bottom_right, layout = shape
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, torch.bfloat16, "cuda", layout)
    scale = head_d ** -0.5
    shift = n - m if (causal and bottom_right) else 0
    for schedule in (dict(persistent=False), dict(persistent=True, programs=5, dynamic=False),
                     dict(persistent=True, programs=5, dynamic=True)):
        results = []
        for pingpong in (False, True):
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:3], float("nan"), device="cuda")
            gluon_fwd.gluon_forward(q, k, v, out, lse, scale, 0 if causal else -1, shift, consumers=consumers,
                                    late=late, pingpong=pingpong, **schedule)
            results.append((out, lse))
        (out_f, lse_f), (out_p, lse_p) = results
        assert not out_f.isnan().any() and not lse_f.isnan().any()
        assert torch.equal(out_p, out_f) and torch.equal(lse_p, lse_f), schedule
    ref = attention_ref(q, k, v, scale, causal, bottom_right)
    assert_within_budget("out", out_p, torch_math(q, k, v, scale, causal, bottom_right), ref, depth=n)


BACKWARD_SHAPES = [
    # batch, heads, kv_heads, M, N, causal, layout
    (2, 4, 4, 256, 256, "none", "bhld"),
    (2, 4, 4, 1000, 1000, "top_left", "bhld"),
    (1, 8, 2, 333, 777, "none", "blhd"),
    (1, 8, 2, 300, 777, "bottom_right", "blhd"),
    (2, 3, 1, 129, 65, "none", "bhld"),
    (1, 2, 2, 700, 600, "top_left", "bhld"),
    (1, 2, 2, 600, 520, "bottom_right", "blhd"),
    (1, 2, 2, 64, 1100, "top_left", "bhld"),  # keys past the last query: no query block sees them
    (2, 4, 4, 384, 384, "top_left", "fused"),
]


@pytest.mark.parametrize("head_d", [64, 128, 256])
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}-{s[6]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_backward_matches_reference(shape, head_d, dtype):
    """Forward and backward against fp64 (``run_case``: out, LSE, dq, dk, dv within budget).  The forward runs
    the Gluon kernel at its head dims (``gluon_fwd.HEAD_DIMS``), else Triton; the backward runs Gluon passes at
    the head dims listed for it (both passes, or with a causal mask the dQ pass after the Triton dK/dV pass), else
    Triton.  Head dim 256 takes the dK/dV kernel that splits its warp groups by role."""
    assert shape[5] in CAUSAL
    before = (_counters()["gluon_forward"], _counters()["gluon_backward"])
    before_one_pass = _counters()["gluon_backward_one_pass"]
    run_case(*shape[:5], head_d, head_d, dtype, "cuda", shape[5], shape[6])
    gluon_forward = head_d in gluon_fwd.HEAD_DIMS
    one_pass = head_d in op_module.ONE_PASS_HEAD_DIMS and (shape[1] == shape[2] or op_module.ONE_PASS_GROUPED)
    gluon_backward = head_d in op_module.GLUON_BACKWARD_HEAD_DIMS or one_pass or (
        head_d in op_module.GLUON_DQ_CAUSAL_HEAD_DIMS and shape[5] != "none")
    assert (_counters()["gluon_forward"], _counters()["gluon_backward"]) == (before[0] + gluon_forward,
                                                                             before[1] + gluon_backward)
    assert _counters()["gluon_backward_one_pass"] == before_one_pass + one_pass


def _assert_gradients_within_budget(grads, q, k, v, grad, scale, causal, bottom_right):
    """dq, dk, dv against fp64 attention, within the budget that PyTorch's math attention in the inputs'
    precision sets on the same inputs."""
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    math_in = [t.detach().requires_grad_() for t in (q, k, v)]
    attention_ref(*ref_in, scale, causal, bottom_right, upcast=False).backward(grad.double())
    torch_math(*math_in, scale, causal, bottom_right).backward(grad)
    for name, g, r, t in zip("qkv", grads, ref_in, math_in):
        assert_within_budget(f"d{name}", g, t.grad, r.grad, depth=q.shape[-1])


@pytest.mark.parametrize("head_d,block_keys,dq_consumers", [(64, 64, 2), (64, 128, 2), (64, 64, 3), (128, 64, 2),
                                                           (128, 128, 2), (256, 32, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_backward_kernels_at_every_head_dim(head_d, causal, block_keys, dq_consumers):
    """The Gluon dK/dV and dQ kernels called directly, including head dims, dQ key blocks and dQ consumer counts
    the op does not route to (at head dim 256 only 32-key dQ blocks fit): gradients within budget of fp64 on a
    GQA shape with tails."""
    from fa_inductor.kernels.configs import INTERPRETER_CONFIG
    from fa_inductor.kernels.flash_bwd import flash_backward
    from fa_inductor.kernels.gluon_bwd import gluon_backward_kv, gluon_backward_q
    from fa_inductor.kernels.masking import MaskSpec

    q, k, v = make_qkv(1, 8, 2, 333, 777, head_d, head_d, torch.bfloat16, "cuda", "blhd")
    scale = head_d ** -0.5
    shift = 777 - 333 if causal else 0
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, causal, causal)
    grad = torch.randn_like(out)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    right = 0 if causal else -1

    def kv_pass(lse_units, delta):
        gluon_backward_kv(q, k, v, grad, lse_units, delta, grads[1], grads[2], scale, right, shift)

    def q_pass(lse_units, delta):
        gluon_backward_q(q, k, v, grad, lse_units, delta, grads[0], scale, right, shift, block_keys=block_keys,
                         consumers=dq_consumers)

    spec = MaskSpec(right=right, bottom_right=causal)
    flash_backward(grad, q, k, v, out, lse, None, *grads, None, scale, spec, INTERPRETER_CONFIG, INTERPRETER_CONFIG,
                   {"DOT_PRECISION": "ieee", "SOFT_BF16": False}, kv_pass=kv_pass, q_pass=q_pass)
    _assert_gradients_within_budget(grads, q, k, v, grad, scale, causal, causal)


@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_backward_through_compile():
    """Training through the backend: the forward graph calls the Gluon op, gradients match the reference."""
    torch._dynamo.reset()

    def block(q, k, v):
        return fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2.0

    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 300, 300, 128, 128, torch.bfloat16, "cuda", "blhd"))
    before = _counters()["gluon_forward"]
    out = torch.compile(block, fullgraph=True)(q, k, v)
    assert _counters()["gluon_forward"] > before
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, None, True) * 2.0
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double().cpu(), ref.detach().cpu(), atol=3e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=0.15, rtol=5e-2)


@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_forward_cuda_graph_replay():
    q, k, v = make_qkv(2, 4, 4, 257, 257, 64, 64, torch.bfloat16, "cuda", "bhld")
    fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.testing.assert_close(out, fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- GPU: what stays on the Triton kernel ------------------------------------------------------------------

@pytest.mark.gpu
@on_hopper
def test_gpu_misaligned_operands_fall_back_exactly():
    """A base 2 bytes off a 16-byte boundary cannot be read by TMA: forward and backward run the Triton kernels
    instead, and say so in the counters."""
    m, d = 200, 128
    flat = torch.randn(2 * 4 * m * d + 1, device="cuda", dtype=torch.bfloat16)
    q = flat[1:].view(2, 4, m, d).requires_grad_()
    k, v = (torch.randn(2, 4, m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    counters = _counters()
    names = ("gluon_forward", "gluon_forward_fallback", "gluon_backward", "gluon_backward_fallback")
    before = [counters[name] for name in names]
    out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, d ** -0.5, True, False)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert [counters[name] - b for name, b in zip(names, before)] == [0, 1, 0, 1]
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    math_in = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_in, d ** -0.5, True, upcast=False)
    theirs = torch_math(*math_in, d ** -0.5, True)
    assert_within_budget("out", out, theirs, ref, depth=d)
    ref.backward(grad.double())
    theirs.backward(grad)
    for name, g, r, t in zip("qkv", grads, ref_in, math_in):
        assert_within_budget(f"d{name}", g, t.grad, r.grad, depth=d)


@pytest.mark.parametrize("case", ["fp32", "head_dim_96", "bias", "window_left", "env_off"])
@pytest.mark.gpu
@on_hopper
def test_gpu_unsupported_calls_skip_gluon(case, monkeypatch):
    d = 96 if case == "head_dim_96" else 64
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    q, k, v = make_qkv(1, 2, 2, 256, 256, d, d, dtype, "cuda", "bhld")
    kwargs = {}
    if case == "bias":
        kwargs["attn_bias"] = torch.randn(1, 1, 256, 256, device="cuda", dtype=dtype)
    if case == "window_left":
        kwargs["window_left"] = 32
    if case == "env_off":
        monkeypatch.setenv(op_module.GLUON_ENV, "0")
    before = _counters()["gluon_forward"] + _counters()["gluon_forward_fallback"]
    out, _ = torch.ops.fa_inductor.flash_attention_forward(q, k, v, d ** -0.5, False, False, **kwargs)
    assert _counters()["gluon_forward"] + _counters()["gluon_forward_fallback"] == before
    window = (32, -1) if case == "window_left" else (-1, -1)
    ref = attention_ref(q, k, v, d ** -0.5, bias=kwargs.get("attn_bias"), window=window)
    theirs = torch_math(q, k, v, d ** -0.5, bias=kwargs.get("attn_bias"), window=window)
    assert_within_budget("out", out, theirs, ref, depth=256)


@pytest.mark.parametrize("head_d", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
def test_gpu_opcheck_hopper_ops(head_d):
    """Schema, fake (meta) implementation and real outputs of the two opaque Hopper ops agree (causal: at head
    dim 64 the backward op runs the Triton dK/dV pass and the Gluon dQ pass)."""
    q, k, v = make_qkv(1, 4, 2, 200, 300, head_d, head_d, torch.bfloat16, "cuda", "blhd")
    torch.library.opcheck(torch.ops.fa_inductor.hopper_attention_forward.default, (q, k, v, 0.125, 0, True))
    out, lse = torch.ops.fa_inductor.hopper_attention_forward(q, k, v, 0.125, 0, True)
    args = (torch.randn_like(out), q, k, v, out, lse, None, 0.125, 0, True)
    torch.library.opcheck(torch.ops.fa_inductor.hopper_attention_backward.default, args)


@pytest.mark.parametrize("shape", [(1, 8, 2, 333, 777, "none"), (1, 8, 2, 300, 777, "bottom_right"),
                                   (2, 4, 4, 1000, 1000, "top_left"), (1, 2, 2, 64, 1100, "top_left"),
                                   (2, 3, 1, 129, 65, "none")],
                         ids=lambda s: "x".join(map(str, s[:5])) + f"-{s[5]}")
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("extreme", [False, True], ids=["randn", "extreme"])
@pytest.mark.parametrize("shared_dq", [True, False], ids=["shared_ds", "private_ds"])
@pytest.mark.gpu
@on_hopper
def test_gpu_gluon_one_pass_backward(shape, stages, extreme, shared_dq):
    """The one-pass kernel (dK/dV and dQ by TMA reductions into fp32) at head dim 64: gradients within budget of
    fp64 on GQA shapes with query and key tails, causal masks of both alignments and keys no query sees.
    ``extreme``: every score near -200 (nats), so the zero-filled keys past N would give exp2(-LSE) = inf
    (and NaN in dQ) without the key mask.  ``shared_dq``: both ways of computing dQ, with and without a mask
    (the op shares dS^T between the consumers under a causal mask only)."""
    from fa_inductor.kernels.masking import MaskSpec

    batch, heads, kv_heads, m, n, causal = shape
    head_d = 64
    q, k, v = make_qkv(batch, heads, kv_heads, m, n, head_d, head_d, torch.bfloat16, "cuda", "blhd")
    if extreme:
        q, k = (q * 0.1 + 5).to(q.dtype), (k * 0.1 - 5).to(k.dtype)
    scale = head_d ** -0.5
    bottom_right = causal == "bottom_right"
    is_causal = causal != "none"
    out, lse = torch.ops.fa_inductor.flash_attention_forward(q, k, v, scale, is_causal, bottom_right)
    grad = torch.randn_like(out)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    right = 0 if is_causal else -1
    spec = MaskSpec(right=right, bottom_right=bottom_right)
    # What the Hopper op runs (preprocess, the kernel into a zeroed fp32 buffer, dQ scaled), at this ring depth.
    op_module._one_pass_backward(grad, q, k, v, out, lse, None, *grads, scale, spec, right, bottom_right,
                                 stages=stages, shared_dq=shared_dq)
    _assert_gradients_within_budget(grads, q, k, v, grad, scale, is_causal, bottom_right)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [(-1, 40), (-1, 0)], ids=["right_40", "right_0"])
@pytest.mark.gpu
@on_hopper
def test_gpu_one_pass_backward_under_right_bounded_windows(heads, kv_heads, window):
    """A window bounded on the right only (key j visible to row i iff j <= i + right) is a Hopper call; at head
    dim 64 its backward is the one pass, with one key head per query head and with grouped ones
    (``ONE_PASS_GROUPED``).  Output, LSE and gradients within the fp64-referenced budget (``run_masked``)."""
    from test_masks import run_masked

    before = _counters()["gluon_backward_one_pass"]
    run_masked("cuda", torch.bfloat16, 2, heads, kv_heads, 300, 333, 64, window=window)
    assert _counters()["gluon_backward_one_pass"] == before + 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
@on_hopper
def test_gpu_deterministic_algorithms_keep_two_passes(causal):
    """Under ``torch.use_deterministic_algorithms`` a head-dim-64 backward with one key head per query head runs
    the two-pass route (dQ not summed by reductions in varying order): the same gradients, bit for bit, in two
    runs, and the one-pass counter unchanged; without it the one-pass kernel runs and agrees within budget."""
    q, k, v = make_qkv(2, 4, 4, 333, 333, 64, 64, torch.bfloat16, "cuda", "bhld")
    grad = torch.randn_like(q)

    def gradients():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*inputs, 0.125, causal, False, False)
        return torch.autograd.grad(out, inputs, grad)

    before = _counters()["gluon_backward_one_pass"]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = gradients(), gradients()
    finally:
        torch.use_deterministic_algorithms(False)
    assert _counters()["gluon_backward_one_pass"] == before
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    one_pass = gradients()
    assert _counters()["gluon_backward_one_pass"] == before + 1
    _assert_gradients_within_budget(one_pass, q, k, v, grad, 0.125, causal, False)
