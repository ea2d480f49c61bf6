"""``attn_implementation="fa_inductor"`` for Hugging Face transformers models (compiled or not).

``register()`` adds an attention function to transformers' ``AttentionInterface`` and the matching mask
function to ``AttentionMaskInterface`` under the name "fa_inductor"; ``unregister()`` removes both.  Nothing
happens at import.  The mask function is transformers' SDPA mask builder, which hands the attention ``None``
when the mask is purely causal (the op then runs with its causal flag, no mask tensor at all) and a boolean mask
(True = attend) otherwise, which ``fa_inductor.scaled_dot_product_attention`` accepts with SDPA's semantics.

    from fa_inductor.integrations import transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fa_inductor")
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention import scaled_dot_product_attention

__all__ = ["NAME", "register", "unregister", "attention_forward"]

NAME = "fa_inductor"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function protocol: [B, H, L, D] inputs -> ([B, L, H, D] output, no weights)."""
    if kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='fa_inductor' computes no attention weights and takes no "
                         "position_bias; use attn_implementation='eager' for those")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: the causal flag only replaces an absent mask, and one query row needs none.
    is_causal = bool(is_causal and attention_mask is None and query.shape[2] > 1)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout if module.training else 0.0, is_causal=is_causal,
                                       scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fa_inductor"`` available (explicit; undo with ``unregister()``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def unregister() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(NAME, None)
