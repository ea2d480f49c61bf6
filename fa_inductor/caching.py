"""Keeping AOTAutograd's cache for graphs the attention rewrite changed.

A rewritten graph calls ``attention.flash_attention``, a Python function, and AOTAutograd's cache bypasses any
graph that calls a function it cannot vouch for, so every new process traced the model again (Inductor's FX
graph cache still hit).  torch 2.8 and later (2.11 and 2.13 checked) let a function be marked cacheable under a
key of the caller's choosing (``torch._inductor.config.unsafe_marked_cacheable_functions``, a dict from qualified
name to key, which is part of every cache key).  ``cache_key`` covers everything that function's trace depends
on besides the graph and its inputs, which AOTAutograd keys on itself:

- the package's sources and shipped tables (the op's code, kernel choices, baseline configs);
- every ``FA_INDUCTOR_*`` environment variable (``FA_INDUCTOR_GLUON``, ``FA_INDUCTOR_ARCH``, tuning switches);
- the persistent tuning cache's files, as they are when the graph is compiled: configs are chosen while
  tracing and end up in the compiled graph, so a retuned shape must not reuse the old entry.

The GPU, the torch and Triton versions and torch's matmul precision switches (which fp32 products follow) are
in AOTAutograd's key already.  The backend sets the entry only for its own ``compile_fx`` call
(``config_patches``).  The pre-grad pass that ``integrations.inductor_pass.install`` sets up refreshes it for
each graph that calls ``flash_attention`` and drops it for any other; ``uninstall`` removes it.  On torch
versions without the dict the cache stays bypassed, as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

__all__ = ["CACHEABLE_FUNCTION", "supported", "calls_flash_attention", "cache_key", "marked_functions"]

# The qualified name AOTAutograd's check builds for ``attention.flash_attention`` (module + function name).
CACHEABLE_FUNCTION = "fa_inductor.attention.flash_attention"
_PACKAGE = Path(__file__).resolve().parent

log = logging.getLogger(__name__)


def supported() -> bool:
    """Whether this torch keys marked functions by a caller's key (a dict, torch 2.8 and later)."""
    from torch._inductor import config

    return isinstance(getattr(config, "unsafe_marked_cacheable_functions", None), dict)


def calls_flash_attention(graph) -> bool:
    """Whether an FX graph calls ``attention.flash_attention`` (rewritten by this compilation or an earlier one)."""
    from .attention import flash_attention

    return any(node.op == "call_function" and node.target is flash_attention for node in graph.nodes)


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    from . import __version__

    digest = hashlib.sha256(__version__.encode())
    for path in sorted([*_PACKAGE.rglob("*.py"), *_PACKAGE.rglob("*.json")]):
        digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key() -> str:
    """The key under which graphs calling ``flash_attention`` may be cached now (see the module docstring)."""
    from .kernels.autotune import _cache_directory

    digest = hashlib.sha256(_source_digest().encode())
    for name in sorted(k for k in os.environ if k.startswith("FA_INDUCTOR_")):
        digest.update(f"\0{name}={os.environ[name]}".encode())
    try:
        tuned = sorted(_cache_directory().glob("autotune-*.json"))
    except OSError:
        tuned = []
    for path in tuned:
        try:
            digest.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
        except OSError:  # a file going away or unreadable: the tuner ignores it too
            digest.update(b"\0" + path.name.encode() + b"\0?")
    return digest.hexdigest()


def marked_functions(graph, marked: Optional[dict] = None) -> Optional[dict]:
    """The value of ``unsafe_marked_cacheable_functions`` to compile ``graph`` under: ``marked`` (default:
    Inductor's current config) with ``flash_attention`` under ``cache_key()`` if the graph calls it, and without
    it otherwise (a graph that does not call it, ``graph`` None, or a key that cannot be made: such a graph is
    compiled as before, bypassing that cache).  None where torch takes no key per function."""
    if not supported():
        return None
    from torch._inductor import config

    if marked is None:
        marked = config.unsafe_marked_cacheable_functions
    others = {name: key for name, key in marked.items() if name != CACHEABLE_FUNCTION}
    if graph is None or not calls_flash_attention(graph):
        return others
    try:
        return {**others, CACHEABLE_FUNCTION: cache_key()}
    except Exception:  # noqa: BLE001 - caching is an optimisation: never let it break a compilation
        log.warning("fa_inductor: no AOTAutograd cache key (graph compiled without that cache)", exc_info=True)
        return others
