"""Hugging Face models built from tiny random configs (no download): attention sites replaced in compiled
graphs, numerics against eager in inference and training."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fa_inductor
from fa_inductor.config import Settings
from fa_inductor.patterns.rewrite import rewrite_attention

transformers = pytest.importorskip("transformers")

LAYERS = 2


def _rewriting_backend(gm, example_inputs):
    rewrite_attention(gm, Settings())
    return gm.forward


def tiny(family: str, impl: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=256, attn_implementation=impl)
    if family == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(num_key_value_heads=1, **common)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    return model.eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_attention_replaced(family, impl):
    model = tiny(family, impl)
    ids = torch.randint(0, 128, (2, 24))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=_rewriting_backend)
    with torch.no_grad():
        ours = compiled(ids).logits
        expected = model(ids).logits
    assert counters["fa_inductor"]["replaced"] == LAYERS, dict(counters["fa_inductor"])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)

    # training step: one replacement per site again, gradients as eager's
    model.train()
    torch._dynamo.reset()
    counters.clear()
    loss = torch.compile(model, backend=_rewriting_backend)(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert counters["fa_inductor"]["replaced"] == LAYERS
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def _more_models():
    """name -> (model factory taking the attn_implementation, example inputs)."""
    small = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                 vocab_size=128)
    t = transformers

    def ids():
        return (torch.randint(3, 128, (2, 24)),)

    def causal_lm(config_cls, model_cls, **extra):
        return lambda impl: model_cls(config_cls(attn_implementation=impl, **{**small, **extra}))

    return {
        "gpt2": (lambda impl: t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=128,
                                                             attn_implementation=impl)), ids),
        "opt": (causal_lm(t.OPTConfig, t.OPTForCausalLM, ffn_dim=128, word_embed_proj_dim=64), ids),
        "bert": (causal_lm(t.BertConfig, t.BertModel), ids),
        "roberta": (causal_lm(t.RobertaConfig, t.RobertaModel, pad_token_id=1), ids),
        "falcon_mqa": (causal_lm(t.FalconConfig, t.FalconForCausalLM, new_decoder_architecture=False,
                                 multi_query=True), ids),
        "gpt_neox": (causal_lm(t.GPTNeoXConfig, t.GPTNeoXForCausalLM), ids),
        "phi3": (causal_lm(t.Phi3Config, t.Phi3ForCausalLM, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2), ids),
        "gemma": (causal_lm(t.GemmaConfig, t.GemmaForCausalLM, num_key_value_heads=1, head_dim=16), ids),
        "qwen3": (causal_lm(t.Qwen3Config, t.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=16), ids),
        # sliding window 8 < 24 tokens: the window mask transformers builds is loaded by the op as a tensor
        "mistral_sliding": (causal_lm(t.MistralConfig, t.MistralForCausalLM, num_key_value_heads=2, sliding_window=8),
                            ids),
        "vit": (lambda impl: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, attn_implementation=impl,
                                                     **{k: v for k, v in small.items() if k != "vocab_size"})),
                lambda: (torch.randn(2, 3, 32, 32),)),
        "clip_text": (lambda impl: t.CLIPTextModel(t.CLIPTextConfig(attn_implementation=impl, **small)), ids),
        # encoder self-attention, decoder self-attention and cross-attention (queries pre-scaled): 3 sites
        "bart": (lambda impl: t.BartModel(t.BartConfig(
            vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, attn_implementation=impl)),
            lambda: (torch.randint(3, 128, (2, 24)), None, torch.randint(3, 128, (2, 10)))),
    }


SITES = {"bart": 3}


def _t5(impl):
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, dropout_rate=0.0,
        attn_implementation=impl))


def test_t5_relative_position_bias_with_gradient():
    """T5 (sdpa): the relative position bias is an additive mask the op loads, with its gradient flowing back to
    the learned bias embedding; encoder, decoder self- and cross-attention are all replaced."""
    torch.manual_seed(0)
    model = _t5("sdpa").train()
    ids, dec = torch.randint(3, 128, (2, 24)), torch.randint(3, 128, (2, 10))
    torch._dynamo.reset()
    counters.clear()
    loss = torch.compile(model, backend=_rewriting_backend)(input_ids=ids, decoder_input_ids=dec, labels=dec).loss
    loss.backward()
    assert counters["fa_inductor"]["replaced"] == 3, dict(counters["fa_inductor"])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(input_ids=ids, decoder_input_ids=dec, labels=dec).loss.backward()
    bias_grads = [n for n in grads if "relative_attention_bias" in n]
    assert bias_grads and all(grads[n].abs().sum() > 0 for n in bias_grads)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(_more_models()))
def test_more_architectures(family, impl):
    torch.manual_seed(0)
    factory, inputs = _more_models()[family]
    model = factory(impl).eval()
    args = inputs()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ours = torch.compile(model, backend=_rewriting_backend)(*args)[0]
        expected = model(*args)[0]
    assert counters["fa_inductor"]["replaced"] == SITES.get(family, LAYERS), dict(counters["fa_inductor"])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_mask_loaded_as_a_tensor(impl):
    """A padded batch: the mask transformers builds is not provably causal, so the op loads it as a tensor
    (boolean for sdpa, finfo.min additive for eager) and every position equals eager's, the fully padded rows
    included."""
    model = tiny("llama", impl)
    ids = torch.randint(0, 128, (2, 24))
    attention_mask = torch.ones(2, 24, dtype=torch.long)
    attention_mask[0, :5] = 0
    report = fa_inductor.explain(model, ids, attention_mask=attention_mask)
    assert report.replaced == LAYERS, [(s.reason, s.detail) for s in report.sites]
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=_rewriting_backend)(ids, attention_mask=attention_mask).logits
        expected = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def registered():
    from fa_inductor.integrations import transformers as fa_hf
    fa_hf.register()
    yield
    fa_hf.unregister()


@pytest.mark.parametrize("padded", [False, True])
def test_attn_implementation_fa_inductor(registered, padded, caplog):
    reference = tiny("llama", "sdpa")
    ours = tiny("llama", "sdpa")
    ours.load_state_dict(reference.state_dict())
    ours.set_attn_implementation("fa_inductor")
    ids = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
    with torch.no_grad(), caplog.at_level("INFO", logger="fa_inductor"):
        expected = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    fell_back = any("using torch SDPA" in r.getMessage() for r in caplog.records)
    assert not fell_back  # causal-only: the op with its causal flag; padding: the boolean mask in the kernels
    with torch.no_grad():
        compiled = torch.compile(ours, backend=_rewriting_backend)(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled[keep], expected[keep], atol=1e-4, rtol=1e-4)


def test_unregister_removes_the_name(registered):
    from transformers import AttentionInterface
    from fa_inductor.integrations import transformers as fa_hf
    assert "fa_inductor" in AttentionInterface._global_mapping
    fa_hf.unregister()
    assert "fa_inductor" not in AttentionInterface._global_mapping
    fa_hf.register()


@pytest.mark.parametrize("impl, cache, all_replaced", [("eager", "dynamic", True), ("sdpa", "dynamic", True),
                                                       ("sdpa", "static", True)])
def test_generate_compiled_matches_eager(impl, cache, all_replaced):
    """Greedy generation through the fa_inductor backend gives eager's tokens (fp32), with every prefill and
    decode site replaced.  With a dynamic cache the prefill mask is lifted to the causal flag; a static cache's
    mask also bounds the keys by the filled cache length, so the op loads it as a boolean tensor."""
    model = tiny("llama", impl)
    ids = torch.randint(0, 128, (1, 12))
    kwargs = dict(max_new_tokens=6, do_sample=False)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    expected = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward, backend="fa_inductor", dynamic=cache == "dynamic")
    assert torch.equal(model.generate(ids, **kwargs), expected)
    missed = sum(v for k, v in counters["fa_inductor"].items() if k.startswith("missed:"))
    assert counters["fa_inductor"]["replaced"] >= LAYERS
    assert (missed == 0) == all_replaced, dict(counters["fa_inductor"])
