"""Pieces of generated Python source: literals, identifiers, dtype names, and what a tensor
name stands for while forward() is being written. Pure helpers, no torch import."""

from __future__ import annotations

import keyword
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import tensor_shape

__all__ = [
    "FLOAT_DTYPES",
    "INT_END",
    "INT_ONNX_TYPES",
    "NP_TO_TORCH",
    "ONNX_TO_TORCH",
    "RESERVED_LOCALS",
    "Val",
    "attrs",
    "auto_name",
    "flit",
    "lit",
    "node_base",
    "opt_input",
    "paren",
    "same_pads",
    "sanitize",
    "torch_pad",
    "tup",
    "vi_dims",
]

INT_END = 2**31 - 1  # slice bounds at or past this mean "to the end"

FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
NP_TO_TORCH = {
    np.dtype(np.float32): "torch.float32",
    np.dtype(np.float64): "torch.float64",
    np.dtype(np.float16): "torch.float16",
    np.dtype(np.int64): "torch.int64",
    np.dtype(np.int32): "torch.int32",
    np.dtype(np.int16): "torch.int16",
    np.dtype(np.int8): "torch.int8",
    np.dtype(np.uint8): "torch.uint8",
    np.dtype(np.bool_): "torch.bool",
}
ONNX_TO_TORCH = {
    TensorProto.FLOAT: "torch.float32",
    TensorProto.DOUBLE: "torch.float64",
    TensorProto.FLOAT16: "torch.float16",
    TensorProto.BFLOAT16: "torch.bfloat16",
    TensorProto.INT64: "torch.int64",
    TensorProto.INT32: "torch.int32",
    TensorProto.INT16: "torch.int16",
    TensorProto.INT8: "torch.int8",
    TensorProto.UINT8: "torch.uint8",
    TensorProto.BOOL: "torch.bool",
}
INT_ONNX_TYPES = {
    TensorProto.INT64,
    TensorProto.INT32,
    TensorProto.INT16,
    TensorProto.INT8,
    TensorProto.UINT8,
}

# Local names the generated forward() must never shadow.
RESERVED_LOCALS = frozenset(
    set(keyword.kwlist) | {"self", "torch", "nn", "F", "Path", "math", "range", "tuple", "list"}
)


@dataclass
class Val:
    """What a tensor name stands for while generating forward()."""

    kind: str  # "tensor" (a local variable), "const" (numpy value), "shape" (Python ints)
    expr: str = ""
    array: np.ndarray | None = None
    items: list[int | str] | None = None  # shape values: int or Python expression per element
    scalar: bool = False  # shape values: a 0-d value (one Python int)


def vi_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims of a value: int when static, its dim_param when symbolic, None when unknown."""
    shape = tensor_shape(vi)
    return None if shape is None else list(shape)


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Node attributes as plain Python values (strings decoded)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def sanitize(raw: str) -> str:
    """Lower-case Python identifier text from an ONNX name (may be empty)."""
    return re.sub(r"_+", "_", re.sub(r"\W", "_", raw)).strip("_").lower()


def auto_name(name: str) -> bool:
    """True for exporter-generated tensor names that read badly as variables."""
    return (
        not name
        or name.isdigit()
        or "::" in name
        or re.search(r"_output_\d+$", name) is not None
        or re.fullmatch(r"[\W\d_]+", name) is not None
    )


def node_base(node: onnx.NodeProto) -> str:
    """Readable base name of a node: '/layer1/layer1.0/conv1/Conv' -> 'layer1_0_conv1'."""
    if node.name:
        segs = [s for s in node.name.split("/") if s]
        segs = [
            s
            for i, s in enumerate(segs)
            if not (i + 1 < len(segs) and segs[i + 1].startswith(s + "."))
        ]
        if len(segs) > 1 and segs[-1].lower() == node.op_type.lower():
            segs = segs[:-1]
        base = sanitize("_".join(segs))
        if base:
            return base
    for out in node.output:
        if out and not auto_name(out):
            return sanitize(out) or node.op_type.lower()
    return node.op_type.lower()


def flit(value: Any, dtype: Any = np.float32) -> str:
    """Shortest Python literal that round-trips to the same float32 (or float64)."""
    v = np.dtype(dtype).type(value) if np.dtype(dtype) in FLOAT_DTYPES else np.float32(value)
    if np.isnan(v):
        return "float('nan')"
    if np.isinf(v):
        return "float('inf')" if v > 0 else "-float('inf')"
    s = str(v)
    if not any(c in s for c in ".en"):
        s += ".0"
    return s


def lit(arr: np.ndarray) -> str:
    """Python literal of a small constant (scalar or nested list)."""
    if arr.dtype in FLOAT_DTYPES:
        if arr.ndim == 0:
            return flit(arr, arr.dtype)
        return "[" + ", ".join(lit(a) for a in arr) + "]"
    return repr(arr.tolist())


def tup(vals: Sequence[int]) -> str:
    """Compact int-or-tuple literal as PyTorch layer signatures accept."""
    vals = [int(v) for v in vals]
    if len(set(vals)) == 1:
        return str(vals[0])
    return "(" + ", ".join(map(str, vals)) + ")"


def opt_input(node: onnx.NodeProto, index: int) -> str:
    """Name of an optional node input ('' when absent)."""
    return node.input[index] if len(node.input) > index else ""


def paren(item: int | str) -> str:
    """Parenthesize compound shape expressions before combining them."""
    s = str(item)
    return f"({s})" if " " in s else s


def same_pads(
    in_dims: Sequence[int | str | None] | None,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    upper: bool,
) -> list[int]:
    """Explicit ONNX pads (begins + ends) for auto_pad SAME_UPPER/SAME_LOWER."""
    totals = []
    for i, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
        eff = (k - 1) * d + 1
        if s == 1:
            totals.append(eff - 1)
            continue
        size = in_dims[i] if in_dims is not None and i < len(in_dims) else None
        if not isinstance(size, int):
            raise ThinetError(
                "auto_pad SAME with stride > 1 needs a static spatial input size; "
                "run onnx-thinet on a model with fixed image size"
            )
        out = -(-size // s)
        totals.append(max(0, (out - 1) * s + eff - size))
    small = [t // 2 for t in totals]
    big = [t - t // 2 for t in totals]
    return small + big if upper else big + small


def torch_pad(begins: Sequence[int], ends: Sequence[int]) -> str:
    """ONNX per-axis pads -> F.pad's (last_begin, last_end, prev_begin, ...) tuple."""
    pairs = [(int(b), int(e)) for b, e in zip(begins, ends, strict=True)]
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)  # leading axes without padding need no entry
    flat = [v for b, e in reversed(pairs) for v in (b, e)]
    return "(" + ", ".join(map(str, flat)) + ("," if len(flat) == 1 else "") + ")"
