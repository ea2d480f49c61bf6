"""Lifting masks built from index comparisons (as transformers 5.x builds them inside the graph).

A model may build its mask from ``arange`` tensors (plus cache offsets): ``kv_idx <= q_idx`` (causal),
``kv_idx > q_idx - W`` (sliding window), ``padding_mask[batch_idx, kv_idx]`` (key padding, a [B, N] boolean
tensor gathered per batch and key), combined with ``&`` starting from ``new_ones((), dtype=bool)``, broadcast
with ``None`` indexing and ``expand``, and turned into an additive tensor with ``where(mask, 0, finfo.min)``.
``comparison(mask, lengths)`` evaluates such a subgraph abstractly: every node is either an index tensor
(``i + offset`` varying along one dimension) or a ``Predicate``, a conjunction of bounds on the key index
relative to the query index and of key-padding vectors.  A mask it cannot prove to be one of these stays a tensor.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Union

import torch
from torch.fx import Node

from .graph import static_eq, value

__all__ = ["Predicate", "comparison", "negate", "is_prefix"]


@dataclasses.dataclass(frozen=True)
class _Index:
    """A tensor whose entry is ``i + offset`` along dimension ``dim`` (negative, from the end)."""

    dim: int
    offset: object  # int or SymInt


@dataclasses.dataclass(frozen=True)
class Predicate:
    """A boolean [..., M, N] tensor, True exactly where every condition holds (``negated``: exactly where one
    fails).  With q the query index and k the key index (both from 0):

        upper: k <= q + upper        lower: k >= q + lower        padding: pad[b, k] for each [B, N] bool node

    None means no such bound; ``padding`` nodes are 2-D boolean tensors indexed by batch and key."""

    upper: object = None
    lower: object = None
    padding: tuple = ()
    negated: bool = False

    @property
    def structured(self) -> bool:
        return self.upper is not None or self.lower is not None


def _tighter(a, b, pick_min: bool):
    """The tighter of two bounds (None = absent), or raise _Unknown when they cannot be compared statically."""
    if a is None or b is None:
        return b if a is None else a
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if statically_known_true(a <= b):
        return a if pick_min else b
    if statically_known_true(b <= a):
        return b if pick_min else a
    raise _Unknown


class _Unknown(Exception):
    """The abstract value cannot be determined statically."""


def _conjoin(a: Predicate, b: Predicate) -> Optional[Predicate]:
    if a.negated or b.negated:
        return None
    try:
        upper = _tighter(a.upper, b.upper, pick_min=True)
        lower = _tighter(a.lower, b.lower, pick_min=False)
    except _Unknown:
        return None
    return Predicate(upper, lower, tuple(dict.fromkeys(a.padding + b.padding)))


def negate(p: Predicate) -> Predicate:
    """The complement: one bound flips into the other; anything richer is marked ``negated``."""
    if p.negated:
        return dataclasses.replace(p, negated=False)
    if not p.padding and (p.upper is None) != (p.lower is None):
        # not (k <= q + u)  <=>  k >= q + u + 1;   not (k >= q + l)  <=>  k <= q + l - 1
        return Predicate(lower=p.upper + 1) if p.upper is not None else Predicate(upper=p.lower - 1)
    return dataclasses.replace(p, negated=True)


_Abstract = Union[_Index, Predicate, None]

_COMPARE_FUNCTIONS = {operator.le: "le", torch.le: "le", operator.lt: "lt", torch.lt: "lt", operator.ge: "ge",
                      torch.ge: "ge", operator.gt: "gt", torch.gt: "gt"}
# The comparison seen from the other side: ``a OP b`` is ``b _MIRROR[OP] a``.
_MIRROR = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}
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
        if node.target in (operator.and_, torch.logical_and, torch.bitwise_and):
            return "and"
    elif node.op == "call_method":
        if node.target in _COMPARE_METHODS:
            return _COMPARE_METHODS[node.target]
        return {"add": "add", "__add__": "add", "sub": "sub", "__sub__": "sub", "expand": "expand",
                "unsqueeze": "unsqueeze", "__getitem__": "getitem", "to": "to", "bool": "to",
                "logical_not": "not", "__invert__": "not", "bitwise_not": "not", "__and__": "and",
                "logical_and": "and", "bitwise_and": "and", "__rand__": "and", "new_ones": "ones"}.get(node.target)
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


def _kept_sizes(abstract, before, after) -> bool:
    """Whether broadcasting a tensor of shape ``before`` to ``after`` keeps what it means: the dimension an
    index tensor varies along, and the query and key dimensions a comparison depends on (broadcasting a size-1
    one would repeat a single index value).  A padding-only predicate does not depend on the query index."""
    if len(before) > len(after) or len(before) == 0:
        return len(before) == 0 and isinstance(abstract, Predicate) and not abstract.structured \
            and not abstract.padding
    if isinstance(abstract, _Index):
        dims = (abstract.dim,)
    elif abstract.structured:
        dims = (-2, -1)
    elif abstract.padding:
        dims = (-1,)
    else:
        dims = ()
    return all(-d <= len(before) and static_eq(before[d], after[d]) for d in dims)


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
        if isinstance(inner, Predicate) and _reindex(index, ndim, -1) == -1 and _reindex(index, ndim, -2) == -2:
            return inner
        return _padding(node, index)
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
        if inner is None or not _kept_sizes(inner, value(node.args[0]).shape, ev.shape):
            return None
        return inner
    if op == "to":
        return _evaluate(node.args[0], depth + 1) if ev.dtype == torch.bool else None
    if op in ("le", "lt", "ge", "gt") and len(node.args) == 2:
        a, b = (_evaluate(x, depth + 1) for x in node.args)
        bound = _always_true(op, a, b, *node.args)
        if bound is not None:
            return bound
        if not (isinstance(a, _Index) and isinstance(b, _Index)):
            return None
        if (a.dim, b.dim) == (-2, -1):  # query on the left: mirror the comparison
            a, b, op = b, a, _MIRROR[op]
        if (a.dim, b.dim) != (-1, -2):
            return None
        c = b.offset - a.offset  # key - query  OP  c
        return {"le": Predicate(upper=c), "lt": Predicate(upper=c - 1),
                "ge": Predicate(lower=c), "gt": Predicate(lower=c + 1)}[op]
    if op == "not":
        inner = _evaluate(node.args[0], depth + 1)
        return negate(inner) if isinstance(inner, Predicate) else None
    if op == "and" and len(node.args) == 2:
        a, b = (_evaluate(x, depth + 1) for x in node.args)
        if not (isinstance(a, Predicate) and isinstance(b, Predicate)):
            return None
        if not all(_kept_sizes(p, value(x).shape, ev.shape) for p, x in zip((a, b), node.args)):
            return None
        return _conjoin(a, b)
    if op == "ones":
        # ``x.new_ones(size, dtype=torch.bool)`` with every size 1: the all-True start of a conjunction
        sizes = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) > 1 else ())
        sizes = sizes if isinstance(sizes, (tuple, list)) else (sizes,)
        if ev.dtype == torch.bool and all(s == 1 for s in sizes):
            return Predicate()
    return None


def _always_true(op: str, a, b, left, right) -> Optional[Predicate]:
    """``index >= c`` (or ``c <= index``, ``>``/``<``) with c at most the index's first value: all True (how
    transformers 5.17 spells a bidirectional mask: ``q_idx >= 0``).  None when not provably so."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if isinstance(b, _Index) and not isinstance(a, _Index):
        a, b, left, right = b, a, right, left
        op = _MIRROR[op]
    constant = _scalar(right)
    if not isinstance(a, _Index) or constant is None or op not in ("ge", "gt"):
        return None
    holds = a.offset >= constant if op == "ge" else a.offset > constant
    return Predicate() if statically_known_true(holds) else None


def _padding(node: Node, index: tuple) -> Optional[Predicate]:
    """``pad[batch_idx, kv_idx]`` with ``pad`` a [B, N] boolean tensor, ``batch_idx`` = arange(B) along dim -4 and
    ``kv_idx`` = arange(N) along dim -1 (no offsets): the key-padding predicate pad[b, k]."""
    pad = node.args[0]
    ev = value(pad)
    if len(index) != 2 or not isinstance(ev, torch.Tensor) or ev.dtype != torch.bool or ev.dim() != 2:
        return None
    batch, keys = (_evaluate(i) if isinstance(i, Node) else None for i in index)
    if not (isinstance(batch, _Index) and isinstance(keys, _Index)):
        return None
    if (batch.dim, keys.dim) != (-4, -1) or not (static_eq(batch.offset, 0) and static_eq(keys.offset, 0)):
        return None
    batch_size, key_size = value(index[0]).shape[-4], value(index[1]).shape[-1]
    if not (static_eq(batch_size, ev.shape[0]) and static_eq(key_size, ev.shape[1])):
        return None
    return Predicate() if _all_true(pad) else Predicate(padding=(pad,))


def _all_true(node) -> bool:
    """A boolean tensor that is all True by construction: (a cast of) ``torch.ones`` / ``ones_like`` /
    ``new_ones`` / ``full(.., 1)``, as models build the padding mask of an unpadded batch."""
    for _ in range(4):
        if not isinstance(node, Node):
            return False
        if node.op == "call_function" and node.target in (torch.ones, torch.ones_like):
            return True
        if node.op == "call_method" and node.target == "new_ones":
            return True
        if node.op == "call_function" and node.target is torch.full:
            fill = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
            return isinstance(fill, (int, float)) and fill != 0
        if node.op == "call_method" and node.target in ("to", "bool", "int", "long", "float"):
            node = node.args[0]
            continue
        return False
    return False


def comparison(mask: Node, lengths) -> Optional[Predicate]:
    """The ``Predicate`` ``mask`` provably equals over scores whose last two dims are ``lengths`` = (queries,
    keys), or None.  The mask must have exactly those two sizes: a size-1 dimension would be broadcast,
    repeating one index value instead of enumerating the queries or keys (a padding-only predicate may have a
    size-1 query dimension)."""
    result = _evaluate(mask)
    if not isinstance(result, Predicate):
        return None
    shape = value(mask).shape
    if len(shape) < 2 or not static_eq(shape[-1], lengths[1]):
        return None
    if (result.structured or not result.padding) and not static_eq(shape[-2], lengths[0]):
        return None
    return result
