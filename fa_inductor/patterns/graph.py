"""Reading Dynamo's torch-level FX graphs: what a node computes, independent of how the code spelled it.

Dynamo records ``q @ k`` as ``operator.matmul``, ``torch.matmul(q, k)`` as ``torch.matmul`` and ``q.matmul(k)``
as a ``call_method``; ``kind(node)`` maps all of these to one name ("matmul").  Nodes carry fake tensors in
``meta["example_value"]``, read through ``value(node)``.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["kind", "value", "arg", "only_user", "is_tensor_node", "location", "static_eq", "SCALAR_TYPES"]

SCALAR_TYPES = (int, float)
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"

_FUNCTIONS = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm", torch.einsum: "einsum",
    torch.baddbmm: "baddbmm",
    torch.softmax: "softmax", F.softmax: "softmax", torch.exp: "exp", torch.amax: "amax", torch.max: "max",
    torch.sum: "sum",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    # in-place spellings (``scores /= math.sqrt(d)``) on intermediates compute the same values
    operator.imul: "mul", operator.itruediv: "div", operator.iadd: "add",
    operator.getitem: "getitem", operator.invert: "invert",
    torch.where: "where", torch.masked_fill: "masked_fill", torch.triu: "triu", torch.tril: "tril",
    torch.ones: "ones", torch.full: "full", torch.ones_like: "ones_like", operator.eq: "eq", torch.eq: "eq",
    torch.logical_not: "logical_not", torch.transpose: "transpose", torch.permute: "permute",
    torch.reshape: "reshape", torch.repeat_interleave: "repeat_interleave", torch.unsqueeze: "unsqueeze",
    F.dropout: "dropout", torch.dropout: "dropout",
    F.scaled_dot_product_attention: "sdpa", torch.tanh: "tanh", F.tanh: "tanh",
}

_METHODS = {
    "matmul": "matmul", "bmm": "bmm", "softmax": "softmax", "exp": "exp", "amax": "amax", "max": "max",
    "sum": "sum", "mul": "mul", "div": "div", "__truediv__": "div", "true_divide": "div", "add": "add",
    "sub": "sub", "masked_fill": "masked_fill", "masked_fill_": "masked_fill", "triu": "triu", "tril": "tril",
    "eq": "eq", "logical_not": "logical_not", "__invert__": "invert", "bitwise_not": "invert",
    "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "to": "cast", "type": "cast",
    "type_as": "cast", "bool": "cast",
    "transpose": "transpose", "permute": "permute", "view": "reshape", "reshape": "reshape",
    "contiguous": "contiguous", "expand": "expand", "repeat_interleave": "repeat_interleave",
    "unsqueeze": "unsqueeze", "repeat": "repeat", "tanh": "tanh",
    # Under a TorchFunctionMode (e.g. ``with torch.device(...)``) Dynamo records operators as dunder methods.
    "__matmul__": "matmul", "__mul__": "mul", "__rmul__": "mul", "__add__": "add", "__radd__": "add",
    "__sub__": "sub", "__eq__": "eq", "__getitem__": "getitem",
    "__itruediv__": "div", "__imul__": "mul", "__iadd__": "add", "div_": "div", "mul_": "mul", "add_": "add",
}


def kind(node: Any) -> Optional[str]:
    """A spelling-independent name for what ``node`` computes, or None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
        if name is None and getattr(node.target, "__name__", None) == "scaled_dot_product_attention":
            name = "sdpa"  # torch._C._nn.scaled_dot_product_attention
        return name
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def value(node: Any):
    """The fake tensor (or symbolic/constant scalar) Dynamo recorded for ``node``; constants pass through."""
    if isinstance(node, Node):
        return node.meta.get("example_value")
    return node


def is_tensor_node(node: Any) -> bool:
    return isinstance(node, Node) and isinstance(value(node), torch.Tensor)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, positional or by keyword (call_method counts ``self`` as index 0)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def static_eq(a, b) -> bool:
    """Whether two sizes are provably equal without adding a guard (symbolic sizes included)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(a == b))


def location(node: Node) -> str:
    """'file.py:LINE in fn' of the user code that created ``node`` (from Dynamo's stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    user_frames = [f for f in frames if _TORCH_DIR not in f]
    frames = user_frames or frames
    if not frames:
        return "<unknown>"
    # 'File "/path/model.py", line 12, in forward'
    parts = frames[-1].split(",")
    path = parts[0][len("File "):].strip().strip('"')
    line = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
    fn = parts[2].strip().replace("in ", "") if len(parts) > 2 else "?"
    return f"{path.rsplit('/', 1)[-1]}:{line} in {fn}"
