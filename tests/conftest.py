"""Test configuration: seeds, markers, and the Triton interpreter on machines without CUDA.

Without a CUDA device the suite sets ``TRITON_INTERPRET=1`` before ``fa_inductor`` is imported, so the op's
CPU tensors run the real Triton kernels through Triton's interpreter.  Set ``TRITON_INTERPRET=0`` to test the
blockwise PyTorch CPU path instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
