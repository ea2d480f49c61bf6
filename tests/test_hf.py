"""Hugging Face models built from tiny random configs (no download): attention sites replaced in compiled
graphs, numerics against eager in inference and training.

Each test runs on the CPU in fp32 (compared with eager to 1e-4) and, with a GPU, in bf16 on CUDA (marker
``gpu``), where the compiled model's error against an fp32 copy of the model must stay within 3x the error of
eager bf16 plus a small slack (the non-attention layers run the same kernels in both).  The reference is fp32,
not fp64: eager fp64 turns the rows that padding masks out completely into NaN (finfo(fp64).min overflows in
its softmax), and fp32 is 2^16 times finer than bf16.  Generation compares
tokens in fp32 on both devices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fa_inductor
from fa_inductor.config import Settings
from fa_inductor.patterns.rewrite import rewrite_attention

transformers = pytest.importorskip("transformers")

LAYERS = 2
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SETUPS = [pytest.param(("cpu", torch.float32), id="cpu-fp32"),
          pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=[pytest.mark.gpu, requires_cuda])]
FP32_SETUPS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda])]


def _to(setup, model, *tensors):
    device, dtype = setup
    model = model.to(device, dtype)
    return (model, *(t.to(device, dtype) if t is not None and t.is_floating_point()
                     else t.to(device) if t is not None else None for t in tensors))


def _gradient_scale(ref_grads) -> float:
    return max((g.abs().max().item() for g in ref_grads if g is not None), default=0.0)


def _reference(model):
    """An fp32 copy of ``model`` (same weights) for the error budget of reduced-precision runs."""
    return copy.deepcopy(model).float() if next(model.parameters()).dtype != torch.float32 else None


def check_close(name, ours, eager, reference=None, scale=0.0):
    """fp32: ours equals eager to 1e-4.  Lower precision: ours' max error against the fp32 ``reference`` is at
    most 3x eager's own, plus 1e-2 of the reference's magnitude and 1e-3 of ``scale`` (for gradients: the
    model's largest, so that a gradient that is analytically zero, such as a key projection's bias under
    softmax, is compared at the precision of the computation it comes from, not at its own rounding noise)."""
    if reference is None:
        torch.testing.assert_close(ours, eager, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    ref = reference.double()
    ours_error = (ours.double() - ref).abs().max().item()
    eager_error = (eager.double() - ref).abs().max().item()
    allowed = 3 * eager_error + 1e-2 * ref.abs().max().item() + 1e-3 * scale
    assert ours_error <= allowed, (name, ours_error, eager_error, allowed)


def _rewriting_backend(gm, example_inputs):
    rewrite_attention(gm, Settings())
    return gm.forward


def tiny(family: str, impl: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=256, attn_implementation=impl)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=1, **common))
    return model.eval()


def _compiled_call(model, *args, **kwargs):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=_rewriting_backend)(*args, **kwargs)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_attention_replaced(family, impl, setup):
    model, = _to(setup, tiny(family, impl))
    reference = _reference(model)
    ids = torch.randint(0, 128, (2, 24), device=setup[0])
    with torch.no_grad():
        ours = _compiled_call(model, ids).logits
        expected = model(ids).logits
        ref = reference(ids).logits if reference is not None else None
    assert counters["fa_inductor"]["replaced"] == LAYERS, dict(counters["fa_inductor"])
    check_close("logits", ours, expected, ref)

    # training step: one replacement per site again, gradients as eager's
    model.train()
    _compiled_call(model, ids, labels=ids).loss.backward()
    assert counters["fa_inductor"]["replaced"] == LAYERS
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    ref_grads = [None] * len(grads)
    if reference is not None:
        reference.train()
        reference(ids, labels=ids).loss.backward()
        ref_grads = [p.grad for p in reference.parameters()]
    scale = _gradient_scale(ref_grads)
    for (name, p), g, r in zip(model.named_parameters(), grads, ref_grads):
        check_close(name, g, p.grad, r, scale)


def _more_models():
    """name -> (model factory taking the attn_implementation, example inputs, attention sites)."""
    small = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                 vocab_size=128)
    t = transformers

    def ids():
        return (torch.randint(3, 128, (2, 24)),)

    def encoder_decoder():
        return torch.randint(3, 128, (2, 24)), None, torch.randint(3, 128, (2, 10))

    def causal_lm(config_cls, model_cls, **extra):
        return lambda impl: model_cls(config_cls(attn_implementation=impl, **{**small, **extra}))

    seq2seq = dict(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
    return {
        "gpt2": (lambda impl: t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=128,
                                                             attn_implementation=impl)), ids, LAYERS),
        "opt": (causal_lm(t.OPTConfig, t.OPTForCausalLM, ffn_dim=128, word_embed_proj_dim=64), ids, LAYERS),
        "bert": (causal_lm(t.BertConfig, t.BertModel), ids, LAYERS),
        "roberta": (causal_lm(t.RobertaConfig, t.RobertaModel, pad_token_id=1), ids, LAYERS),
        "falcon_mqa": (causal_lm(t.FalconConfig, t.FalconForCausalLM, new_decoder_architecture=False,
                                 multi_query=True), ids, LAYERS),
        "gpt_neox": (causal_lm(t.GPTNeoXConfig, t.GPTNeoXForCausalLM), ids, LAYERS),
        "phi3": (causal_lm(t.Phi3Config, t.Phi3ForCausalLM, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2), ids, LAYERS),
        "gemma": (causal_lm(t.GemmaConfig, t.GemmaForCausalLM, num_key_value_heads=1, head_dim=16), ids, LAYERS),
        # Gemma 2: logit softcapping, alternating sliding-window (8 < 24 tokens) and global layers; eager only
        # (transformers refuses sdpa for it)
        "gemma2": (causal_lm(t.Gemma2Config, t.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=16,
                             sliding_window=8), ids, LAYERS),
        "qwen3": (causal_lm(t.Qwen3Config, t.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=16), ids, LAYERS),
        # sliding window 8 < 24 tokens: lifted to the op's window flags
        "mistral_sliding": (causal_lm(t.MistralConfig, t.MistralForCausalLM, num_key_value_heads=2, sliding_window=8),
                            ids, LAYERS),
        "vit": (lambda impl: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, attn_implementation=impl,
                                                     **{k: v for k, v in small.items() if k != "vocab_size"})),
                lambda: (torch.randn(2, 3, 32, 32),), LAYERS),
        "clip_text": (lambda impl: t.CLIPTextModel(t.CLIPTextConfig(attn_implementation=impl, **small)), ids, LAYERS),
        # encoder self-attention, decoder self-attention and cross-attention (queries pre-scaled): 3 sites
        "bart": (lambda impl: t.BartModel(t.BartConfig(attn_implementation=impl, **seq2seq)), encoder_decoder, 3),
        "whisper": (lambda impl: t.WhisperModel(t.WhisperConfig(
            num_mel_bins=16, max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1, attn_implementation=impl, **seq2seq)),
            lambda: (torch.randn(2, 16, 32), None, torch.randint(3, 128, (2, 10))), 3),
        # T5: relative position bias (an additive mask the op loads) and, in the decoder, the causal mask too
        "t5": (lambda impl: t.T5Model(t.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                                                 num_heads=4, dropout_rate=0.0, attn_implementation=impl)),
               lambda: (torch.randint(3, 128, (2, 24)), None, torch.randint(3, 128, (2, 10))), 3),
    }


EAGER_ONLY = {"gemma2"}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(_more_models()))
def test_more_architectures(family, impl, setup):
    if impl == "sdpa" and family in EAGER_ONLY:
        pytest.skip(f"transformers has no sdpa attention for {family}")
    torch.manual_seed(0)
    factory, inputs, sites = _more_models()[family]
    model, *args = _to(setup, factory(impl).eval(), *inputs())
    reference = _reference(model)
    with torch.no_grad():
        ours = _compiled_call(model, *args)[0]
        expected = model(*args)[0]
        ref = reference(*(a.float() if a is not None and a.is_floating_point() else a for a in args))[0] \
            if reference is not None else None
    assert counters["fa_inductor"]["replaced"] == sites, dict(counters["fa_inductor"])
    check_close(family, ours, expected, ref)

    # A training step (eval mode, so that dropout draws no random numbers): every site replaced in the graph
    # compiled for training, and every parameter gradient as eager's.  On the CPU (the Triton interpreter, CI's
    # time budget) for the sdpa implementation; on the GPU for both.
    if setup[0] == "cpu" and impl == "eager":
        return
    grad_out = torch.randn_like(expected)
    torch.autograd.backward(_compiled_call(model, *args)[0], grad_out)
    assert counters["fa_inductor"]["replaced"] == sites, dict(counters["fa_inductor"])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.autograd.backward(model(*args)[0], grad_out)
    ref_grads = {}
    if reference is not None:
        ref_args = (a.float() if a is not None and a.is_floating_point() else a for a in args)
        torch.autograd.backward(reference(*ref_args)[0], grad_out.float())
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert grads
    scale = _gradient_scale(ref_grads.values())
    for n, p in model.named_parameters():
        if p.grad is not None:
            check_close(f"{family} {n}", grads[n], p.grad, ref_grads.get(n), scale)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_t5_relative_position_bias_with_gradient(impl, setup):
    """T5: the relative position bias is an additive mask the op loads, with its gradient flowing back to the
    learned bias embedding; encoder, decoder self- (bias plus causal mask) and cross-attention are replaced."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, dropout_rate=0.0,
        attn_implementation=impl)).train()
    model, = _to(setup, model)
    reference = _reference(model)
    ids = torch.randint(3, 128, (2, 24), device=setup[0])
    dec = torch.randint(3, 128, (2, 10), device=setup[0])
    _compiled_call(model, input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
    assert counters["fa_inductor"]["replaced"] == 3, dict(counters["fa_inductor"])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
    ref_grads = {}
    if reference is not None:
        reference(input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    bias_grads = [n for n in grads if "relative_attention_bias" in n]
    assert bias_grads and all(grads[n].abs().sum() > 0 for n in bias_grads)
    scale = _gradient_scale(ref_grads.values())
    for n, p in model.named_parameters():
        if p.grad is not None:
            check_close(n, grads[n], p.grad, ref_grads.get(n), scale)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("impl, form", [("eager", "additive_mask"), ("sdpa", "padding_mask")])
def test_padding_mask(impl, form, setup):
    """A left-padded batch, whose first queries see no key at all.  sdpa: the boolean mask transformers builds
    is lifted to the causal flag plus the [B, N] padding vector (no L x L mask); eager: its finfo.min mask
    gives such rows a uniform softmax over all keys, which flags cannot express, so the op loads the mask.
    Every position equals eager's, the fully padded rows included."""
    model, = _to(setup, tiny("llama", impl))
    reference = _reference(model)
    ids = torch.randint(0, 128, (2, 24), device=setup[0])
    attention_mask = torch.ones(2, 24, dtype=torch.long, device=setup[0])
    attention_mask[0, :5] = 0
    report = fa_inductor.explain(model, ids, attention_mask=attention_mask)
    assert report.replaced == LAYERS, [(s.reason, s.detail) for s in report.sites]
    assert all(form in s.form.split("+") for s in report.sites), [s.form for s in report.sites]
    with torch.no_grad():
        ours = _compiled_call(model, ids, attention_mask=attention_mask).logits
        expected = model(ids, attention_mask=attention_mask).logits
        ref = reference(ids, attention_mask=attention_mask).logits if reference is not None else None
    check_close("logits", ours, expected, ref)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_sliding_window_lifted(impl, setup):
    """Mistral's sliding window (8 keys < 24 tokens), with and without padding: lifted to window flags."""
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, attn_implementation=impl)).eval()
    model, = _to(setup, model)
    reference = _reference(model)
    ids = torch.randint(0, 128, (2, 24), device=setup[0])
    report = fa_inductor.explain(model, ids)
    assert report.replaced == LAYERS and all("window_mask" in s.form.split("+") for s in report.sites)
    with torch.no_grad():
        ours = _compiled_call(model, ids).logits
        expected = model(ids).logits
        ref = reference(ids).logits if reference is not None else None
    check_close("logits", ours, expected, ref)


@pytest.fixture
def registered():
    from fa_inductor.integrations import transformers as fa_hf
    fa_hf.register()
    yield
    fa_hf.unregister()


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("padded", [False, True])
def test_attn_implementation_fa_inductor(registered, padded, setup, caplog):
    reference = tiny("llama", "sdpa")
    ours = tiny("llama", "sdpa")
    ours.load_state_dict(reference.state_dict())
    ours.set_attn_implementation("fa_inductor")
    reference, = _to(setup, reference)
    ours, = _to(setup, ours)
    ids = torch.randint(0, 128, (2, 24), device=setup[0])
    mask = torch.ones(2, 24, dtype=torch.long, device=setup[0])
    if padded:
        mask[0, :5] = 0
    fp64 = _reference(reference)
    with torch.no_grad(), caplog.at_level("INFO", logger="fa_inductor"):
        expected = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        ref = fp64(ids, attention_mask=mask).logits if fp64 is not None else None
    fell_back = any("using torch SDPA" in r.getMessage() for r in caplog.records)
    assert not fell_back  # causal-only: the op with its causal flag; padding: the boolean mask in the kernels
    with torch.no_grad():
        compiled = _compiled_call(ours, ids, attention_mask=mask).logits
    keep = mask.bool()
    check_close("uncompiled", got[keep], expected[keep], ref[keep] if ref is not None else None)
    check_close("compiled", compiled[keep], expected[keep], ref[keep] if ref is not None else None)


def test_unregister_removes_the_name(registered):
    from transformers import AttentionInterface
    from fa_inductor.integrations import transformers as fa_hf
    assert "fa_inductor" in AttentionInterface._global_mapping
    fa_hf.unregister()
    assert "fa_inductor" not in AttentionInterface._global_mapping
    fa_hf.register()


@pytest.mark.parametrize("device", FP32_SETUPS)
@pytest.mark.parametrize("impl, cache", [("eager", "dynamic"), ("sdpa", "dynamic"), ("sdpa", "static")])
def test_generate_compiled_matches_eager(impl, cache, device):
    """Greedy generation through the fa_inductor backend gives eager's tokens (fp32), with every prefill and
    decode site replaced: bottom-right causal flags for a dynamic cache's prefill and decode; a static cache's
    mask also bounds the keys by the filled cache length, which the op loads as a boolean tensor."""
    model = tiny("llama", impl).to(device)
    ids = torch.randint(0, 128, (1, 12), device=device)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    expected = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward, backend="fa_inductor", dynamic=cache == "dynamic")
    assert torch.equal(model.generate(ids, **kwargs), expected)
    missed = sum(v for k, v in counters["fa_inductor"].items() if k.startswith("missed:"))
    assert counters["fa_inductor"]["replaced"] >= LAYERS and missed == 0, dict(counters["fa_inductor"])
