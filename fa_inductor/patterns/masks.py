"""Lifting masks built from index comparisons (as transformers 5.x builds them inside the graph).

A model may build its causal mask as ``kv_idx <= q_idx`` from ``arange`` tensors (plus cache offsets), broadcast
with ``None`` indexing and ``expand``, and turn it into an additive tensor with ``where(mask, 0, finfo.min)``.
``comparison(mask)`` evaluates such a subgraph abstractly: every node is either an index tensor
(``i + offset`` varying along one dimension) or a comparison between a key index and a query index.  When the
mask is provably ``True exactly where k <= q + shift`` (key axis last, query axis second to last, as the scores),
it returns ``shift`` (and whether True marks kept or masked entries); anything it cannot prove returns None
and the mask stays a tensor.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Union

import torch
from torch.fx import Node

from .graph import static_eq, value

__all__ = ["comparison", "is_prefix"]


@dataclasses.dataclass(frozen=True)
class _Index:
    """A tensor whose entry is ``i + offset`` along dimension ``dim`` (negative, from the end)."""

    dim: int
    offset: object  # int or SymInt


@dataclasses.dataclass(frozen=True)
class _KeyLeQuery:
    """A boolean tensor, True exactly where key index <= query index + shift (``keep``), or exactly where
    key index > query index + shift (not ``keep``)."""

    shift: object
    keep: bool = True


_Abstract = Union[_Index, _KeyLeQuery, None]

_COMPARE_FUNCTIONS = {operator.le: "le", torch.le: "le", operator.lt: "lt", torch.lt: "lt", operator.ge: "ge",
                      torch.ge: "ge", operator.gt: "gt", torch.gt: "gt"}
_COMPARE_METHODS = {"le": "le", "__le__": "le", "lt": "lt", "__lt__": "lt", "ge": "ge", "__ge__": "ge",
                    "gt": "gt", "__gt__": "gt"}


def _op(node: Node) -> Optional[str]:
    if node.op == "call_function":
        if node.target in _COMPARE_FUNCTIONS:
            return _COMPARE_FUNCTIONS[node.target]
        if node.target in (torch.arange,):
            return "arange"
        if node.target in (operator.add, torch.add):
            return "add"
        if node.target in (operator.sub, torch.sub):
            return "sub"
        if node.target is operator.getitem:
            return "getitem"
        if node.target in (torch.logical_not, operator.invert, torch.bitwise_not):
            return "not"
    elif node.op == "call_method":
        if node.target in _COMPARE_METHODS:
            return _COMPARE_METHODS[node.target]
        return {"add": "add", "__add__": "add", "sub": "sub", "__sub__": "sub", "expand": "expand",
                "unsqueeze": "unsqueeze", "__getitem__": "getitem", "to": "to", "bool": "to",
                "logical_not": "not", "__invert__": "not", "bitwise_not": "not"}.get(node.target)
    return None


def _int_like(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, torch.SymInt)


def _scalar(x):
    """A Python or symbolic integer (a SymInt graph input or size node), else None."""
    if isinstance(x, Node):
        v = value(x)
        return v if isinstance(v, torch.SymInt) else None
    return x if _int_like(x) else None


def is_prefix(i) -> bool:
    """An index entry that keeps a dimension and the index values along it: ``:``, ``:n``, ``0:n``."""
    return isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1)


def _reindex(index: tuple, ndim: int, dim: int) -> Optional[int]:
    """Where dimension ``dim`` (negative) of an ``ndim``-D tensor lands, counted from the end, after
    ``x[index]`` with entries None, Ellipsis and prefix slices; None for any other indexing."""
    if not all(i is None or i is Ellipsis or is_prefix(i) for i in index):
        return None
    explicit = sum(is_prefix(i) for i in index)
    expanded: list = []
    for i in index:
        expanded.extend([slice(None)] * (ndim - explicit) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (ndim - sum(is_prefix(i) for i in expanded)))
    source, target = 0, None
    for position, i in enumerate(expanded):
        if is_prefix(i):
            if source == dim % ndim:
                target = position
            source += 1
    return None if target is None else target - len(expanded)


def _evaluate(node, depth: int = 0) -> _Abstract:
    if depth > 32 or not isinstance(node, Node):
        return None
    op = _op(node)
    ev = value(node)
    if op == "arange":
        args = [a for a in node.args]
        if len(args) == 1 and _scalar(args[0]) is not None:
            return _Index(-1, 0)
        if len(args) == 2 and _scalar(args[0]) is not None and _scalar(args[1]) is not None:
            return _Index(-1, _scalar(args[0]))
        return None
    if op in ("add", "sub") and len(node.args) == 2:
        a, b = node.args
        ia, ib = _evaluate(a, depth + 1), _scalar(b)
        if op == "add" and ia is None:
            ia, ib = _evaluate(b, depth + 1), _scalar(a)
        if isinstance(ia, _Index) and ib is not None:
            return _Index(ia.dim, ia.offset + ib if op == "add" else ia.offset - ib)
        return None
    if op == "getitem":
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        inner = _evaluate(node.args[0], depth + 1)
        ndim = value(node.args[0]).dim()
        if isinstance(inner, _Index):
            dim = _reindex(index, ndim, inner.dim)
            return None if dim is None else _Index(dim, inner.offset)
        if isinstance(inner, _KeyLeQuery) and _reindex(index, ndim, -1) == -1 and _reindex(index, ndim, -2) == -2:
            return inner
        return None
    if op == "unsqueeze":
        inner = _evaluate(node.args[0], depth + 1)
        if not isinstance(inner, _Index) or not isinstance(node.args[1], int):
            return None
        n_in = value(node.args[0]).dim()
        at = node.args[1] % (n_in + 1)
        position = n_in + inner.dim
        return _Index(position + (at <= position) - (n_in + 1), inner.offset)
    if op == "expand":
        inner = _evaluate(node.args[0], depth + 1)
        # Broadcasting a size-1 index dimension would repeat one index value: not an index tensor any more.
        dims = (inner.dim,) if isinstance(inner, _Index) else (-2, -1)
        before, after = value(node.args[0]).shape, ev.shape
        if inner is None or any(not static_eq(before[d], after[d]) for d in dims):
            return None
        return inner
    if op == "to":
        return _evaluate(node.args[0], depth + 1) if ev.dtype == torch.bool else None
    if op in ("le", "lt", "ge", "gt") and len(node.args) == 2:
        a, b = (_evaluate(x, depth + 1) for x in node.args)
        if not (isinstance(a, _Index) and isinstance(b, _Index)):
            return None
        if (a.dim, b.dim) == (-2, -1):  # query on the left: mirror the comparison
            a, b, op = b, a, {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
        if (a.dim, b.dim) != (-1, -2):
            return None
        c = b.offset - a.offset  # key - query  OP  c
        return {"le": _KeyLeQuery(c), "lt": _KeyLeQuery(c - 1),
                "gt": _KeyLeQuery(c, keep=False), "ge": _KeyLeQuery(c - 1, keep=False)}[op]
    if op == "not":
        inner = _evaluate(node.args[0], depth + 1)
        return _KeyLeQuery(inner.shift, not inner.keep) if isinstance(inner, _KeyLeQuery) else None
    return None


def comparison(mask: Node, lengths) -> Optional[tuple]:
    """(shift, keep) if ``mask`` is provably True exactly where key <= query + shift (keep) or exactly where
    key > query + shift (not keep) over scores whose last two dims are ``lengths`` = (queries, keys); None
    otherwise.  The mask must have exactly those two sizes: a size-1 dimension would be broadcast, repeating
    one index value instead of enumerating the queries or keys."""
    result = _evaluate(mask)
    if not isinstance(result, _KeyLeQuery):
        return None
    shape = value(mask).shape
    if len(shape) < 2 or not (static_eq(shape[-2], lengths[0]) and static_eq(shape[-1], lengths[1])):
        return None
    return result.shift, result.keep
