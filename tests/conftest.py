"""Test configuration: seeds, markers, and the Triton interpreter on machines without CUDA.

Without a CUDA device the suite sets ``TRITON_INTERPRET=1`` before ``fa_inductor`` is imported, so the op's
CPU tensors run the real Triton kernels through Triton's interpreter.  Set ``TRITON_INTERPRET=0`` to test the
blockwise PyTorch CPU path instead.

Kernel configs come from the shipped tables or the resource model (``FA_INDUCTOR_AUTOTUNE=0``) and the autotune
cache lives in a per-session temporary directory, so that no test pauses to tune or reads a user's cache;
``tests/test_autotune.py`` switches tuning on where it tests it.

Under pytest-xdist the workers share the GPU: every ``gpu`` test holds a shared lock and a ``gpu_memory`` test
(one that needs most of the card's memory) an exclusive one, see ``gpu_share.py``.
"""

import os

import pytest
import torch

from gpu_share import gpu_lock

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FA_INDUCTOR_AUTOTUNE", "0")
if "FA_INDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FA_INDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fa_inductor_cache_")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _share_the_gpu(request):
    """Under xdist, keep ``gpu_memory`` tests alone on the GPU; other GPU tests run side by side."""
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None or request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield
        return
    exclusive = request.node.get_closest_marker("gpu_memory") is not None
    with gpu_lock(workerinput["testrunuid"], exclusive):
        yield
        # Give the cached blocks back before the lock goes, so that an exclusive test finds the memory free.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
