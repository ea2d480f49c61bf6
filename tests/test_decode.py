"""The split-KV decode path (``kernels/flash_decode.py``): up to 16 queries against many keys, grouped query
heads packed into one tile, keys split across programs and combined.  Forward against the fp64 reference
within the error budget (the backward of a decode step is the FA2 backward, checked too), through
``test_masks.run_masked``; every case here takes the decode path (asserted)."""

from __future__ import annotations

import pytest
import torch

from fa_inductor.kernels import flash_decode
from fa_inductor.kernels.op import mask_spec
from test_masks import requires_cuda, run_masked

# (batch, heads, kv_heads, M, N, D): GQA 4:1 and 2:1, one query and several, N not a multiple of the key blocks
CPU_SHAPES = [(2, 4, 1, 1, 150, 16), (2, 2, 2, 16, 200, 16)]
CASES = {
    "plain": dict(),
    "causal_bottom_right": dict(is_causal=True, bottom_right=True),
    "causal_top_left": dict(is_causal=True),  # queries 0..M-1 see keys 0..i only
    "window_bottom_right": dict(is_causal=True, bottom_right=True, window=(40, -1)),
    "window_both_sides": dict(window=(30, 20), bottom_right=True),
    "bool_mask": dict(bias_shape="full", bias_kind="bool"),
    "padding_finfo_min": dict(bias_shape="row", bias_kind="finfo_min"),  # fully masked rows: uniform, as eager
    "float_bias": dict(bias_shape="full", bias_kind="float"),
    "softcap_causal": dict(softcap=2.0, is_causal=True, bottom_right=True),
}


def _resolve(shape, case):
    batch, heads, _, m, n, _ = shape
    kwargs = dict(case)
    if kwargs.get("bias_shape") == "full":
        kwargs["bias_shape"] = (batch, heads, m, n)
    elif kwargs.get("bias_shape") == "row":
        kwargs["bias_shape"] = (batch, 1, m, n)
    return kwargs


def _assert_decode_path(shape, device):
    batch, heads, kv_heads, m, n, d = shape
    q = torch.empty(batch, heads, m, d, device=device)
    k = torch.empty(batch, kv_heads, n, d, device=device)
    spec = mask_spec(q, k, False, False, None, -1, -1, None, None, 0.0, 0.0, None, None, 128)
    assert flash_decode.eligible(q, k, spec)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_cpu_interpreter(shape, name):
    _assert_decode_path(shape, "cpu")
    run_masked("cpu", torch.float32, *shape, **_resolve(shape, CASES[name]))


GPU_SHAPES = [(2, 32, 8, 1, 4099, 64), (1, 32, 8, 16, 1000, 128), (3, 8, 1, 5, 777, 80), (2, 12, 4, 2, 333, 96)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_gpu(shape, name, dtype):
    _assert_decode_path(shape, "cuda")
    run_masked("cuda", dtype, *shape, **_resolve(shape, CASES[name]))


def test_not_eligible_beyond_limits():
    q = torch.empty(1, 8, 17, 16)
    k = torch.empty(1, 2, 100, 16)
    spec = mask_spec(q, k, False, False, None, -1, -1, None, None, 0.0, 0.0, None, None, 128)
    assert not flash_decode.eligible(q, k, spec)  # 17 queries
    q = torch.empty(1, 64, 2, 16)
    k = torch.empty(1, 1, 100, 16)
    assert not flash_decode.eligible(q, k, spec)  # 64 x 2 rows do not fit one tile
    q = torch.empty(1, 8, 2, 16)
    with_lengths = mask_spec(q, k, False, False, None, -1, -1, None, torch.tensor([50]), 0.0, 0.0, None, None, 128)
    assert not flash_decode.eligible(q, k, with_lengths)
