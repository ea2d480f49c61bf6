"""``fa_inductor.scaled_dot_product_attention``: SDPA semantics, argument errors, exact fallbacks, and the op
under torch.compile / export / CUDA graphs / the profiler."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fa_inductor
from attention_ref import attention_ref, assert_within_budget, max_err, torch_math

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])]


def rand(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_sdpa_3d_and_4d(device, is_causal):
    for shape_q, shape_kv in (((3, 17, 16), (3, 23, 16)), ((2, 3, 17, 16), (2, 3, 23, 16))):
        q, k, v = rand(*shape_q, device=device), rand(*shape_kv, device=device), rand(*shape_kv, device=device)
        out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        ref = attention_ref(q, k, v, is_causal=is_causal)
        assert out.shape == F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).shape
        assert_within_budget("out", out, torch_math(q, k, v, is_causal=is_causal), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_gqa_and_broadcast_heads(device):
    q = rand(2, 8, 19, 32, device=device)
    k, v = rand(2, 2, 21, 32, device=device), rand(2, 2, 21, 32, device=device)
    out = fa_inductor.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-4, rtol=1e-4)
    # Without enable_gqa, size-1 batch/head dims broadcast as in the math formula (stride-0 views, no copies).
    k1, v1 = rand(1, 1, 21, 32, device=device), rand(1, 1, 21, 32, device=device)
    out = fa_inductor.scaled_dot_product_attention(q, k1, v1)
    torch.testing.assert_close(out, torch_math(q, k1.expand(2, 8, 21, 32), v1.expand(2, 8, 21, 32)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_through_broadcast_and_gqa(device):
    q = rand(2, 4, 13, 16, device=device).requires_grad_()
    k = rand(1, 2, 9, 16, device=device).requires_grad_()
    v = rand(1, 2, 9, 16, device=device).requires_grad_()
    out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and max_err(g, r) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_causal_bias_objects(device):
    q, k, v = rand(1, 2, 7, 16, device=device), rand(1, 2, 12, 16, device=device), rand(1, 2, 12, 16, device=device)
    for bias, bottom_right in ((causal_upper_left(7, 12), False), (causal_lower_right(7, 12), True)):
        out = fa_inductor.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        ref = attention_ref(q, k, v, is_causal=True, bottom_right=bottom_right)
        assert max_err(out, ref) < 1e-5
    with pytest.raises(RuntimeError, match="CausalBias"):
        fa_inductor.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 12))


def test_fully_masked_rows_are_zero():
    """Bottom-right causal with more queries than keys: the first rows see no key.  The math formula with a
    boolean mask (what torch's SDPA computes) gives 0 there, never NaN."""
    q, k, v = (rand(1, 2, 9, 16).requires_grad_(), rand(1, 2, 4, 16).requires_grad_(),
               rand(1, 2, 4, 16).requires_grad_())
    out = fa_inductor.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(9, 4))
    keep = torch.ones(9, 4, dtype=torch.bool).tril(4 - 9)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(query=[1.0]), TypeError, "query"),
    (dict(key=torch.zeros(2, 5, 8, dtype=torch.float64)), RuntimeError, "same dtype"),
    (dict(key=torch.zeros(2, 5, 4)), RuntimeError, "head dim"),
    (dict(value=torch.zeros(2, 6, 8)), RuntimeError, "sequence length"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(is_causal=True, attn_mask=torch.ones(3, 5, dtype=torch.bool)), RuntimeError, "is_causal"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(key=torch.zeros(3, 5, 8), value=torch.zeros(3, 5, 8)), RuntimeError, "broadcast"),
    (dict(query=torch.zeros(1, 3, 3, 8), key=torch.zeros(1, 2, 5, 8), value=torch.zeros(1, 2, 5, 8),
          enable_gqa=True), RuntimeError, "multiple"),
])
def test_argument_errors_name_the_argument(kwargs, error, match):
    args = dict(query=torch.zeros(2, 3, 8), key=torch.zeros(2, 5, 8), value=torch.zeros(2, 5, 8))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fa_inductor.scaled_dot_product_attention(**args)


@pytest.mark.parametrize("case, reason", [
    (dict(query=rand(2, 2, 2, 3, 8), key=rand(2, 2, 2, 5, 8), value=rand(2, 2, 2, 5, 8)), "3-D or 4-D"),
])
def test_unsupported_calls_fall_back_exactly(case, reason, caplog):
    args = dict(query=rand(2, 3, 8), key=rand(2, 5, 8), value=rand(2, 5, 8))
    args.update(case)
    with caplog.at_level(logging.INFO, logger="fa_inductor"):
        torch.manual_seed(1)
        out = fa_inductor.scaled_dot_product_attention(**args)
    torch.manual_seed(1)
    assert torch.equal(out, F.scaled_dot_product_attention(**args))
    assert any(reason in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case, reason", [
    (dict(dtype=torch.float64), "float64"),
    (dict(head_dim=288), "head dim"),
])
def test_gpu_unsupported_inputs_fall_back(case, reason, caplog):
    dtype, d = case.get("dtype", torch.float16), case.get("head_dim", 64)
    q, k, v = (rand(1, 2, 33, d, device="cuda", dtype=dtype) for _ in range(3))
    with caplog.at_level(logging.INFO, logger="fa_inductor"):
        out = fa_inductor.scaled_dot_product_attention(q, k, v)
    assert any(reason in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_mixed_devices_fall_back_to_torch_and_its_error(caplog):
    q = rand(1, 2, 5, 8)
    k = torch.empty(1, 2, 5, 8, device="meta")
    with caplog.at_level(logging.INFO, logger="fa_inductor"), pytest.raises(Exception):
        fa_inductor.scaled_dot_product_attention(q, k, k)
    assert any("different devices" in r.getMessage() for r in caplog.records)


def test_blockwise_cpu_path_in_a_fresh_process():
    """Without the interpreter, CPU tensors take the exact blockwise PyTorch path (also fp64)."""
    script = textwrap.dedent("""
        import torch, fa_inductor
        from fa_inductor.kernels.op import cpu_runs_interpreter
        assert not cpu_runs_interpreter(torch.float32)
        torch.manual_seed(0)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            q, k, v = (torch.randn(2, 4, n, 24, dtype=dtype, requires_grad=True) for n in (300, 700, 700))
            out = fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True)
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True)
            assert (out.double() - ref).abs().max() < tol
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, ref_in, g.double())):
                assert (a.double() - b).abs().max() < 10 * tol
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_import_has_no_side_effects():
    script = textwrap.dedent("""
        import torch
        import fa_inductor
        assert not torch.cuda.is_initialized()
        assert hasattr(torch.ops.fa_inductor, "flash_attention_forward")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --- torch.compile, export, CUDA graphs, profiler ---------------------------------------------------------

def _attention_block(q, k, v):
    return fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True).relu()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (rand(2, 4, 67, 64, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    compiled = torch.compile(_attention_block, fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    eager = _attention_block(q, k, v)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_lengths_do_not_recompile(device):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_attention_block, dynamic=True, fullgraph=True)
    for length in (40, 77, 130):
        q, k, v = (rand(1, 2, length, 32, device=device) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), _attention_block(q, k, v), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@requires_cuda
def test_gpu_export():
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return fa_inductor.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (rand(1, 2, 64, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    exported = torch.export.export(Block(), (q, k, v))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("fa_inductor" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(q, k, v), Block()(q, k, v))


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay():
    q, k, v = (rand(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fa_inductor.scaled_dot_product_attention(q, k, v)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa_inductor.scaled_dot_product_attention(q, k, v)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.testing.assert_close(out, fa_inductor.scaled_dot_product_attention(q, k, v))


@pytest.mark.gpu
@requires_cuda
def test_gpu_compile_reduce_overhead():
    torch._dynamo.reset()
    compiled = torch.compile(_attention_block, mode="reduce-overhead")
    q, k, v = (rand(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        out = compiled(q, k, v)
    torch.testing.assert_close(out, _attention_block(q, k, v))


@pytest.mark.gpu
@requires_cuda
def test_gpu_profiler_shows_op_name():
    q, k, v = (rand(1, 2, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with torch.profiler.profile() as prof:
        fa_inductor.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    assert any("fa_inductor" in e.name for e in prof.events())


# --- the eager path (EagerAttention) -----------------------------------------------------------------------

def _op_arguments(q, k, v, bias, rng_state):
    """The forward op's 16 positional arguments: GQA, a float bias, a window, softcapping and dropout."""
    return (q, k, v, 0.3, False, False, bias, 20, 5, None, None, 4.0, 0.25 if rng_state is not None else 0.0,
            rng_state, None, 128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [False, True])
def test_eager_path_matches_the_op(device, dropout):
    """Plain eager calls run EagerAttention (the op's functions without the dispatcher): forward, LSE and every
    gradient (bias included) are bit-identical to the registered op's on the same inputs and dropout state."""
    from fa_inductor.kernels.op import EagerAttention, eager_applies
    from fa_inductor.kernels.rng import new_rng_state

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = rand(1, 4, 45, 32, device=device, dtype=dtype).requires_grad_()
    k, v = (rand(1, 2, 51, 32, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    bias = rand(1, 4, 45, 51, device=device, dtype=dtype).requires_grad_()
    rng_state = new_rng_state(q.device) if dropout else None
    assert eager_applies(q, k, v, bias, rng_state)
    weights = rand(1, 4, 45, 32, device=device, dtype=dtype), rand(1, 4, 45, device=device)
    results = []
    for call in (EagerAttention.apply, torch.ops.fa_inductor.flash_attention_forward):
        out, lse = call(*_op_arguments(q, k, v, bias, rng_state))
        loss = (out * weights[0]).float().sum() + (lse * weights[1]).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v, bias))))
    for name, eager, op in zip(("out", "lse", "dq", "dk", "dv", "dbias"), *results):
        assert torch.equal(eager, op), name
    assert results[0][2].abs().sum() > 0 and results[0][5].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_eager_path_skips_the_autograd_function_when_nothing_records_grad(device):
    """Inference calls (no_grad, inference_mode, inputs without grad) run the op's body without EagerAttention,
    with the same results; calls that autograd records, forward AD included, still go through it."""
    import torch.autograd.forward_ad as fwad

    from fa_inductor.kernels import op

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = rand(1, 4, 45, 32, device=device, dtype=dtype)
    k, v = (rand(1, 2, 51, 32, device=device, dtype=dtype) for _ in range(2))
    expected = fa_inductor.scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=True, enable_gqa=True)
    assert expected.requires_grad
    q.requires_grad_(False)
    unused = mock.patch.object(op.EagerAttention, "apply", side_effect=AssertionError("EagerAttention was used"))
    for context in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        for needs_grad in ((False,) if context is contextlib.nullcontext else (False, True)):
            with context(), unused:
                out = fa_inductor.scaled_dot_product_attention(q.detach().requires_grad_(needs_grad), k, v,
                                                               is_causal=True, enable_gqa=True)
            assert not out.requires_grad
            assert torch.equal(out, expected.detach()), (context, needs_grad)
    with mock.patch.object(op.EagerAttention, "apply", wraps=op.EagerAttention.apply) as applied:
        fa_inductor.scaled_dot_product_attention(q, k.requires_grad_(), v, enable_gqa=True)
        assert applied.call_count == 1
        k.requires_grad_(False)
        # Forward-mode AD: the Function has no jvp, so the call fails loudly instead of dropping the tangent.
        with fwad.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
            fa_inductor.scaled_dot_product_attention(fwad.make_dual(q, torch.ones_like(q)), k, v, enable_gqa=True)
        assert applied.call_count == 2


def test_eager_path_only_for_plain_eager_calls():
    """Tracers, modes, tensor subclasses and functorch transforms see the registered op, never EagerAttention."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.overrides import TorchFunctionMode

    from fa_inductor.kernels.op import eager_applies

    q = rand(1, 2, 16, 16)
    assert eager_applies(q, None)
    with FakeTensorMode() as mode:
        assert not eager_applies(mode.from_tensor(q))
    with TorchFunctionMode():
        assert not eager_applies(q)
    seen = []
    torch.func.vmap(lambda x: seen.append(eager_applies(x)) or x)(q)
    torch.jit.trace(lambda x: seen.append(eager_applies(x)) or x * 2, (q,), check_trace=False)
    assert seen == [False, False]
    graph = make_fx(lambda a: fa_inductor.scaled_dot_product_attention(a, a, a))(q)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert any("fa_inductor.flash_attention_forward" in t for t in targets), targets
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda a: fa_inductor.scaled_dot_product_attention(a, a, a), backend=capture,
                             fullgraph=True)
    torch.testing.assert_close(compiled(q), fa_inductor.scaled_dot_product_attention(q, q, q))
    assert any("flash_attention_forward" in str(n.target) for gm in graphs for n in gm.graph.nodes)


def test_eager_path_refuses_double_backward():
    q, k, v = (rand(1, 2, 16, 16).requires_grad_() for _ in range(3))
    out = fa_inductor.scaled_dot_product_attention(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(dq.sum(), (q,))


def test_static_broadcast_matches_torch():
    from fa_inductor.attention import _broadcast_shapes

    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        n = int(torch.randint(1, 4, (1,), generator=generator))
        shapes = [tuple(int(s) for s in torch.randint(0, 4, (int(torch.randint(0, 4, (1,), generator=generator)),),
                                                      generator=generator)) for _ in range(n)]
        try:
            expected = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                _broadcast_shapes(*shapes)
        else:
            assert _broadcast_shapes(*shapes) == expected, shapes
