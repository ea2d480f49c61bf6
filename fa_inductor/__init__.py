"""fa_inductor: FlashAttention-2 Triton kernels for PyTorch.

Public functions:
  scaled_dot_product_attention  torch's SDPA semantics, computed by the ``fa_inductor`` op, plus sliding windows,
                                padding lengths, softcapping and bottom-right alignment as keyword arguments
  block_sparse_attention        attention restricted to the kept (query block, key block) pairs of a block mask
  backend(**settings)           a configured torch.compile backend (``backend="fa_inductor"`` is the default one)
  explain(model_or_fn, *args)   report every attention site Dynamo finds and what the backend decides for it

Importing the package registers its ops under the ``torch.ops.fa_inductor`` namespace; it queries no GPU and
changes no torch behaviour.
"""

from .attention import block_sparse_attention, scaled_dot_product_attention
from .backend import backend, explain
from .kernels import op as _op  # noqa: F401  (registers torch.ops.fa_inductor.*)

__version__ = "0.1.0"

__all__ = ["__version__", "scaled_dot_product_attention", "block_sparse_attention", "backend", "explain"]
