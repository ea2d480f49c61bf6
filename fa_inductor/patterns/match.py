"""The structural attention matcher.

Anchored on each softmax (``torch.softmax``, ``F.softmax``, ``Tensor.softmax``, or ``exp(x - amax) / sum`` by
hand) and on each ``F.scaled_dot_product_attention`` call, the matcher walks the graph upward to the score
product and downward to the product with V:

    scores = Q @ K^T            matmul / @ / bmm / einsum / baddbmm(beta=0), any transpose of K
    scores = scores * c, / c    a Python number, or a 0-d tensor (folded into Q)
    scores = mask(scores)       causal masks built in the graph (triu/tril of ones, -inf or finfo.min fill)
    probs  = softmax(scores.float(), -1).to(dtype)
    probs  = dropout(probs)     only when it is the identity (eval mode or p = 0)
    out    = probs @ V          K/V head repetition (expand+reshape, repeat_interleave, repeat) folded into GQA

It proves the rewrite exact before accepting: softmax over the key axis, every intermediate used only inside
the pattern, shapes/dtypes/devices the op supports, masks whose meaning is known for every length.  Anything
else raises ``Miss`` with a reason slug; the graph is then left as it was.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Union

import torch
from torch.fx import Node

from ..attention import fallback_reason
from ..config import Settings
from .graph import SCALAR_TYPES, arg, is_tensor_node, kind, only_user, static_eq, value
from .masks import Predicate, comparison, is_prefix, negate

__all__ = ["Miss", "AttentionMatch", "anchors", "match_anchor"]

MATMULS = ("matmul", "bmm", "einsum", "baddbmm")


class Miss(Exception):
    """The subgraph at an anchor is not (provably) an attention the op computes exactly."""

    def __init__(self, reason: str, detail: str = "", form: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.form = reason, detail, form


@dataclasses.dataclass
class AttentionMatch:
    out: Node                       # the node whose uses are replaced
    query: Node
    key: Node                       # [..., N, D] (after un-transposing)
    key_needs_transpose: bool       # ``key`` is K^T: insert a transpose(-2, -1) view
    value: Node
    scale: Optional[float]          # None: 1/sqrt(D)
    scale_tensors: list             # [(op, 0-d tensor node)] applied to the query, op in {"mul", "div"}
    is_causal: bool
    bottom_right: bool
    enable_gqa: bool
    gqa_tiled: bool                 # K/V heads repeated with Tensor.repeat (head h reads h % HK)
    cast_to: Optional[torch.dtype]  # autocast: run the op on q/k/v cast to this dtype
    form: str
    family: str
    nodes: list                     # pattern nodes, removable once unused
    mask: Optional[Node] = None     # a mask tensor the op loads: boolean (True = attend) or additive float
    mask_invert: bool = False       # ``mask`` is True where masked: the op gets logical_not(mask)
    nan_empty_rows: bool = False    # a plain softmax over a row of -inf gives NaN: so must the replacement
    window: tuple = (-1, -1)        # lifted sliding window (left, right); -1 unbounded
    mask_index: Optional[tuple] = None  # indexing that views ``mask`` as [B, 1, 1, N] (a lifted padding vector)
    softcap: float = 0.0            # Gemma 2 logit capping, cap * tanh(scores / cap), before the mask
    dropout_p: float = 0.0          # dropout on the probabilities (training), drawn by the kernels' Philox RNG


# --- anchors ----------------------------------------------------------------------------------------------

def _manual_softmax_input(node: Node) -> Optional[tuple[Node, int, list]]:
    """``exp(x - amax(x, d, keepdim)) / sum(exp(..), d, keepdim)`` -> (x, d, internal nodes), else None."""
    if kind(node) != "div" or len(node.args) != 2:
        return None
    num, den = node.args
    if kind(num) != "exp" or kind(den) != "sum" or den.args[0] is not num:
        return None
    sub = num.args[0]
    if kind(sub) != "sub" or len(sub.args) != 2:
        return None
    x, peak = sub.args
    peak_nodes = [peak]
    if kind(peak) == "getitem" and kind(peak.args[0]) == "max" and peak.args[1] == 0:
        peak_nodes.append(peak.args[0])
        peak = peak.args[0]
    if kind(peak) not in ("amax", "max") or peak.args[0] is not x:
        return None
    dims = [arg(peak, 1, "dim"), arg(den, 1, "dim")]
    keep = [arg(peak, 2, "keepdim", False), arg(den, 2, "keepdim", False)]
    if not all(keep) or any(isinstance(d, (list, tuple)) and len(d) != 1 for d in dims):
        return None
    dims = [d[0] if isinstance(d, (list, tuple)) else d for d in dims]
    ndim = value(x).dim()
    if dims[0] is None or dims[1] is None or dims[0] % ndim != dims[1] % ndim:
        return None
    if set(num.users) != {den, node} or set(x.users) != {sub, peak}:
        return None
    return x, dims[0], [node, den, num, sub, *peak_nodes]


def anchors(graph) -> list[Node]:
    """Softmax nodes (library or hand-written) and SDPA calls, in graph order."""
    found = []
    for node in graph.nodes:
        k = kind(node)
        if k in ("softmax", "sdpa") or (k == "div" and _manual_softmax_input(node) is not None):
            found.append(node)
    return found


# --- helpers ----------------------------------------------------------------------------------------------

def _scalar(x) -> Optional[Union[float, Node]]:
    """A Python number, or a node holding a 0-d tensor or a symbolic float (Dynamo passes float attributes such
    as a module's ``scaling`` as SymFloat inputs); None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, SCALAR_TYPES):
        return float(x)
    if is_tensor_node(x) and value(x).dim() == 0:
        return x
    if isinstance(x, Node) and isinstance(value(x), (torch.SymFloat, torch.SymInt)):
        return x
    return None


def _floating(node: Node) -> bool:
    """``node`` yields a floating-point tensor (a cast that keeps values numeric, not a cast to bool/int)."""
    ev = value(node)
    return isinstance(ev, torch.Tensor) and ev.is_floating_point()


def _unwrap_views(node, allowed=("reshape", "unsqueeze", "expand", "contiguous")) -> Node:
    """Skip broadcasting-only views of a mask: unsqueeze, None-indexing, expand, reshape to add unit dims."""
    while True:
        k = kind(node)
        if k in allowed:
            node = node.args[0]
        elif k == "getitem" and isinstance(node.args[1], tuple) and all(
                s is None or s == slice(None) or s is Ellipsis for s in node.args[1]):
            node = node.args[0]
        elif k == "cast" and value(node) is not None and value(node).dtype == torch.bool:
            node = node.args[0]
        else:
            return node


def _ones_of(node, rows, cols) -> bool:
    """``node`` is an all-ones (or all-True) [rows, cols] tensor built in the graph."""
    k = kind(node)
    ev = value(node)
    if k not in ("ones", "full", "ones_like") or not isinstance(ev, torch.Tensor) or ev.dim() != 2:
        return False
    if k == "full" and arg(node, 1, "fill_value") not in (1, 1.0, True):
        return False
    return static_eq(ev.shape[0], rows) and static_eq(ev.shape[1], cols)


def _triangle(node, rows, cols) -> Optional[tuple[str, int]]:
    """``triu/tril(ones[rows, cols], diagonal)`` -> ('triu'|'tril', diagonal)."""
    k = kind(node)
    if k not in ("triu", "tril") or not _ones_of(_unwrap_views(node.args[0], ("cast",)), rows, cols):
        return None
    diagonal = arg(node, 1, "diagonal", 0)
    return (k, diagonal) if isinstance(diagonal, int) else None


@dataclasses.dataclass(frozen=True)
class Lifted:
    """A mask proven to be structure plus key padding: what the op gets instead of the mask tensor."""

    is_causal: bool = False
    bottom_right: bool = False
    window: tuple = (-1, -1)          # (left, right) beyond the causal flag; -1 unbounded
    padding: Optional[Node] = None    # a [B, N] boolean node, True = attend
    empty_rows: bool = False          # some query row may see no key at all

    @property
    def parts(self) -> list:
        names = ["causal_mask"] if self.is_causal else []
        if self.window != (-1, -1):
            names.append("window_mask")
        if self.padding is not None:
            names.append("padding_mask")
        return names


def _const(x) -> Optional[int]:
    """An int, or a symbolic int that simplifies to a constant; else None."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, torch.SymInt) and x.node.expr.is_number:
        return int(x.node.expr)
    return None


def _lifted(pred: Predicate, shape, finite_fill: bool) -> Lifted:
    """The op's flags for a mask equal to ``pred`` over scores of ``shape``, or Miss.

    The window is aligned top-left (query i's diagonal is key i) or, with at most as many queries as keys,
    bottom-right (key i + N - M).  ``finite_fill``: the masked scores are a finite number (finfo.min), so a row
    with no visible key is an ordinary softmax in eager; only masks under which every row keeps a key lift."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if pred.negated:
        raise Miss("mask_tensor", "the mask is the complement of a conjunction of index conditions")
    rows, cols = shape[-2], shape[-1]
    alignments = [(False, 0)]
    if statically_known_true(rows <= cols) and not static_eq(cols - rows, 0):
        alignments.append((True, cols - rows))
    for bottom_right, offset in alignments:
        right = _const(pred.upper - offset) if pred.upper is not None else -1
        left = _const(offset - pred.lower) if pred.lower is not None else -1
        if right is None or left is None or (pred.upper is not None and right < 0) \
                or (pred.lower is not None and left < 0):
            continue
        break
    else:
        raise Miss("mask_tensor", f"index-comparison mask (key <= query + {pred.upper}, key >= query + "
                                  f"{pred.lower}) that is no top-left or bottom-right aligned causal/window mask")
    empty_rows = left >= 0 and not bottom_right and not statically_known_true(rows <= cols + left)
    padding = None
    if pred.padding:
        pad = value(pred.padding[0])
        if len(pred.padding) > 1 or len(shape) != 4 or not (static_eq(pad.shape[0], shape[0])
                                                            or static_eq(pad.shape[0], 1)):
            raise Miss("mask_tensor", "key-padding mask that is not one [B, N] vector over 4-D scores")
        padding, empty_rows = pred.padding[0], True
    if finite_fill and empty_rows:
        raise Miss("mask_tensor", "finite-fill (finfo.min) mask whose fully masked rows are uniform in eager")
    return Lifted(right == 0, bottom_right, (left, -1 if right == 0 else right), padding, empty_rows)


def _lift_condition(mask: Node, masked_where_true: bool, shape, finite_fill: bool) -> Lifted:
    """A boolean mask (True where masked, or where kept) over scores of ``shape``, provably made of structure
    and key padding -> Lifted, else Miss."""
    rows, cols = shape[-2], shape[-1]
    node = _unwrap_views(mask)
    negated = False
    while kind(node) in ("logical_not", "invert") or (kind(node) == "eq" and node.args[1] in (0, False)):
        negated = not negated
        node = _unwrap_views(node.args[0])
    tri = _triangle(node, rows, cols)
    if tri is not None:
        # True entries of triu(.., d): j >= i + d; of tril(.., d): j <= i + d.
        which, diagonal = tri
        pred = Predicate(upper=diagonal) if which == "tril" else Predicate(lower=diagonal)
        if negated:
            pred = negate(pred)
    else:
        pred = comparison(mask, (rows, cols))
        if pred is None:
            raise Miss("mask_tensor", "the mask is not provably causal, a window or key padding (a triangle of "
                                      "ones or index comparisons built in the graph)")
    if masked_where_true:
        pred = negate(pred)
    return _lifted(pred, shape, finite_fill)


def _fill_is_minus_inf(fill) -> bool:
    return isinstance(fill, SCALAR_TYPES) and (fill == -math.inf or fill <= -1e38)


def _is_zero(x) -> bool:
    """A literal 0, or a node that is zeros by construction: ``torch.zeros(..)``, ``zeros_like``, ``new_zeros``,
    ``torch.tensor(0.0, ..)`` or ``torch.full(.., 0)`` (transformers builds its masks' 0 each of these ways,
    depending on the device)."""
    if isinstance(x, Node):
        if x.op == "call_function" and x.target in (torch.zeros, torch.zeros_like):
            return True
        if x.op == "call_method" and x.target == "new_zeros":
            return True
        if x.op == "call_function" and x.target is torch.tensor:
            return bool(x.args) and _is_zero(x.args[0])
        if x.op == "call_function" and x.target is torch.full:
            return _is_zero(arg(x, 1, "fill_value"))
        return False
    return isinstance(x, SCALAR_TYPES) and not isinstance(x, bool) and x == 0


def _additive_comparison(mask: Node, scores_shape) -> Optional[Lifted]:
    """``where(cond, 0, -inf)`` (or ``where(cond, -inf, 0)``; finfo.min for -inf) of a liftable condition ->
    Lifted, else None.  The added mask must not broadcast the scores' query or key dimension."""
    lengths = tuple(scores_shape[-2:])
    shape = value(mask).shape if isinstance(mask, Node) and value(mask) is not None else ()
    if len(shape) < 2 or not static_eq(shape[-1], lengths[1]):
        return None
    node = mask
    while kind(node) in ("getitem", "expand") and (kind(node) == "expand" or isinstance(node.args[1], tuple)):
        if kind(node) == "getitem" and not all(i is None or i is Ellipsis or is_prefix(i) for i in node.args[1]):
            return None
        before, after = value(node.args[0]).shape, value(node).shape
        if kind(node) == "expand" and not all(static_eq(before[d], after[d]) for d in (-2, -1)):
            return None  # broadcasting a query or key dimension
        node = node.args[0]
    if kind(node) != "where" or len(node.args) != 3:
        return None
    cond, a, b = node.args
    if _is_zero(a) and _fill_is_minus_inf(b):
        masked_where_true, fill = False, b
    elif _is_zero(b) and _fill_is_minus_inf(a):
        masked_where_true, fill = True, a
    else:
        return None
    try:
        return _lift_condition(cond, masked_where_true, scores_shape, fill != -math.inf)
    except Miss:
        return None


def _softcap(node: Node):
    """``cap * tanh(x / cap)`` (or ``tanh(x * (1 / cap)) * cap``) with a positive number cap -> (cap, x, nodes);
    None for anything else."""
    a, b = node.args
    tanh_node, cap = (a, _scalar(b)) if isinstance(a, Node) and kind(a) == "tanh" else (b, _scalar(a))
    if not isinstance(tanh_node, Node) or kind(tanh_node) != "tanh" or not isinstance(cap, float) or cap <= 0:
        return None
    inner = tanh_node.args[0]
    if not isinstance(inner, Node) or kind(inner) not in ("mul", "div") or len(inner.args) != 2:
        return None
    x, factor = inner.args
    factor = _scalar(factor)
    if not isinstance(factor, float) or not isinstance(x, Node):
        return None
    divisor = factor if kind(inner) == "div" else (1.0 / factor if factor else 0.0)
    if not math.isclose(divisor, cap, rel_tol=1e-6):
        return None
    if only_user(tanh_node) is None or only_user(inner) is None:
        raise Miss("intermediate_reused", "the capped scores are used outside the attention")
    return cap, x, [node, tanh_node, inner]


def _loadable(mask, scores_shape, boolean: bool) -> bool:
    """Whether ``mask`` is a tensor the op can load as it is: boolean (or floating, for an additive bias) and
    broadcastable to the scores without growing them."""
    ev = value(mask) if isinstance(mask, Node) else None
    if not isinstance(ev, torch.Tensor) or (ev.dtype == torch.bool) != boolean:
        return False
    if not boolean and not ev.is_floating_point():
        return False
    try:
        return len(ev.shape) <= len(scores_shape) and all(
            static_eq(a, b) for a, b in zip(torch.broadcast_shapes(ev.shape, scores_shape), scores_shape))
    except (RuntimeError, TypeError):
        return False


def _reaches_product(node, steps: int = 8) -> bool:
    """``node`` is (casts, scales and masks above) a score product: the scores side of an addition."""
    for _ in range(steps):
        if not isinstance(node, Node):
            return False
        k = kind(node)
        if k in MATMULS:
            return True
        if k not in ("cast", "mul", "div", "masked_fill", "where", "add"):
            return False
        node = node.args[0] if k != "where" else node.args[1]
    return False


def _parse_mask(node: Node, scores: Node):
    """A masking node -> (scores input, Lifted or None, (mask tensor, invert) or None).  Masks provably made of
    causal/window structure and key padding become the op's flags (and a [B, 1, 1, N] padding vector); other
    -inf masks and additive biases are loaded as tensors; anything else raises Miss."""
    k = kind(node)
    shape = tuple(value(scores).shape)
    if k in ("masked_fill", "where"):
        if k == "masked_fill":
            target, cond, fill = node.args[0], arg(node, 1, "mask"), arg(node, 2, "value")
            masked_where_true = True
            if not _fill_is_minus_inf(fill):
                raise Miss("mask_tensor", f"masked_fill with {fill!r}: only -inf / finfo.min fills are exact")
        else:
            cond, a, b = node.args[:3]
            if isinstance(a, Node) and not isinstance(b, Node) and _fill_is_minus_inf(b):
                target, masked_where_true, fill = a, False, b
            elif isinstance(b, Node) and not isinstance(a, Node) and _fill_is_minus_inf(a):
                target, masked_where_true, fill = b, True, a
            else:
                raise Miss("mask_tensor", "torch.where mask with a non -inf fill")
        try:
            return target, _lift_condition(cond, masked_where_true, shape, fill != -math.inf), None
        except Miss:
            if fill == -math.inf and _loadable(cond, shape, boolean=True):
                return target, None, (cond, masked_where_true)
            raise
    # additive: scores + triu(full(-inf), 1), or scores + where(causal, 0, finfo.min), or any bias tensor
    a, b = node.args[:2]
    mask_node, target = (a, b) if _reaches_product(b) and not _reaches_product(a) else (b, a)
    lifted = _additive_comparison(mask_node, shape)
    if lifted is not None:
        return target, lifted, None
    tri = _unwrap_views(mask_node)
    if kind(tri) == "triu" and kind(tri.args[0]) == "full" and _fill_is_minus_inf(arg(tri.args[0], 1, "fill_value")):
        ev = value(tri.args[0])
        rows, cols = value(scores).shape[-2:]
        if ev.dim() == 2 and static_eq(ev.shape[0], rows) and static_eq(ev.shape[1], cols):
            diagonal = arg(tri, 1, "diagonal", 0)
            if isinstance(diagonal, int):
                return target, _lifted(Predicate(upper=diagonal - 1), shape, finite_fill=False), None
    if _loadable(mask_node, shape, boolean=False):
        if value(node).dtype == torch.float16:
            # Eager adds in fp16, where a finite mask does not swamp the scores of a fully masked row; the
            # kernels add in fp32 (math SDPA's precision), so such rows would differ.
            raise Miss("mask_tensor", "additive mask on fp16 scores (eager rounds the masked scores in fp16)")
        return target, None, (mask_node, False)
    raise Miss("mask_tensor", "additive operand that is not a floating mask broadcastable to the scores")


# --- the score product ------------------------------------------------------------------------------------

_EINSUM = re.compile(r"^\s*([\w.]+)\s*,\s*([\w.]+)\s*->\s*([\w.]+)\s*$")


def _einsum_split(equation: str):
    m = _EINSUM.match(equation.replace(" ", ""))
    if not m:
        return None
    tokens = [re.findall(r"\.\.\.|\w", part) for part in m.groups()]
    return tokens


def _score_operands(node: Node) -> tuple[Node, Node, bool, Optional[float]]:
    """Score product -> (Q, K-or-K^T, is_transposed, alpha)."""
    k = kind(node)
    if k in ("matmul", "bmm"):
        return node.args[0], node.args[1], True, None
    if k == "baddbmm":
        beta = arg(node, 3, "beta", 1)
        if beta != 0:
            raise Miss("mask_tensor", "baddbmm with beta != 0 adds a bias tensor")
        alpha = arg(node, 4, "alpha", 1)
        if not isinstance(alpha, SCALAR_TYPES):
            raise Miss("scale", "baddbmm alpha is not a number")
        return node.args[1], node.args[2], True, float(alpha)
    # einsum
    operands = node.args[1:] if len(node.args) > 2 else node.args[1]
    split = _einsum_split(node.args[0]) if isinstance(node.args[0], str) else None
    if split is None or len(operands) != 2:
        raise Miss("not_attention", "einsum that is not a two-operand product")
    a, b, out = split
    if len(a) < 2 or len(b) < 2 or a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        raise Miss("not_attention", f"einsum {node.args[0]!r} is not a batched Q K^T")
    q, d = a[-2], a[-1]
    if b[-1] == d and b[-2] not in (q, d) and out[-2:] == [q, b[-2]]:
        return operands[0], operands[1], False, None
    if b[-2] == d and b[-1] not in (q, d) and out[-2:] == [q, b[-1]]:
        return operands[0], operands[1], True, None
    raise Miss("not_attention", f"einsum {node.args[0]!r} is not a batched Q K^T")


def _value_product(user: Node, probs: Node) -> Optional[Node]:
    """If ``user`` computes probs @ V, return V."""
    k = kind(user)
    if k in ("matmul", "bmm") and user.args[0] is probs:
        return user.args[1]
    if k == "einsum":
        operands = user.args[1:] if len(user.args) > 2 else user.args[1]
        split = _einsum_split(user.args[0]) if isinstance(user.args[0], str) else None
        if split and len(operands) == 2 and operands[0] is probs:
            a, b, out = split
            if (len(a) >= 2 and a[:-2] == b[:-2] == out[:-2] and b[-2] == a[-1] and out[-2] == a[-2]
                    and out[-1] == b[-1] and b[-1] not in a):
                return operands[1]
    return None


def _untranspose(node: Node) -> Optional[Node]:
    """``x.transpose(-2, -1)`` (any spelling of swapping the last two dims) -> x."""
    k = kind(node)
    ev = value(node)
    if not isinstance(ev, torch.Tensor):
        return None
    nd = ev.dim()
    if k == "transpose":
        dims = {arg(node, 1, "dim0") % nd, arg(node, 2, "dim1") % nd}
        return node.args[0] if dims == {nd - 2, nd - 1} else None
    if k == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if list(perm) == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return node.args[0]
    return None


def _unrepeat(node: Node) -> Optional[tuple[Node, int, str]]:
    """Head repetition of a [B, HK, L, E] tensor to [B, HK*G, L, E] -> (x, G, spelling), else None."""
    k = kind(node)
    if k == "repeat_interleave":
        repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        x = node.args[0]
        if isinstance(repeats, int) and isinstance(dim, int) and value(x).dim() == 4 and dim % 4 == 1:
            return x, repeats, "gqa_repeat_interleave"
        return None
    if k == "repeat":
        x = node.args[0]
        repeats = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if value(x).dim() == 4 and len(repeats) == 4 and tuple(repeats[i] for i in (0, 2, 3)) == (1, 1, 1) \
                and isinstance(repeats[1], int):
            return x, repeats[1], "gqa_repeat_tiled"
        return None
    if k == "reshape":
        expanded = node.args[0]
        if kind(expanded) != "expand":
            return None
        inner = expanded.args[0]
        ev, iv = value(expanded), value(inner)
        if ev is None or iv is None or ev.dim() != 5 or iv.dim() != 5 or iv.shape[2] != 1:
            return None
        out = value(node)
        if out.dim() != 4 or not static_eq(out.shape[1], ev.shape[1] * ev.shape[2]):
            return None
        k_inner = kind(inner)
        if k_inner == "unsqueeze" and arg(inner, 1, "dim") in (2, -3):
            return inner.args[0], ev.shape[2], "gqa_expand"
        if k_inner == "getitem" and isinstance(inner.args[1], tuple):
            idx = inner.args[1]
            if len(idx) >= 3 and idx[2] is None and all(s == slice(None) for s in idx[:2]) and all(
                    s == slice(None) or s is Ellipsis for s in idx[3:]):
                return inner.args[0], ev.shape[2], "gqa_expand"
    return None


def _fold_gqa(key: Node, val: Node, settings: Settings):
    """Fold K/V head repetition into the op's grouped-query support when both are repeated alike."""
    if not settings.fold_gqa:
        return key, val, False, None
    rk, rv = _unrepeat(key), _unrepeat(val)
    if rk is None or rv is None or not isinstance(rk[1], int) or rk[1] != rv[1]:
        return key, val, False, None
    if (rk[2] == "gqa_repeat_tiled") != (rv[2] == "gqa_repeat_tiled"):
        return key, val, False, None  # K and V repeated in different head orders
    return rk[0], rv[0], True, rk[2]


def _check_operands(q: Node, k: Node, v: Node, kt: bool, enable_gqa: bool, out: Node, settings: Settings,
                    scores: Optional[Node] = None) -> Optional[torch.dtype]:
    """Raises Miss unless the op computes this attention; returns the dtype to cast q/k/v to under autocast."""
    qv, kv, vv = value(q), value(k), value(v)
    if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
        raise Miss("not_attention", "operands are not tensors")
    if kt:
        kv = kv.transpose(-2, -1)
    if not (qv.dim() == kv.dim() == vv.dim() and qv.dim() in (3, 4)):
        raise Miss("unsupported_rank", f"operands are {qv.dim()}-D, {kv.dim()}-D, {vv.dim()}-D (3-D or 4-D run the kernels)")
    out_dtype = value(out).dtype
    cast_to = None
    if not (qv.dtype == kv.dtype == vv.dtype == out_dtype):
        # Under autocast both products run in the low-precision dtype on cast operands: so does the op.
        lowered = scores is not None and value(scores).dtype == out_dtype in (torch.float16, torch.bfloat16)
        if not (lowered and qv.dtype == kv.dtype == vv.dtype == torch.float32):
            raise Miss("dtype_mismatch", f"query {qv.dtype}, key {kv.dtype}, value {vv.dtype}, output {out_dtype}")
        cast_to = out_dtype
        qv, kv, vv = (t.to(out_dtype) for t in (qv, kv, vv))
    n_keys = kv.shape[-2]
    if settings.min_seq_len and isinstance(n_keys, int) and n_keys < settings.min_seq_len:
        raise Miss("below_min_seq_len", f"{n_keys} keys < min_seq_len {settings.min_seq_len}")
    reason = fallback_reason(qv, kv, vv)
    if reason:
        raise Miss("kernel_unsupported", reason)
    if enable_gqa and qv.shape[-3] % kv.shape[-3] != 0:
        raise Miss("not_attention", "query heads are not a multiple of key heads")
    return cast_to


# --- the walks --------------------------------------------------------------------------------------------

def _single_user(node: Node, what: str) -> Node:
    user = only_user(node)
    if user is None:
        raise Miss("intermediate_reused", f"the {what} are used outside the attention "
                                          f"({', '.join(sorted(u.name for u in node.users))})")
    return user


def match_anchor(anchor: Node, settings: Settings) -> AttentionMatch:
    if kind(anchor) == "sdpa":
        return _match_sdpa(anchor, settings)
    return _match_softmax(anchor, settings)


def _match_softmax(anchor: Node, settings: Settings) -> AttentionMatch:
    parts: list[str] = []
    try:
        return _walk_softmax(anchor, settings, parts)
    except Miss as miss:
        if not miss.form:  # report how far the spelling was recognised
            miss.form = "+".join(dict.fromkeys(parts)) or "softmax"
        raise


def _walk_softmax(anchor: Node, settings: Settings, parts: list) -> AttentionMatch:
    nodes: list[Node] = [anchor]
    manual = _manual_softmax_input(anchor) if kind(anchor) == "div" else None
    if manual is not None:
        x, dim, internal = manual
        nodes = internal
        parts.append("manual_softmax")
    else:
        x, dim = anchor.args[0], arg(anchor, 1, "dim")
        if anchor.kwargs.get("dtype") is not None:
            parts.append("softmax_dtype")
    if dim is None:
        raise Miss("softmax_not_over_keys", "softmax without an explicit dim")
    ndim = value(x).dim()
    if not isinstance(dim, int) or dim % ndim != ndim - 1:
        raise Miss("softmax_not_over_keys", f"softmax over dim {dim} of a {ndim}-D tensor, not the last (key) axis")

    # Upward: casts, scales, masks, down to the score product.  (A hand-written softmax reads its input twice;
    # _manual_softmax_input has checked that those are its only users.)
    node, scales, scale_tensors, lifted, checked = x, [], [], None, manual is not None
    tensor_mask, softcap = None, 0.0
    while True:
        if not checked and only_user(node) is None:
            raise Miss("intermediate_reused", f"the scores ({node.name}) are used outside the attention")
        checked = False
        k = kind(node)
        if k == "cast" and _floating(node):
            parts.append("cast_scores")
            nodes.append(node)
            node = node.args[0]
        elif k == "mul" and len(node.args) == 2 and _softcap(node) is not None:
            cap, inner, cap_nodes = _softcap(node)
            if softcap or scales or scale_tensors:
                raise Miss("scale", "a scale or a second cap applied after logit capping")
            softcap = cap
            parts.append("softcap")
            nodes.extend(cap_nodes)
            node = inner
        elif k in ("mul", "div") and len(node.args) == 2:
            a, b = node.args
            sa, sb = _scalar(a), _scalar(b)
            if sb is not None and is_tensor_node(a) and value(a).dim() >= 2:
                factor, node_next = sb, a
            elif k == "mul" and sa is not None and is_tensor_node(b) and value(b).dim() >= 2:
                factor, node_next = sa, b
            else:
                raise Miss("not_attention", f"{k} by a tensor that is not a scalar")
            if isinstance(factor, float):
                scales.append(factor if k == "mul" else 1.0 / factor)
            else:
                scale_tensors.append((k, factor))
            parts.append("scale")
            nodes.append(node)
            node = node_next
        elif k in ("masked_fill", "where", "add"):
            # Scales met so far were applied after this mask: -inf * c must stay -inf.
            if scale_tensors or any(c <= 0 for c in scales):
                raise Miss("scale", "a scale applied after the mask must be a positive number")
            node_next, new_lifted, new_tensor = _parse_mask(node, node)
            if new_tensor is not None and k == "add" and any(c != 1.0 for c in scales):
                raise Miss("scale", "a scale applied after an additive mask scales the mask too")
            # Masks commute (each adds to the scores or sets them to -inf): one lifted to flags and one tensor
            # (e.g. T5's causal mask after its position bias) combine; the op loads at most one tensor.
            tensors = [t for t in (tensor_mask, new_tensor) if t is not None]
            tensors += [x for x in (lifted, new_lifted) if x is not None and x.padding is not None]
            if (lifted is not None and new_lifted is not None) or len(tensors) > 1:
                raise Miss("mask_tensor", "more than one mask tensor (or two structured masks)")
            lifted, tensor_mask = lifted or new_lifted, tensor_mask or new_tensor
            parts.extend(new_lifted.parts if new_lifted is not None
                         else ["bool_mask" if k != "add" else "additive_mask"])
            nodes.append(node)
            node = node_next
        elif k in MATMULS:
            break
        else:
            raise Miss("not_attention", f"the softmax input comes from {k or node.op + ' ' + str(node.target)}, "
                                        "not a score product")
    matmul = node
    if only_user(matmul) is None:
        raise Miss("intermediate_reused", "the scores are used outside the attention")
    nodes.append(matmul)
    family = kind(matmul) if manual is None else "manual_softmax"
    q, k_node, key_t, alpha = _score_operands(matmul)
    if alpha is not None:
        scales.append(alpha)
    parts.insert(0, kind(matmul))

    # Downward: casts, dropout, then the product with V.
    node, dropout_p = anchor, 0.0
    while True:
        user = _single_user(node, "attention probabilities")
        k = kind(user)
        if k == "cast" and _floating(user):
            parts.append("cast_probs")
        elif k == "dropout":
            p = arg(user, 1, "p", 0.5)
            training = user.kwargs.get("training", user.kwargs.get("train", user.args[2] if len(user.args) > 2 else True))
            if training and p:
                if not isinstance(training, bool) or not isinstance(p, SCALAR_TYPES) or not 0 < p <= 1 or dropout_p:
                    raise Miss("dropout_training", f"dropout p={p!r}, training={training!r}: not constants")
                dropout_p = float(p)
                parts.append("dropout")
            else:
                parts.append("dropout_eval")
        else:
            v = _value_product(user, node)
            if v is None:
                raise Miss("not_attention", f"the probabilities feed {k or user.target}, not a product with V")
            out = user
            break
        nodes.append(user)
        node = user

    key = _untranspose(k_node) if key_t else k_node
    key_needs_transpose = key_t and key is None
    if key is None:
        key = k_node
    gqa_key = key if not key_needs_transpose else None
    enable_gqa = False
    if gqa_key is not None:
        key, v, enable_gqa, spelling = _fold_gqa(gqa_key, v, settings)
        if enable_gqa:
            parts.append(spelling)
    cast_to = _check_operands(q, key, v, key_needs_transpose, enable_gqa, out, settings, scores=matmul)
    if cast_to is not None:
        parts.append("autocast")

    lifted = lifted or Lifted()
    scale = math.prod(scales) if scales else 1.0
    form = "+".join(dict.fromkeys(parts))
    if family not in settings.forms:
        raise Miss("form_disabled", f"form family {family!r} is switched off", form)
    return AttentionMatch(out=out, query=q, key=key, key_needs_transpose=key_needs_transpose, value=v,
                          scale=scale, scale_tensors=scale_tensors, is_causal=lifted.is_causal,
                          bottom_right=lifted.bottom_right, window=lifted.window,
                          enable_gqa=enable_gqa, gqa_tiled="gqa_repeat_tiled" in parts, cast_to=cast_to, form=form,
                          family=family, nodes=nodes + [out], **_mask_fields(lifted, tensor_mask),
                          nan_empty_rows=tensor_mask is not None or lifted.empty_rows,
                          softcap=softcap, dropout_p=dropout_p)


def _mask_fields(lifted: Lifted, tensor_mask) -> dict:
    """AttentionMatch's mask fields: a loaded (mask, invert) tensor, or a lifted padding vector as [B, 1, 1, N]."""
    if tensor_mask is not None:
        return {"mask": tensor_mask[0], "mask_invert": bool(tensor_mask[1])}
    if lifted.padding is not None:
        return {"mask": lifted.padding, "mask_index": (slice(None), None, None, slice(None))}
    return {}


def _sdpa_lift(mask, scores_shape) -> Optional[Lifted]:
    """SDPA ``attn_mask`` provably structure and key padding: a boolean mask (True = attend) or its additive
    form; None for any other mask."""
    if not isinstance(mask, Node):
        return None
    if value(mask).dtype == torch.bool:
        try:
            return _lift_condition(mask, False, scores_shape, finite_fill=False)
        except Miss:
            return None
    return _additive_comparison(mask, scores_shape)


def _match_sdpa(anchor: Node, settings: Settings) -> AttentionMatch:
    q, k, v = (arg(anchor, i, name) for i, name in enumerate(("query", "key", "value")))
    mask, dropout_p = arg(anchor, 3, "attn_mask"), arg(anchor, 4, "dropout_p", 0.0)
    is_causal, scale, enable_gqa = (arg(anchor, 5, "is_causal", False), arg(anchor, 6, "scale"),
                                    arg(anchor, 7, "enable_gqa", False))
    parts = ["sdpa"]
    lifted = Lifted(is_causal=is_causal) if isinstance(is_causal, bool) else Lifted()
    tensor_mask = None
    if mask is not None:
        scores_shape = tuple(value(q).shape[:-1]) + (value(k).shape[-2],)
        if is_causal:
            raise Miss("mask_tensor", "SDPA with both attn_mask and is_causal (an error in eager)", "sdpa")
        lifted = _sdpa_lift(mask, scores_shape)
        if lifted is not None:
            parts.extend(lifted.parts)
        else:
            lifted = Lifted()
            boolean = isinstance(mask, Node) and value(mask) is not None and value(mask).dtype == torch.bool
            if not _loadable(mask, scores_shape, boolean):
                raise Miss("mask_tensor", "SDPA attn_mask that is not a bool/float tensor broadcastable to the "
                                          "scores", "sdpa")
            tensor_mask = mask
            parts.append("bool_mask" if boolean else "additive_mask")
    if not isinstance(dropout_p, SCALAR_TYPES) or isinstance(dropout_p, bool) or not 0 <= dropout_p <= 1:
        raise Miss("dropout_training", f"SDPA dropout_p={dropout_p!r} is not a constant in [0, 1]", "sdpa")
    if dropout_p:
        parts.append("dropout")
    scale_tensors = []
    if isinstance(scale, Node) and isinstance(value(scale), torch.SymFloat):
        scale_tensors, scale = [("mul", scale)], 1.0  # a symbolic float scale is folded into the query
        parts.append("symbolic_scale")
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, SCALAR_TYPES)):
        raise Miss("dynamic_argument", "SDPA is_causal/scale depend on dynamic shapes (not constants)", "sdpa")
    if is_causal and "causal_mask" not in parts:
        parts.append("causal")
    if not enable_gqa:
        k, v, enable_gqa, spelling = _fold_gqa(k, v, settings)
        if enable_gqa:
            parts.append(spelling)
    else:
        parts.append("enable_gqa")
    cast_to = _check_operands(q, k, v, False, enable_gqa, anchor, settings, scores=anchor)
    if cast_to is not None:
        parts.append("autocast")
    form = "+".join(parts)
    if "sdpa" not in settings.forms:
        raise Miss("form_disabled", "form family 'sdpa' is switched off", form)
    return AttentionMatch(out=anchor, query=q, key=k, key_needs_transpose=False, value=v,
                          scale=None if scale is None else float(scale), scale_tensors=scale_tensors,
                          is_causal=lifted.is_causal, bottom_right=lifted.bottom_right, window=lifted.window,
                          enable_gqa=enable_gqa, gqa_tiled="gqa_repeat_tiled" in parts, cast_to=cast_to, form=form,
                          family="sdpa", nodes=[anchor], dropout_p=float(dropout_p),
                          **_mask_fields(lifted, (tensor_mask, False) if tensor_mask is not None else None))
