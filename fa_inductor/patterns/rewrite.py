"""Rewriting matched attention in an FX graph, and recording every decision.

``rewrite_attention(gm, settings)`` visits every anchor (softmax or SDPA call), asks the matcher for a proof of
exactness, and either replaces the subgraph with one call of ``fa_inductor.attention.flash_attention`` (which
calls the registered op) or leaves it untouched.  Each decision becomes a ``Site``: counted in
``torch._dynamo.utils.counters["fa_inductor"]`` ("replaced", "missed:<reason>"), logged on the ``fa_inductor``
logger, and returned for ``fa_inductor.explain``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Optional

import torch
from torch.fx import GraphModule

from ..attention import flash_attention
from ..config import Settings
from .graph import location
from .match import AttentionMatch, Miss, anchors, match_anchor

__all__ = ["Site", "rewrite_attention"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Site:
    """One candidate attention site and what was decided for it."""

    location: str
    form: str
    replaced: bool
    reason: str = ""
    detail: str = ""
    shape: Optional[dict] = None  # replaced sites: what ``fa-inductor tune`` needs to tune for them


def _shape(m: AttentionMatch) -> Optional[dict]:
    """Sizes, dtype and mask class of a matched site, from the trace's example values (None when missing)."""
    values = [n.meta.get("val", n.meta.get("example_value")) for n in (m.query, m.key, m.value)]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    query, key, value = values
    key_len = key.shape[-1] if m.key_needs_transpose else key.shape[-2]

    def size(n):
        return int(n) if isinstance(n, int) else None  # symbolic: no size here (the tuner's default bucket)

    return {"dtype": str(query.dtype).replace("torch.", ""), "head_d": size(query.shape[-1]),
            "head_dv": size(value.shape[-1]), "n_queries": size(query.shape[-2]), "n_keys": size(key_len),
            "causal": bool(m.is_causal or m.window != (-1, -1)), "bias": m.mask is not None,
            "extras": bool(m.softcap or m.dropout_p), "group": _group(query, value)}


def _group(query: torch.Tensor, value: torch.Tensor) -> int:
    """Query heads per key head as the op will see them (1 when unknown)."""
    if query.dim() < 3 or value.dim() < 3:
        return 1
    heads, kv_heads = query.shape[-3], value.shape[-3]
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or kv_heads == 0 or heads % kv_heads:
        return 1
    return heads // kv_heads


def _apply(gm: GraphModule, m: AttentionMatch) -> None:
    graph = gm.graph
    with graph.inserting_before(m.out):
        query = m.query
        for op, tensor in m.scale_tensors:  # (q @ k^T) * t == (q * t) @ k^T for a 0-d tensor or symbolic t
            query = graph.call_function(operator.mul if op == "mul" else operator.truediv, (query, tensor))
        key = graph.call_method("transpose", (m.key, -2, -1)) if m.key_needs_transpose else m.key
        value = m.value
        if m.cast_to is not None:
            query, key, value = (graph.call_method("to", (t, m.cast_to)) for t in (query, key, value))
        mask = m.mask
        if mask is not None and m.mask_index is not None:
            mask = graph.call_function(operator.getitem, (mask, m.mask_index))
        if mask is not None and m.mask_invert:
            mask = graph.call_function(torch.logical_not, (mask,))
        fused = graph.call_function(flash_attention, (query, key, value),
                                    {"scale": m.scale, "is_causal": m.is_causal, "bottom_right": m.bottom_right,
                                     "enable_gqa": m.enable_gqa, "gqa_tiled": m.gqa_tiled, "attn_mask": mask,
                                     "nan_empty_rows": m.nan_empty_rows, "softcap": m.softcap,
                                     "dropout_p": m.dropout_p, "window": m.window})
    for name in ("stack_trace", "example_value", "nn_module_stack", "source_fn_stack"):
        if name in m.out.meta:
            fused.meta[name] = m.out.meta[name]
    m.out.replace_all_uses_with(fused)
    # Remove the replaced subgraph (in reverse order, each node once nothing uses it any more).
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(m.nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def rewrite_attention(gm: GraphModule, settings: Settings, apply: bool = True) -> list[Site]:
    """Find attention in ``gm``; replace what is provably exact when ``apply`` (and then count and log each
    decision).  Returns one Site per anchor."""
    from torch._dynamo.utils import counters

    sites = []
    for anchor in anchors(gm.graph):
        where = location(anchor)
        try:
            m = match_anchor(anchor, settings)
        except Miss as miss:
            site = Site(where, miss.form, False, miss.reason, miss.detail)
        except Exception as error:  # noqa: BLE001 - an unexpected graph must never break torch.compile
            log.warning("fa_inductor: could not analyse the softmax at %s; left as it was", where, exc_info=True)
            site = Site(where, "", False, "internal_error", f"{type(error).__name__}: {error}")
        else:
            site = Site(where, m.form, True, shape=_shape(m))
            if apply:
                _apply(gm, m)
        sites.append(site)
        if apply:
            counters["fa_inductor"]["replaced" if site.replaced else f"missed:{site.reason}"] += 1
            if site.replaced:
                log.info("fa_inductor: replaced attention at %s (%s)", where, site.form)
            else:
                log.info("fa_inductor: left attention at %s as it was (%s): %s", where, site.reason, site.detail)
    if apply and any(s.replaced for s in sites):
        gm.graph.lint()
        gm.recompile()
    return sites
