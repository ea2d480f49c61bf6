"""Test configuration: seeds, markers, and the Triton interpreter on machines without CUDA.

Without a CUDA device the suite sets ``TRITON_INTERPRET=1`` before ``fa_inductor`` is imported, so the op's
CPU tensors run the real Triton kernels through Triton's interpreter.  Set ``TRITON_INTERPRET=0`` to test the
blockwise PyTorch CPU path instead.

Kernel configs come from the shipped tables or the resource model (``FA_INDUCTOR_AUTOTUNE=0``) and the autotune
cache lives in a per-session temporary directory, so that no test pauses to tune or reads a user's cache;
``tests/test_autotune.py`` switches tuning on where it tests it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FA_INDUCTOR_AUTOTUNE", "0")
if "FA_INDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FA_INDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fa_inductor_cache_")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
