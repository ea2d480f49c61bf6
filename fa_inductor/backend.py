"""The ``fa_inductor`` torch.compile backend: rewrite attention in Dynamo's graph, then compile with Inductor.

The rewrite runs on the torch-level graph Dynamo produces, before AOTAutograd, so the forward graph calls the
fa_inductor op and the backward graph its FlashAttention-2 backward; no [Lq, Lk] tensor is saved for backward.
``torch.compile(model, backend="fa_inductor")`` finds this backend through the ``torch_dynamo_backends`` entry
point, with no import of fa_inductor in user code; ``mode=`` and ``options=`` keep their Inductor meaning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from .caching import marked_functions
from .config import Settings
from .patterns.rewrite import Site, rewrite_attention

__all__ = ["backend", "fa_inductor_backend", "explain", "ExplainReport"]

log = logging.getLogger(__name__)


def _inductor_config(mode: Optional[str], options: Optional[dict]) -> dict:
    """The Inductor config patches torch.compile derives from ``mode`` / ``options`` for its own backend."""
    if mode and options:
        raise RuntimeError("fa_inductor: pass either mode= or options=, not both (as torch.compile requires)")
    config: dict = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options
        config.update(list_mode_options(mode))
    if options:
        config.update(options)
    return config


class _Backend:
    """A torch.compile backend callable carrying its settings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.__name__ = "fa_inductor"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        rewrite_attention(gm, self.settings)
        from torch._inductor.compile_fx import compile_fx
        patches = _inductor_config(mode, options)
        # Let AOTAutograd's cache keep the rewritten graph.
        marked = marked_functions(gm.graph, patches.get("unsafe_marked_cacheable_functions"))
        if marked is not None:
            patches["unsafe_marked_cacheable_functions"] = marked
        return compile_fx(gm, example_inputs, config_patches=patches)

    def __repr__(self) -> str:
        return f"fa_inductor.backend({self.settings})"


def backend(**settings) -> _Backend:
    """A configured backend: ``torch.compile(model, backend=fa_inductor.backend(min_seq_len=512))``.
    Settings are those of ``fa_inductor.config.Settings`` (environment variables fill the rest)."""
    return _Backend(Settings.from_env(**settings))


def fa_inductor_backend(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                        options: Optional[dict] = None):
    """The backend registered as ``"fa_inductor"`` (default settings plus environment overrides)."""
    return _Backend(Settings.from_env())(gm, example_inputs, mode=mode, options=options)


@dataclasses.dataclass
class ExplainReport:
    """Every candidate attention site of every graph compiled for one call, and what was decided."""

    sites: list

    @property
    def replaced(self) -> int:
        return sum(s.replaced for s in self.sites)

    @property
    def missed(self) -> int:
        return sum(not s.replaced for s in self.sites)

    def __str__(self) -> str:
        header = ("location", "form", "decision")
        rows = [(s.location, s.form or "-", "replaced" if s.replaced else f"kept: {s.reason}"
                 + (f" ({s.detail})" if s.detail else "")) for s in self.sites]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
        lines = [f"fa_inductor explain: {self.replaced} replaced, {self.missed} kept",
                 f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]}"]
        lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
        return "\n".join(lines)


def explain(model_or_fn, *args, **kwargs) -> ExplainReport:
    """Trace ``model_or_fn(*args, **kwargs)`` with Dynamo and report every candidate attention site: its source
    location, the form recognised, and whether it would be replaced or why not.  Nothing is rewritten or
    compiled by Inductor; the call runs eagerly once."""
    settings = Settings.from_env()
    sites: list[Site] = []

    def recording_backend(gm, example_inputs):
        sites.extend(rewrite_attention(gm, settings, apply=False))
        return gm.forward

    torch.compile(model_or_fn, backend=recording_backend)(*args, **kwargs)
    return ExplainReport(sites)
