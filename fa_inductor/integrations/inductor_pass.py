"""The attention rewrite as an Inductor pre-grad custom pass (what ``FA_INDUCTOR=1`` installs).

Inductor runs ``config.pre_grad_custom_pass`` on the torch-level graph before AOTAutograd, which is where the
fa_inductor backend rewrites too: the backward graph then runs the FlashAttention-2 backward kernels.  The pass
has a stable ``uuid()`` (a hash of the matcher's source and the settings), so Inductor's caches stay valid and are
invalidated when either changes.  ``install()`` / ``uninstall()`` are explicit and reversible.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..config import Settings

__all__ = ["AttentionPass", "install", "uninstall"]

log = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = ("attention.py", "config.py", "patterns/graph.py", "patterns/match.py", "patterns/rewrite.py")


class AttentionPass(CustomGraphPass):
    def __init__(self, settings: Settings, explain: bool = False):
        self.settings, self.explain = settings, explain

    def __call__(self, graph: torch.fx.Graph) -> None:
        from ..backend import ExplainReport
        from ..patterns.rewrite import rewrite_attention

        sites = rewrite_attention(graph.owning_module, self.settings)
        if self.explain and sites:
            print(ExplainReport(sites), flush=True)
        _mark_cacheable(graph)

    def uuid(self) -> str:
        digest = hashlib.sha256(f"{self.settings.cache_key()};explain={self.explain}".encode())
        for name in _SOURCES:
            digest.update((_PACKAGE / name).read_bytes())
        return digest.hexdigest()


# Inductor's pre_grad_pass_timing before install() set it, restored by uninstall().
_saved_timing: list = []


def _mark_cacheable(graph: Optional[torch.fx.Graph]) -> None:
    """Let AOTAutograd's cache keep ``graph`` if it calls ``flash_attention`` (``caching.marked_functions``;
    rewritten by this pass or, under ``backend="fa_inductor"``, before it): the pass runs before the cache lookup,
    so the entry it leaves in Inductor's config is the one the lookup keys on.  Any other graph (or None) drops
    the entry, so that its key does not follow the tuning cache."""
    from torch._inductor import config

    from ..caching import marked_functions

    marked = marked_functions(graph)
    if marked is not None and marked != config.unsafe_marked_cacheable_functions:
        config.unsafe_marked_cacheable_functions = marked


def install(explain: bool = False, **settings) -> AttentionPass:
    """Make every Inductor compilation rewrite attention (``torch.compile(model)`` with the default backend).

    Where Inductor can run pre-grad passes after its cache lookup (``config.pre_grad_pass_timing``), the pass is
    set to run before it instead: a warm cache would otherwise skip the pass, so the ``fa_inductor`` counters
    and ``FA_INDUCTOR=explain`` would report nothing although the cached graph calls the kernels.  The cache
    still works: its key is then taken from the rewritten graph."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    if current is not None and not isinstance(current, AttentionPass):
        raise RuntimeError(f"fa_inductor: Inductor's pre_grad_custom_pass is already set ({current!r}); "
                           "not replacing it")
    attention_pass = AttentionPass(Settings.from_env(**settings), explain)
    if hasattr(config, "pre_grad_pass_timing") and not _saved_timing:
        _saved_timing.append(config.pre_grad_pass_timing)
        config.pre_grad_pass_timing = "early"
    config.pre_grad_custom_pass = attention_pass
    log.info("fa_inductor: attention rewrite installed as Inductor's pre-grad pass")
    return attention_pass


def uninstall() -> None:
    """Undo ``install()``: Inductor's pre-grad pass and its timing are as they were before, and the pass's mark
    on ``flash_attention`` in ``config.unsafe_marked_cacheable_functions`` is gone."""
    from torch._inductor import config

    if isinstance(config.pre_grad_custom_pass, AttentionPass):
        config.pre_grad_custom_pass = None
    _mark_cacheable(None)
    if _saved_timing:
        config.pre_grad_pass_timing = _saved_timing.pop()
