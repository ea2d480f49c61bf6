"""fa_inductor: FlashAttention-2 Triton kernels for PyTorch.

Public functions:
  scaled_dot_product_attention  torch's SDPA semantics, computed by the ``fa_inductor`` op
  backend(**settings)           a configured torch.compile backend (``backend="fa_inductor"`` is the default one)
  explain(model_or_fn, *args)   report every attention site Dynamo finds and what the backend decides for it

Importing the package registers its ops under the ``torch.ops.fa_inductor`` namespace; it queries no GPU and
changes no torch behaviour.
"""

from .attention import scaled_dot_product_attention
from .backend import backend, explain
from .kernels import op as _op  # noqa: F401  (registers torch.ops.fa_inductor.*)

__version__ = "0.1.0"

__all__ = ["__version__", "scaled_dot_product_attention", "backend", "explain"]
