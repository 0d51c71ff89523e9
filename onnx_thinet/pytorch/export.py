"""ONNX -> readable PyTorch module, and a (fine-tuned) module back to ONNX.

Why: a pruned ONNX model usually needs fine-tuning, and training needs a framework.
``export_torch`` writes a plain ``nn.Module`` source file (``model.py``) and its
weights (``weights.pt``) that a person can read, edit and train; ``to_onnx`` brings
the trained module back with the reference model's input/output names, opset and
dynamic axes, so the rest of the toolchain sees the same interface.

torch is optional: it is imported inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import keyword
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import tensor_shape

__all__ = [
    "SUPPORTED_OPS",
    "TORCH_REQUIRED_MESSAGE",
    "InitSource",
    "TorchExport",
    "export_torch",
    "export_torch_model",
    "load_exported",
    "require_torch",
    "to_onnx",
]

logger = logging.getLogger(__name__)

TORCH_REQUIRED_MESSAGE = (
    "PyTorch is required for this command: pip install 'onnx-thinet[torch]' (or pip install torch)"
)

_INT_END = 2**31 - 1  # slice bounds at or past this mean "to the end"
_EXPORTER_MIN_OPSET = 11
_EXPORTER_MAX_OPSET = 20  # the TorchScript exporter (dynamo=False) stops at 20

_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_NP_TO_TORCH = {
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
_ONNX_TO_TORCH = {
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
_INT_ONNX_TYPES = {
    TensorProto.INT64,
    TensorProto.INT32,
    TensorProto.INT16,
    TensorProto.INT8,
    TensorProto.UINT8,
}

# Local names the generated forward() must never shadow.
_RESERVED_LOCALS = frozenset(
    set(keyword.kwlist) | {"self", "torch", "nn", "F", "Path", "math", "range", "tuple", "list"}
)

_UNARY = {
    "Relu": "F.relu({x})",
    "Sigmoid": "torch.sigmoid({x})",
    "Tanh": "torch.tanh({x})",
    "HardSwish": "F.hardswish({x})",
    "Exp": "torch.exp({x})",
    "Log": "torch.log({x})",
    "Sqrt": "torch.sqrt({x})",
    "Neg": "-{x}",
    "Abs": "torch.abs({x})",
    "Reciprocal": "torch.reciprocal({x})",
    "Erf": "torch.erf({x})",
    "Floor": "torch.floor({x})",
    "Ceil": "torch.ceil({x})",
    "Softplus": "F.softplus({x})",
    "Softsign": "F.softsign({x})",
    "Not": "torch.logical_not({x})",
}
_BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}


def require_torch() -> Any:
    """Import torch lazily so the rest of onnx-thinet works without it."""
    try:
        import torch
    except (ImportError, OSError) as exc:
        raise ThinetError(TORCH_REQUIRED_MESSAGE) from exc
    return torch


# ---------------------------------------------------------------- small helpers


def _load_onnx(path: str | Path, *, external: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into one readable line."""
    p = Path(path)
    if not p.is_file():
        raise ThinetError(f"ONNX model not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=external)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ThinetError(f"{p} is not a readable ONNX model: {exc}") from exc


def _opset(model: onnx.ModelProto) -> int:
    """Default-domain opset of a model (what decides op semantics)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 13


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (old IRs list initializers as inputs too)."""
    inits = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in inits]


def _vi_dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims of a value: int when static, its dim_param when symbolic, None when unknown."""
    shape = tensor_shape(vi)
    return None if shape is None else list(shape)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
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


def _sanitize(raw: str) -> str:
    """Lower-case Python identifier text from an ONNX name (may be empty)."""
    return re.sub(r"_+", "_", re.sub(r"\W", "_", raw)).strip("_").lower()


def _auto_name(name: str) -> bool:
    """True for exporter-generated tensor names that read badly as variables."""
    return (
        not name
        or name.isdigit()
        or "::" in name
        or re.search(r"_output_\d+$", name) is not None
        or re.fullmatch(r"[\W\d_]+", name) is not None
    )


def _node_base(node: onnx.NodeProto) -> str:
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
        base = _sanitize("_".join(segs))
        if base:
            return base
    for out in node.output:
        if out and not _auto_name(out):
            return _sanitize(out) or node.op_type.lower()
    return node.op_type.lower()


def _flit(value: Any, dtype: Any = np.float32) -> str:
    """Shortest Python literal that round-trips to the same float32 (or float64)."""
    v = np.dtype(dtype).type(value) if np.dtype(dtype) in _FLOAT_DTYPES else np.float32(value)
    if np.isnan(v):
        return "float('nan')"
    if np.isinf(v):
        return "float('inf')" if v > 0 else "-float('inf')"
    s = str(v)
    if not any(c in s for c in ".en"):
        s += ".0"
    return s


def _lit(arr: np.ndarray) -> str:
    """Python literal of a small constant (scalar or nested list)."""
    if arr.dtype in _FLOAT_DTYPES:
        if arr.ndim == 0:
            return _flit(arr, arr.dtype)
        return "[" + ", ".join(_lit(a) for a in arr) + "]"
    return repr(arr.tolist())


def _tup(vals: Sequence[int]) -> str:
    """Compact int-or-tuple literal as PyTorch layer signatures accept."""
    vals = [int(v) for v in vals]
    if len(set(vals)) == 1:
        return str(vals[0])
    return "(" + ", ".join(map(str, vals)) + ")"


def _opt_input(node: onnx.NodeProto, index: int) -> str:
    """Name of an optional node input ('' when absent)."""
    return node.input[index] if len(node.input) > index else ""


def _paren(item: int | str) -> str:
    """Parenthesize compound shape expressions before combining them."""
    s = str(item)
    return f"({s})" if " " in s else s


def _same_pads(
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


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> str:
    """ONNX per-axis pads -> F.pad's (last_begin, last_end, prev_begin, ...) tuple."""
    pairs = [(int(b), int(e)) for b, e in zip(begins, ends, strict=True)]
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)  # leading axes without padding need no entry
    flat = [v for b, e in reversed(pairs) for v in (b, e)]
    return "(" + ", ".join(map(str, flat)) + ("," if len(flat) == 1 else "") + ")"


# ---------------------------------------------------------------- initializer sources


@dataclass(frozen=True)
class InitSource:
    """Where a parameter/buffer of the generated module came from in the ONNX graph.

    The module's tensor is ``(T(init) if transpose else init) * scale`` reshaped to the
    parameter's shape (transpose only for 2-D initializers). The inverse, which
    ``onnx_thinet.pytorch.finetune`` uses to write trained values back, is ``value / scale``,
    transposed back when marked, reshaped to the initializer's shape.
    """

    initializer: str
    transpose: bool = False
    scale: float = 1.0


@dataclass(frozen=True)
class TorchExport:
    """What ``export_torch_model`` wrote, plus the parameter -> initializer map.

    ``initializers`` only holds tensors whose values can be written back exactly: one
    state-dict key per initializer, never an initializer also consumed by a node
    that was constant-folded at export time (that copy would not follow the training).
    """

    model_py: Path
    initializers: dict[str, InitSource]


_FLOAT_ONNX_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})

# Folding these only reads an initializer's shape, never its values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


# ---------------------------------------------------------------- code generator


@dataclass
class _Val:
    """What a tensor name stands for while generating forward()."""

    kind: str  # "tensor" (a local variable), "const" (numpy value), "shape" (Python ints)
    expr: str = ""
    array: np.ndarray | None = None
    items: list[int | str] | None = None  # shape values: int or Python expression per element
    scalar: bool = False  # shape values: a 0-d value (one Python int)


class _Codegen:
    """Walks an ONNX graph once and writes the lines of a readable nn.Module."""

    def __init__(self, model: onnx.ModelProto, reserved_attrs: set[str]) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _opset(model)
        self.values: dict[str, _Val] = {}
        self.dims: dict[str, list[int | str | None] | None] = {}
        self.etypes: dict[str, int] = {}
        self.init_lines: list[str] = []
        self.fwd_lines: list[str] = []
        self.state: dict[str, np.ndarray] = {}
        self.locals_used: set[str] = set(_RESERVED_LOCALS)
        self.attrs_used: set[str] = set(reserved_attrs)
        self.const_attrs: dict[str, str] = {}
        self.helpers: set[str] = set()
        self.arg_names: list[str] = []
        self.used_names: set[str] = set()
        self.float_inits = {
            t.name for t in self.graph.initializer if t.data_type in _FLOAT_ONNX_TYPES
        }
        self.sources: dict[str, InitSource] = {}  # state-dict key -> where it came from
        self.folded_inits: set[str] = set()  # initializers read by constant-folded nodes

    # ---- bookkeeping
    def unique(self, base: str, used: set[str], fallback: str) -> str:
        """A fresh identifier, never a keyword or a taken name."""
        base = base or fallback
        if base[0].isdigit():
            base = f"{fallback}_{base}"
        name, i = base, 2
        while name in used or keyword.iskeyword(name):
            name = f"{base}_{i}"
            i += 1
        used.add(name)
        return name

    def new_attr(self, node: onnx.NodeProto, suffix: str = "") -> str:
        """Attribute name for a layer/parameter owned by a node."""
        base = _node_base(node) + (f"_{suffix}" if suffix else "")
        return self.unique(base, self.attrs_used, node.op_type.lower())

    def new_var(self, node: onnx.NodeProto, index: int) -> str:
        """Local variable for output `index` of a node, named after the tensor or node."""
        name = node.output[index]
        if not _auto_name(name):
            base = _sanitize(name)
        else:
            base = _node_base(node) + (f"_{index}" if index else "")
        return self.unique(base, self.locals_used, "v")

    def rank(self, name: str) -> int | None:
        """Rank of a value when shape inference (or a constant) knows it."""
        v = self.values.get(name)
        if v is not None and v.kind == "const" and v.array is not None:
            return v.array.ndim
        d = self.dims.get(name)
        return None if d is None else len(d)

    def dim_list(self, name: str) -> list[int | str | None] | None:
        """Known dims of a value (None entries are unknown)."""
        return self.dims.get(name)

    def const(self, name: str) -> np.ndarray | None:
        """Numpy value of a constant input, or None when it is computed at run time."""
        if not name:
            return None
        v = self.values.get(name)
        return v.array if v is not None and v.kind == "const" else None

    def ints(self, name: str) -> list[int] | None:
        """A constant input as a flat list of Python ints."""
        arr = self.const(name)
        return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]

    def int_items(self, node: onnx.NodeProto, index: int, what: str) -> list[int | str]:
        """A constant or a known-length shape value: ints or Python expressions per entry."""
        name = node.input[index] if len(node.input) > index else ""
        v = self.values.get(name)
        if v is not None and v.kind == "shape" and v.items is not None:
            return list(v.items)
        return list(self.need_ints(node, index, what))

    def need_ints(self, node: onnx.NodeProto, index: int, what: str) -> list[int]:
        """Like ints(), but the input must be a constant."""
        got = self.ints(node.input[index]) if len(node.input) > index else None
        if got is None:
            raise self.unsupported(node, f"{what} must be a constant")
        return got

    def unsupported(self, node: onnx.NodeProto, why: str) -> ThinetError:
        """Error naming the node and what the exporter cannot express."""
        return ThinetError(
            f"cannot export {node.op_type} node '{node.name or node.output[0]}' to PyTorch: {why}"
        )

    def src(self, name: str, *, transpose: bool = False, scale: float = 1.0) -> InitSource | None:
        """The InitSource of an operand when it is a float initializer as stored in the graph."""
        if not name or name not in self.float_inits:
            return None
        return InitSource(name, transpose, float(scale))

    def initializer_sources(self) -> dict[str, InitSource]:
        """Keys whose values map one-to-one onto an initializer (see TorchExport)."""
        users: dict[str, int] = {}
        for s in self.sources.values():
            users[s.initializer] = users.get(s.initializer, 0) + 1
        return {
            key: s
            for key, s in self.sources.items()
            if users[s.initializer] == 1 and s.initializer not in self.folded_inits
        }

    # ---- emitting
    def add_module(
        self,
        attr: str,
        ctor: str,
        params: dict[str, np.ndarray | None],
        sources: dict[str, InitSource | None] | None = None,
    ) -> None:
        """A layer attribute plus its state-dict entries (and where each came from)."""
        self.init_lines.append(f"self.{attr} = {ctor}")
        for key, arr in params.items():
            if arr is not None:
                self.state[f"{attr}.{key}"] = np.ascontiguousarray(arr)
                source = (sources or {}).get(key)
                if source is not None:
                    self.sources[f"{attr}.{key}"] = source

    def materialize(self, name: str, node: onnx.NodeProto) -> str:
        """Expose a constant array as a parameter (float) or buffer (other) of the module."""
        if name in self.const_attrs:
            return f"self.{self.const_attrs[name]}"
        arr = np.ascontiguousarray(self.values[name].array)
        base = _sanitize(name) if not _auto_name(name) else _node_base(node) + "_const"
        attr = self.unique(base, self.attrs_used, "const")
        shape = ", ".join(map(str, arr.shape)) if arr.ndim else "()"
        dtype = _NP_TO_TORCH.get(arr.dtype)
        if dtype is None:
            raise self.unsupported(node, f"constant '{name}' has unsupported dtype {arr.dtype}")
        dt = "" if arr.dtype == np.float32 else f", dtype={dtype}"
        if arr.dtype in _FLOAT_DTYPES:
            self.init_lines.append(f"self.{attr} = nn.Parameter(torch.empty({shape}{dt}))")
        else:
            self.init_lines.append(f'self.register_buffer("{attr}", torch.empty({shape}{dt}))')
        self.state[attr] = arr
        source = self.src(name)
        if source is not None:
            self.sources[attr] = source
        self.const_attrs[name] = attr
        return f"self.{attr}"

    def t(self, name: str, node: onnx.NodeProto, other_rank: int | None = None) -> str:
        """Python expression for a tensor operand (variable, literal or self.<param>)."""
        v = self.values.get(name)
        if v is None:
            raise self.unsupported(node, f"input '{name}' is not produced by any node")
        if v.kind == "tensor":
            return v.expr
        if v.kind == "shape":
            logger.warning("shape value '%s' used as a tensor; it is frozen when traced", name)
            return f"torch.tensor({self.shape_expr(v)})"
        arr = v.array
        assert arr is not None
        small = arr.size == 1 and (
            arr.ndim == 0 or (other_rank is not None and arr.ndim <= other_rank)
        )
        if small and arr.dtype != np.bool_:
            if name in self.float_inits:
                self.folded_inits.add(name)  # baked into the source as a literal
            return _lit(arr.reshape(()))
        return self.materialize(name, node)

    def shape_expr(self, v: _Val) -> str:
        """Python source of a shape value (list of ints, or one int)."""
        if v.items is None:
            return v.expr
        if v.scalar:
            return str(v.items[0])
        return "[" + ", ".join(map(str, v.items)) + "]"

    def emit(self, node: onnx.NodeProto, expr: str) -> str:
        """One forward() line for a single-output node; returns the new variable."""
        var = self.new_var(node, 0)
        self.fwd_lines.append(f"{var} = {expr}")
        self.values[node.output[0]] = _Val("tensor", var)
        return var

    def alias(self, node: onnx.NodeProto, src: str) -> None:
        """Identity-like node: the output is the same value as the input."""
        v = self.values[src]
        if v.kind == "tensor":
            self.emit(node, v.expr)
        else:
            self.values[node.output[0]] = v

    # ---- driver
    def run(self) -> None:
        """Generate code for every live node in topological order."""
        self._infer_types()
        for init in self.graph.initializer:
            self.values[init.name] = _Val("const", array=numpy_helper.to_array(init))
        for vi in _real_inputs(self.graph):
            arg = self.unique(_sanitize(vi.name), self.locals_used, "input")
            self.arg_names.append(arg)
            self.values[vi.name] = _Val("tensor", arg)
        for node in self._live_nodes():
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported_op(node)
            if self._foldable(node):
                self._fold(node)
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.unsupported_op(node)
            for name in node.input:
                if name and name not in self.values:
                    raise self.unsupported(node, f"input '{name}' is not produced by any node")
            handler(node)

    def unsupported_op(self, node: onnx.NodeProto) -> ThinetError:
        """The error for an op the exporter has no translation for."""
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        return ThinetError(
            f"cannot export {op} node '{node.name or node.output[0]}' to PyTorch: "
            f"unsupported op (supported: {', '.join(SUPPORTED_OPS)})"
        )

    def _infer_types(self) -> None:
        """Ranks and static dims of every value, from ONNX shape inference.

        The batch dim (dim 0 of each input) is made symbolic for the inference so the
        generated code never bakes in a batch size: training needs other batch sizes
        than a static-batch export had. The source model is restored afterwards.
        """
        model = self.model
        g = self.graph
        relaxed = []
        for vi in _real_inputs(g):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) > 0 and dims[0].HasField("dim_value"):
                relaxed.append((dims[0], dims[0].dim_value))
                dims[0].dim_param = "batch"
        saved_vi = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in g.value_info]
        del g.value_info[:]  # stale static shapes would defeat the relaxed batch
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as exc:  # inference is a help, not a requirement
            logger.info("shape inference failed (%s); continuing without it", exc)
        finally:
            for dim, value in relaxed:
                dim.dim_value = value
            g.value_info.extend(saved_vi)
        g = model.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            self.dims[vi.name] = _vi_dims(vi)
            if vi.type.tensor_type.elem_type:
                self.etypes[vi.name] = vi.type.tensor_type.elem_type

    def _live_nodes(self) -> list[onnx.NodeProto]:
        """Nodes in topological order, minus the ones no graph output depends on."""
        producers = {o: n for n in self.graph.node for o in n.output if o}
        known = set(self.values)
        order: list[onnx.NodeProto] = []
        done: set[int] = set()
        pending = list(self.graph.node)
        while pending:
            progress = False
            rest = []
            for n in pending:
                if all(not i or i in known or i not in producers for i in n.input):
                    order.append(n)
                    done.add(id(n))
                    known.update(o for o in n.output if o)
                    progress = True
                else:
                    rest.append(n)
            pending = rest
            if not progress:
                raise ThinetError("the ONNX graph has a cycle; cannot export it")
        needed = {o.name for o in self.graph.output}
        live = []
        for n in reversed(order):
            if any(o in needed for o in n.output):
                live.append(n)
                needed.update(i for i in n.input if i)
        self.used_names = needed
        return list(reversed(live))

    def _foldable(self, node: onnx.NodeProto) -> bool:
        """A node whose inputs are all constants is computed now, not in forward()."""
        if node.op_type.startswith("Random") or node.op_type in ("Dropout",):
            return False
        if node.op_type == "Constant":
            return True
        return bool(node.input) and all(
            not i or self.values.get(i, _Val("tensor")).kind == "const" for i in node.input
        )

    def _fold(self, node: onnx.NodeProto) -> None:
        """Evaluate an all-constant node with the ONNX reference runtime."""
        from onnx.reference import ReferenceEvaluator

        feeds = {i: np.asarray(self.values[i].array) for i in node.input if i}
        if node.op_type not in _SHAPE_ONLY_OPS:
            self.folded_inits.update(i for i in feeds if i in self.float_inits)
        inputs = [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ]
        outputs = [
            helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output if o
        ]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            outs = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:
            raise self.unsupported(node, f"could not evaluate its constant inputs ({exc})") from exc
        for name, arr in zip(node.output, outs, strict=False):
            if name:
                self.values[name] = _Val("const", array=np.asarray(arr))

    # ---- shared pieces
    def pads(
        self,
        node: onnx.NodeProto,
        a: dict[str, Any],
        kernel: list[int],
        strides: list[int],
        dilations: list[int],
    ) -> tuple[list[int], list[int]]:
        """(begins, ends) of a conv/pool node, resolving auto_pad."""
        nd = len(kernel)
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            dims = self.dim_list(node.input[0])
            pads = _same_pads(
                dims[2:] if dims else None, kernel, strides, dilations, auto == "SAME_UPPER"
            )
        elif auto == "VALID":
            pads = [0] * (2 * nd)
        else:
            pads = list(a.get("pads", [0] * (2 * nd)))
        return pads[:nd], pads[nd:]

    # ================================================================ ops
    def op_Constant(self, node: onnx.NodeProto) -> None:  # handled by _fold; kept for clarity
        self._fold(node)

    def op_Identity(self, node: onnx.NodeProto) -> None:
        self.alias(node, node.input[0])

    def op_Dropout(self, node: onnx.NodeProto) -> None:
        if len(node.output) > 1 and node.output[1] in self.used_names:
            raise self.unsupported(node, "its mask output is used")
        a = _attrs(node)
        ratio = a.get("ratio", 0.5)
        if len(node.input) > 1 and node.input[1]:
            r = self.const(node.input[1])
            if r is None:
                raise self.unsupported(node, "ratio must be a constant")
            ratio = float(r)
        attr = self.new_attr(node)
        self.add_module(attr, f"nn.Dropout({_flit(ratio)})", {})
        self.emit(node, f"self.{attr}({self.t(node.input[0], node)})")

    # ---- layers with weights
    def op_Conv(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        w = self.const(node.input[1])
        if w is None:
            raise self.unsupported(node, "the weight must be a constant initializer")
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b is None:
            raise self.unsupported(node, "the bias must be a constant initializer")
        nd = w.ndim - 2
        if nd not in (1, 2, 3):
            raise self.unsupported(node, f"{nd}-D convolution")
        group = int(a.get("group", 1))
        kernel = list(w.shape[2:])
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        begins, ends = self.pads(node, a, kernel, strides, dil)
        args = [str(w.shape[1] * group), str(w.shape[0]), _tup(kernel)]
        if any(s != 1 for s in strides):
            args.append(f"stride={_tup(strides)}")
        if begins == ends and any(begins):
            args.append(f"padding={_tup(begins)}")
        if any(d != 1 for d in dil):
            args.append(f"dilation={_tup(dil)}")
        if group != 1:
            args.append(f"groups={group}")
        if b is None:
            args.append("bias=False")
        if w.dtype != np.float32:
            args.append(f"dtype={_NP_TO_TORCH[w.dtype]}")
        attr = self.new_attr(node)
        self.add_module(
            attr,
            f"nn.Conv{nd}d({', '.join(args)})",
            {"weight": w, "bias": b},
            {"weight": self.src(node.input[1]), "bias": self.src(_opt_input(node, 2))},
        )
        x = self.t(node.input[0], node)
        if begins != ends:
            x = f"F.pad({x}, {_torch_pad(begins, ends)})"
        self.emit(node, f"self.{attr}({x})")

    def op_ConvTranspose(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        w = self.const(node.input[1])
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is None or (len(node.input) > 2 and node.input[2] and b is None):
            raise self.unsupported(node, "weight and bias must be constant initializers")
        nd = w.ndim - 2
        if nd not in (1, 2, 3):
            raise self.unsupported(node, f"{nd}-D transposed convolution")
        if "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise self.unsupported(node, "output_shape / auto_pad SAME are not supported")
        group = int(a.get("group", 1))
        kernel = list(w.shape[2:])
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        outpad = list(a.get("output_padding", [0] * nd))
        pads = [0] * (2 * nd) if a.get("auto_pad") == "VALID" else list(a.get("pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:]:
            raise self.unsupported(node, "asymmetric pads")
        args = [str(w.shape[0]), str(w.shape[1] * group), _tup(kernel)]
        if any(s != 1 for s in strides):
            args.append(f"stride={_tup(strides)}")
        if any(pads[:nd]):
            args.append(f"padding={_tup(pads[:nd])}")
        if any(outpad):
            args.append(f"output_padding={_tup(outpad)}")
        if group != 1:
            args.append(f"groups={group}")
        if b is None:
            args.append("bias=False")
        if any(d != 1 for d in dil):
            args.append(f"dilation={_tup(dil)}")
        attr = self.new_attr(node)
        self.add_module(
            attr,
            f"nn.ConvTranspose{nd}d({', '.join(args)})",
            {"weight": w, "bias": b},
            {"weight": self.src(node.input[1]), "bias": self.src(_opt_input(node, 2))},
        )
        self.emit(node, f"self.{attr}({self.t(node.input[0], node)})")

    def op_BatchNormalization(self, node: onnx.NodeProto) -> None:
        if any(o in self.used_names for o in node.output[1:]):
            raise self.unsupported(node, "training-mode outputs are used")
        scale, bias, mean, var = (self.const(n) for n in node.input[1:5])
        if scale is None or bias is None or mean is None or var is None:
            raise self.unsupported(node, "scale, bias, mean and var must be constants")
        a = _attrs(node)
        rank = self.rank(node.input[0])
        cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(
            rank or 4, "BatchNorm2d"
        )
        if rank is None:
            logger.info("rank of %s unknown; assuming 4-D input for BatchNormalization", node.name)
        args = [str(scale.shape[0])]
        eps = float(np.float32(a.get("epsilon", 1e-5)))
        if eps != float(np.float32(1e-5)):
            args.append(f"eps={_flit(eps)}")
        momentum = 1.0 - float(a.get("momentum", 0.9))
        if abs(momentum - 0.1) > 1e-6:
            args.append(f"momentum={_flit(momentum)}")
        attr = self.new_attr(node)
        params = {
            "weight": scale,
            "bias": bias,
            "running_mean": mean,
            "running_var": var,
            "num_batches_tracked": np.array(0, dtype=np.int64),
        }
        names = dict(
            zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=False)
        )
        self.add_module(
            attr,
            f"nn.{cls}({', '.join(args)})",
            params,
            {key: self.src(name) for key, name in names.items()},
        )
        self.emit(node, f"self.{attr}({self.t(node.input[0], node)})")

    def op_Gemm(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        bw = self.const(node.input[1])
        c_name = node.input[2] if len(node.input) > 2 else ""
        c = self.const(c_name) if c_name else None
        if bw is not None and bw.ndim == 2 and not ta and bw.dtype in _FLOAT_DTYPES:
            weight = (bw if tb else bw.T) * np.asarray(alpha, bw.dtype)
            out_f, in_f = weight.shape
            bias = None
            bias_src = None
            linear_ok = not c_name
            if (
                c is not None
                and (c.ndim <= 1 or (c.ndim == 2 and c.shape[0] == 1))
                and c.size in (1, out_f)
            ):
                bias = np.broadcast_to(c.reshape(-1) * np.asarray(beta, c.dtype), (out_f,)).copy()
                linear_ok = True
                # a broadcast scalar C has no one-to-one write-back: it stays unmapped
                bias_src = self.src(c_name, scale=beta) if c.size == out_f else None
            if linear_ok:
                args = [str(in_f), str(out_f)] + ([] if bias is not None else ["bias=False"])
                attr = self.new_attr(node)
                self.add_module(
                    attr,
                    f"nn.Linear({', '.join(args)})",
                    {"weight": weight.astype(bw.dtype), "bias": bias},
                    {
                        "weight": self.src(node.input[1], transpose=not tb, scale=alpha),
                        "bias": bias_src,
                    },
                )
                self.emit(node, f"self.{attr}({self.t(node.input[0], node)})")
                return
        x = self.t(node.input[0], node)
        w = self.t(node.input[1], node)
        expr = f"torch.matmul({x + '.t()' if ta else x}, {w + '.t()' if tb else w})"
        if alpha != 1.0:
            expr = f"{expr} * {_flit(alpha)}"
        if c_name:
            cexpr = self.t(c_name, node, other_rank=2)
            expr = f"{expr} + {cexpr}" if beta == 1.0 else f"{expr} + {cexpr} * {_flit(beta)}"
        self.emit(node, expr)

    def op_MatMul(self, node: onnx.NodeProto) -> None:
        bw = self.const(node.input[1])
        if (
            bw is not None
            and bw.ndim == 2
            and bw.dtype in _FLOAT_DTYPES
            and self.const(node.input[0]) is None
        ):
            attr = self.new_attr(node)
            dt = "" if bw.dtype == np.float32 else f", dtype={_NP_TO_TORCH[bw.dtype]}"
            self.add_module(
                attr,
                f"nn.Linear({bw.shape[0]}, {bw.shape[1]}, bias=False{dt})",
                {"weight": np.ascontiguousarray(bw.T)},
                {"weight": self.src(node.input[1], transpose=True)},
            )
            self.emit(node, f"self.{attr}({self.t(node.input[0], node)})")
            return
        self.emit(
            node, f"torch.matmul({self.t(node.input[0], node)}, {self.t(node.input[1], node)})"
        )

    # ---- activations
    def _unary(self, node: onnx.NodeProto) -> None:
        self.emit(node, _UNARY[node.op_type].format(x=self.t(node.input[0], node)))

    op_Relu = op_Sigmoid = op_Tanh = op_HardSwish = op_Exp = op_Log = op_Sqrt = _unary
    op_Neg = op_Abs = op_Reciprocal = op_Erf = op_Floor = op_Ceil = _unary
    op_Softplus = op_Softsign = op_Not = _unary

    def op_LeakyRelu(self, node: onnx.NodeProto) -> None:
        alpha = _attrs(node).get("alpha", 0.01)
        self.emit(node, f"F.leaky_relu({self.t(node.input[0], node)}, {_flit(alpha)})")

    def op_Elu(self, node: onnx.NodeProto) -> None:
        alpha = _attrs(node).get("alpha", 1.0)
        x = self.t(node.input[0], node)
        self.emit(node, f"F.elu({x})" if alpha == 1.0 else f"F.elu({x}, {_flit(alpha)})")

    def op_Selu(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        alpha = np.float32(a.get("alpha", 1.67326319217681884765625))
        gamma = np.float32(a.get("gamma", 1.05070102214813232421875))
        x = self.t(node.input[0], node)
        if np.isclose(alpha, 1.6732632, rtol=1e-6) and np.isclose(gamma, 1.0507010, rtol=1e-6):
            self.emit(node, f"F.selu({x})")
        else:
            self.emit(
                node,
                f"{_flit(gamma)} * torch.where({x} > 0, {x}, "
                f"{_flit(alpha)} * (torch.exp({x}) - 1.0))",
            )

    def op_Gelu(self, node: onnx.NodeProto) -> None:
        approx = _attrs(node).get("approximate", "none")
        x = self.t(node.input[0], node)
        self.emit(node, f"F.gelu({x})" if approx == "none" else f"F.gelu({x}, approximate='tanh')")

    def op_HardSigmoid(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        x = self.t(node.input[0], node)
        if np.isclose(alpha, 1 / 6, rtol=1e-6) and beta == 0.5:
            self.emit(node, f"F.hardsigmoid({x})")
        else:
            self.emit(node, f"torch.clamp({x} * {_flit(alpha)} + {_flit(beta)}, 0.0, 1.0)")

    def op_PRelu(self, node: onnx.NodeProto) -> None:
        slope = self.const(node.input[1])
        x = self.t(node.input[0], node)
        rank = self.rank(node.input[0])
        if slope is not None:
            if slope.size == 1:
                attr = self.new_attr(node)
                self.add_module(
                    attr,
                    "nn.PReLU()",
                    {"weight": slope.reshape(1)},
                    {"weight": self.src(node.input[1])},
                )
                self.emit(node, f"self.{attr}({x})")
                return
            r = rank if rank is not None else slope.ndim + 1
            padded = (1,) * (r - slope.ndim) + tuple(slope.shape)
            c = slope.size
            if r >= 2 and padded[1] == c and all(d == 1 for i, d in enumerate(padded) if i != 1):
                attr = self.new_attr(node)
                self.add_module(
                    attr,
                    f"nn.PReLU({c})",
                    {"weight": slope.reshape(c)},
                    {"weight": self.src(node.input[1])},
                )
                self.emit(node, f"self.{attr}({x})")
                return
        s = self.t(node.input[1], node, other_rank=rank)
        self.emit(node, f"torch.where({x} >= 0, {x}, {x} * {s})")

    def op_Clip(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        x = self.t(node.input[0], node)
        bounds: list[str | None] = []
        values: list[float | None] = []
        for idx, key in ((1, "min"), (2, "max")):
            if self.opset < 11:
                val = a.get(key)
                values.append(None if val is None else float(val))
                bounds.append(None if val is None else _flit(val))
                continue
            name = node.input[idx] if len(node.input) > idx else ""
            if not name:
                values.append(None)
                bounds.append(None)
                continue
            arr = self.const(name)
            if arr is not None:
                values.append(float(arr))
                bounds.append(
                    _lit(arr.reshape(())) if arr.dtype in _FLOAT_DTYPES else str(int(arr))
                )
            else:
                values.append(None)
                bounds.append(self.t(name, node))
        if values == [0.0, 6.0]:
            self.emit(node, f"F.relu6({x})")
            return
        parts = [x] + [
            f"{k}={b}" for k, b in zip(("min", "max"), bounds, strict=True) if b is not None
        ]
        self.emit(node, f"torch.clamp({', '.join(parts)})")

    def _softmax(self, node: onnx.NodeProto, fn: str) -> None:
        x = self.t(node.input[0], node)
        rank = self.rank(node.input[0])
        default = -1 if self.opset >= 13 else 1
        axis = int(_attrs(node).get("axis", default))
        if self.opset >= 13 or axis == -1 or (rank is not None and axis % rank == rank - 1):
            self.emit(node, f"torch.{fn}({x}, dim={axis})")
        else:  # opset < 13: coerce to 2-D at `axis`
            self.emit(node, f"torch.{fn}({x}.flatten({axis}), dim=-1).reshape({x}.shape)")

    def op_Softmax(self, node: onnx.NodeProto) -> None:
        self._softmax(node, "softmax")

    def op_LogSoftmax(self, node: onnx.NodeProto) -> None:
        self._softmax(node, "log_softmax")

    # ---- element-wise arithmetic
    def _binary(self, node: onnx.NodeProto) -> None:
        va, vb = self.values[node.input[0]], self.values[node.input[1]]
        if "shape" in (va.kind, vb.kind) and "tensor" not in (va.kind, vb.kind):
            self._shape_arith(node, va, vb)
            return
        ra, rb = self.rank(node.input[0]), self.rank(node.input[1])
        a = self.t(node.input[0], node, other_rank=rb)
        b = self.t(node.input[1], node, other_rank=ra)
        op = node.op_type
        if op == "Div" and self.etypes.get(node.output[0]) in _INT_ONNX_TYPES:
            self.emit(node, f'torch.div({a}, {b}, rounding_mode="trunc")')
        elif op == "Pow":
            self.emit(node, f"torch.pow({a}, {b})")
        else:
            self.emit(node, f"{a} {_BINARY[op]} {b}")

    op_Add = op_Sub = op_Mul = op_Div = op_Pow = _binary

    def _shape_arith(self, node: onnx.NodeProto, va: _Val, vb: _Val) -> None:
        """Arithmetic on Python-int shape values (dynamic reshape targets)."""
        ia = va.items if va.kind == "shape" else [int(v) for v in va.array.reshape(-1)]
        ib = vb.items if vb.kind == "shape" else [int(v) for v in vb.array.reshape(-1)]
        if ia is None or ib is None:
            raise self.unsupported(node, "arithmetic on a shape of unknown length")
        n = max(len(ia), len(ib))
        ia, ib = (ia * n if len(ia) == 1 else ia), (ib * n if len(ib) == 1 else ib)
        py = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "//"}.get(node.op_type)
        if py is None:
            raise self.unsupported(node, "this arithmetic on shape values")
        items: list[int | str] = []
        for x, y in zip(ia, ib, strict=True):
            if isinstance(x, int) and isinstance(y, int):
                items.append(int(eval(f"{x} {py} {y}")))  # noqa: S307 - two ints
            else:
                items.append(f"{_paren(x)} {py} {_paren(y)}")
        scalar = (va.kind != "shape" or va.scalar) and (vb.kind != "shape" or vb.scalar)
        self.values[node.output[0]] = _Val("shape", items=items, scalar=scalar)

    def op_Sum(self, node: onnx.NodeProto) -> None:
        self.emit(node, " + ".join(self.t(i, node) for i in node.input))

    # ---- pooling
    def _pool(self, node: onnx.NodeProto, kind: str) -> None:
        a = _attrs(node)
        if kind == "max" and len(node.output) > 1 and node.output[1] in self.used_names:
            raise self.unsupported(node, "the indices output is used")
        kernel = list(a["kernel_shape"])
        nd = len(kernel)
        if nd not in (1, 2, 3):
            raise self.unsupported(node, f"{nd}-D pooling")
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        begins, ends = self.pads(node, a, kernel, strides, dil)
        ceil = bool(a.get("ceil_mode", 0))
        x = self.t(node.input[0], node)
        half_ok = all(
            p <= ((k - 1) * d + 1) // 2 for p, k, d in zip(begins, kernel, dil, strict=True)
        )
        args = [_tup(kernel)]
        if strides != kernel:
            args.append(f"stride={_tup(strides)}")
        if kind == "max":
            if begins != ends or not half_ok:
                x = f"F.pad({x}, {_torch_pad(begins, ends)}, value=-float('inf'))"
            elif any(begins):
                args.append(f"padding={_tup(begins)}")
            if any(d != 1 for d in dil):
                args.append(f"dilation={_tup(dil)}")
            if ceil:
                args.append("ceil_mode=True")
            self.emit(node, f"F.max_pool{nd}d({x}, {', '.join(args)})")
            return
        if any(d != 1 for d in dil):
            raise self.unsupported(node, "dilated average pooling")
        include = bool(a.get("count_include_pad", 0))
        if begins != ends or not half_ok:
            if not include and any(begins + ends):
                raise self.unsupported(node, "asymmetric pads with count_include_pad=0")
            x = f"F.pad({x}, {_torch_pad(begins, ends)})"
        elif any(begins):
            args.append(f"padding={_tup(begins)}")
        if ceil:
            args.append("ceil_mode=True")
        if not include and any(begins):
            args.append("count_include_pad=False")
        self.emit(node, f"F.avg_pool{nd}d({x}, {', '.join(args)})")

    def op_MaxPool(self, node: onnx.NodeProto) -> None:
        self._pool(node, "max")

    def op_AveragePool(self, node: onnx.NodeProto) -> None:
        self._pool(node, "avg")

    def _global_pool(self, node: onnx.NodeProto, kind: str) -> None:
        x = self.t(node.input[0], node)
        rank = self.rank(node.input[0])
        if rank in (3, 4, 5):
            self.emit(node, f"F.adaptive_{kind}_pool{rank - 2}d({x}, 1)")
        else:
            fn = "mean" if kind == "avg" else "amax"
            self.emit(node, f"torch.{fn}({x}, dim=tuple(range(2, {x}.dim())), keepdim=True)")

    def op_GlobalAveragePool(self, node: onnx.NodeProto) -> None:
        self._global_pool(node, "avg")

    def op_GlobalMaxPool(self, node: onnx.NodeProto) -> None:
        self._global_pool(node, "max")

    def _reduce(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        x = self.t(node.input[0], node)
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self.need_ints(node, 1, "axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                self.emit(node, x)
                return
            rank = self.rank(node.input[0])
            dims = str(tuple(range(rank))) if rank is not None else f"tuple(range({x}.dim()))"
        else:
            dims = str(tuple(int(v) for v in axes)) if len(axes) > 1 else str(int(axes[0]))
        fn = {"ReduceMean": "mean", "ReduceMax": "amax", "ReduceMin": "amin", "ReduceSum": "sum"}
        self.emit(node, f"torch.{fn[node.op_type]}({x}, dim={dims}, keepdim={keep})")

    op_ReduceMean = op_ReduceMax = op_ReduceMin = op_ReduceSum = _reduce

    # ---- shape manipulation
    def op_Pad(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        mode = a.get("mode", "constant")
        if self.opset < 11:
            pads, value = list(a["pads"]), float(a.get("value", 0.0))
        else:
            pads = self.need_ints(node, 1, "pads")
            cv = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and cv is None:
                raise self.unsupported(node, "the pad value must be a constant")
            value = 0.0 if cv is None else float(cv)
        n = len(pads) // 2
        begins, ends = pads[:n], pads[n:]
        if len(node.input) > 3 and node.input[3]:
            axes = self.need_ints(node, 3, "axes")
            rank = self.rank(node.input[0])
            if rank is None:
                raise self.unsupported(node, "Pad with axes on a tensor of unknown rank")
            full_b, full_e = [0] * rank, [0] * rank
            for ax, b, e in zip(axes, begins, ends, strict=True):
                full_b[ax % rank], full_e[ax % rank] = b, e
            begins, ends = full_b, full_e
        torch_mode = {
            "constant": "constant",
            "reflect": "reflect",
            "edge": "replicate",
            "wrap": "circular",
        }.get(mode)
        if torch_mode is None:
            raise self.unsupported(node, f"pad mode '{mode}'")
        x = self.t(node.input[0], node)
        extra = ""
        if torch_mode != "constant":
            extra = f', mode="{torch_mode}"'
        elif value != 0.0:
            extra = f", value={_flit(value)}"
        self.emit(node, f"F.pad({x}, {_torch_pad(begins, ends)}{extra})")

    def op_Flatten(self, node: onnx.NodeProto) -> None:
        x = self.t(node.input[0], node)
        axis = int(_attrs(node).get("axis", 1))
        rank = self.rank(node.input[0])
        if axis < 0:
            if rank is None:
                raise self.unsupported(node, "negative axis on a tensor of unknown rank")
            axis += rank
        if axis == 0:
            self.emit(node, f"{x}.reshape(1, -1)")
        elif axis == 1:
            self.emit(node, f"torch.flatten({x}, 1)")
        elif rank is not None and axis == rank:
            self.emit(node, f"{x}.reshape(-1, 1)")
        else:
            self.emit(node, f"torch.flatten(torch.flatten({x}, {axis}), 0, {axis - 1})")

    def op_Reshape(self, node: onnx.NodeProto) -> None:
        x = self.t(node.input[0], node)
        allowzero = int(_attrs(node).get("allowzero", 0))
        shape_v = self.values[node.input[1]]
        if shape_v.kind == "tensor":
            raise self.unsupported(node, "the target shape is computed from tensor data")
        if shape_v.kind == "shape" and shape_v.items is None:
            self.emit(node, f"{x}.reshape({shape_v.expr})")
            return
        items: list[int | str] = (
            list(shape_v.items) if shape_v.kind == "shape" else self.need_ints(node, 1, "shape")
        )
        if not allowzero:
            items = [f"{x}.shape[{i}]" if it == 0 else it for i, it in enumerate(items)]
        items = self._batch_dynamic(node, items, shape_v.kind == "const", x)
        self.emit(
            node, f"{x}.reshape({', '.join(map(str, items))})" if items else f"{x}.reshape(())"
        )

    def _batch_dynamic(
        self, node: onnx.NodeProto, items: list[int | str], from_const: bool, x: str
    ) -> list[int | str]:
        """Keep a symbolic batch dim symbolic when a constant reshape baked it in."""
        dims = self.dim_list(node.input[0])
        if not (from_const and items and dims and isinstance(items[0], int) and items[0] > 0):
            return items
        if isinstance(dims[0], int):
            return items  # a static batch stays as the model had it
        rest_in = dims[1:]
        rest_out = items[1:]
        if not all(isinstance(d, int) for d in rest_in):
            return items
        one_free = rest_out.count(-1) == 1
        exact = all(isinstance(d, int) and d > 0 for d in rest_out) and math.prod(
            rest_out
        ) == math.prod(rest_in)
        if not (one_free or exact):
            return items
        logger.info("reshape %s: keeping the batch dim dynamic", node.name or node.output[0])
        return [f"{x}.shape[0]"] + rest_out

    def op_Transpose(self, node: onnx.NodeProto) -> None:
        x = self.t(node.input[0], node)
        perm = _attrs(node).get("perm")
        if perm is None:
            rank = self.rank(node.input[0])
            if rank is None:
                self.emit(node, f"{x}.permute(*reversed(range({x}.dim())))")
                return
            perm = list(reversed(range(rank)))
        self.emit(node, f"{x}.permute({', '.join(str(int(p)) for p in perm)})")

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        """Squeeze/Unsqueeze axes from the attribute (opset < 13) or the input."""
        a = _attrs(node)
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(node.input) > 1 and node.input[1]:
            return self.need_ints(node, 1, "axes")
        return None

    def op_Squeeze(self, node: onnx.NodeProto) -> None:
        axes = self._axes(node)
        v = self.values[node.input[0]]
        if v.kind == "shape":
            if v.items is None or len(v.items) != 1:
                raise self.unsupported(node, "squeezing a shape value of unknown length")
            self.values[node.output[0]] = _Val("shape", items=list(v.items), scalar=True)
            return
        x = self.t(node.input[0], node)
        if not axes:
            self.emit(node, f"{x}.squeeze()")
        elif len(axes) == 1:
            self.emit(node, f"{x}.squeeze({axes[0]})")
        else:
            self.emit(node, f"{x}.squeeze({tuple(axes)})")

    def op_Unsqueeze(self, node: onnx.NodeProto) -> None:
        axes = self._axes(node)
        if not axes:
            raise self.unsupported(node, "Unsqueeze without axes")
        v = self.values[node.input[0]]
        if v.kind == "shape":
            if not v.scalar or axes not in ([0], [-1]):
                raise self.unsupported(node, "unsqueezing a shape value other than a scalar")
            self.values[node.output[0]] = _Val("shape", items=list(v.items or []), scalar=False)
            return
        x = self.t(node.input[0], node)
        rank = self.rank(node.input[0])
        if any(ax < 0 for ax in axes):
            if rank is None:
                if len(axes) == 1:
                    self.emit(node, f"{x}.unsqueeze({axes[0]})")
                    return
                raise self.unsupported(node, "negative axes on a tensor of unknown rank")
            out_rank = rank + len(axes)
            axes = [ax % out_rank for ax in axes]
        expr = x + "".join(f".unsqueeze({ax})" for ax in sorted(axes))
        self.emit(node, expr)

    def op_Concat(self, node: onnx.NodeProto) -> None:
        axis = int(_attrs(node).get("axis", 0))
        vals = [self.values[i] for i in node.input if i]
        if any(v.kind == "shape" for v in vals) and all(v.kind != "tensor" for v in vals):
            items: list[int | str] = []
            for v in vals:
                if v.kind == "const":
                    items += [int(e) for e in v.array.reshape(-1)]
                elif v.items is None:
                    raise self.unsupported(node, "concatenating shapes of unknown length")
                else:
                    items += v.items
            self.values[node.output[0]] = _Val("shape", items=items)
            return
        parts = [self.t(i, node) for i in node.input if i]
        self.emit(node, f"torch.cat([{', '.join(parts)}], dim={axis})")

    def op_Split(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        axis = int(a.get("axis", 0))
        x = self.t(node.input[0], node)
        sizes = a.get("split")
        if len(node.input) > 1 and node.input[1]:
            sizes = self.need_ints(node, 1, "split")
        n = len(node.output)
        if sizes is not None:
            expr = f"torch.split({x}, {list(int(s) for s in sizes)}, dim={axis})"
        else:
            dims = self.dim_list(node.input[0])
            d = dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
            if isinstance(d, int):
                chunk = -(-d // n)
                sizes = [min(chunk, d - i * chunk) for i in range(n)]
                expr = f"torch.split({x}, {sizes}, dim={axis})"
            else:
                expr = f"torch.chunk({x}, {n}, dim={axis})"
        names = []
        for i, out in enumerate(node.output):
            if out and out in self.used_names:
                var = self.new_var(node, i)
                self.values[out] = _Val("tensor", var)
                names.append(var)
            else:
                names.append("_")
        if n == 1:
            self.fwd_lines.append(f"{names[0]} = {expr}[0]")
        else:
            self.fwd_lines.append(f"{', '.join(names)} = {expr}")

    def op_Slice(self, node: onnx.NodeProto) -> None:
        if self.opset < 10:
            a = _attrs(node)
            starts, ends = list(a["starts"]), list(a["ends"])
            axes = list(a.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = self.int_items(node, 1, "starts")
            ends = self.int_items(node, 2, "ends")
            axes = (
                self.need_ints(node, 3, "axes")
                if len(node.input) > 3 and node.input[3]
                else list(range(len(starts)))
            )
            steps = (
                self.need_ints(node, 4, "steps")
                if len(node.input) > 4 and node.input[4]
                else [1] * len(starts)
            )
        v = self.values[node.input[0]]
        if v.kind == "shape":
            if not all(isinstance(e, int) for e in starts + ends):
                raise self.unsupported(node, "slicing a shape value with computed bounds")
            if axes not in ([0], [-1]):
                raise self.unsupported(node, "slicing a shape value on an axis other than 0")
            sl = slice(starts[0], ends[0], steps[0])
            if v.items is None:
                self.values[node.output[0]] = _Val(
                    "shape", expr=f"{v.expr}[{starts[0]}:{ends[0]}:{steps[0]}]"
                )
            else:
                self.values[node.output[0]] = _Val("shape", items=list(v.items)[sl])
            return
        x = self.t(node.input[0], node)
        rank = self.rank(node.input[0])
        if rank is not None:
            axes = [ax % rank for ax in axes]
        flips, spec = [], {}
        for s, e, st, ax in zip(starts, ends, steps, axes, strict=True):
            if not (isinstance(s, int) and isinstance(e, int)):  # computed from shapes
                s_txt = "" if s == 0 else str(s)
                e_txt = "" if isinstance(e, int) and e >= _INT_END else str(e)
                if st < 0:
                    raise self.unsupported(node, "negative steps with computed bounds")
                spec[ax] = f"{s_txt}:{e_txt}" + (f":{st}" if st != 1 else "")
                continue
            if st < 0:
                if st == -1 and (s == -1 or s >= _INT_END) and e <= -_INT_END:
                    flips.append(ax)
                    continue
                raise self.unsupported(node, "negative steps other than a full reversal")
            s_txt = "" if s == 0 or s <= -_INT_END else str(s)
            e_txt = "" if e >= _INT_END else str(e)
            spec[ax] = f"{s_txt}:{e_txt}" + (f":{st}" if st != 1 else "")
        if spec:
            if all(ax >= 0 for ax in spec):
                idx = [spec.get(i, ":") for i in range(max(spec) + 1)]
            elif all(ax < 0 for ax in spec):
                idx = ["..."] + [spec.get(i, ":") for i in range(min(spec), 0)]
            else:
                raise self.unsupported(
                    node, "mixed negative/positive axes on a tensor of unknown rank"
                )
            x = f"{x}[{', '.join(idx)}]"
        if flips:
            x = f"torch.flip({x}, {flips})"
        self.emit(node, x)

    def op_Shape(self, node: onnx.NodeProto) -> None:
        x = self.t(node.input[0], node)
        a = _attrs(node)
        dims = self.dim_list(node.input[0])
        start, end = a.get("start"), a.get("end")
        if dims is None:
            sl = (
                ""
                if start is None and end is None
                else f"[{start or ''}:{'' if end is None else end}]"
            )
            self.values[node.output[0]] = _Val("shape", expr=f"list({x}.shape){sl}")
            return
        items: list[int | str] = [
            d if isinstance(d, int) else f"{x}.shape[{i}]" for i, d in enumerate(dims)
        ]
        self.values[node.output[0]] = _Val("shape", items=items[slice(start, end)])

    def op_Gather(self, node: onnx.NodeProto) -> None:
        axis = int(_attrs(node).get("axis", 0))
        v = self.values[node.input[0]]
        idx = self.const(node.input[1])
        if v.kind == "shape":
            if idx is None or v.items is None:
                raise self.unsupported(node, "gathering from a shape with computed indices")
            picked = [v.items[int(i)] for i in idx.reshape(-1)]
            self.values[node.output[0]] = _Val("shape", items=picked, scalar=idx.ndim == 0)
            return
        x = self.t(node.input[0], node)
        if idx is not None and idx.size <= 64:
            i_txt = _lit(idx.astype(np.int64))
        else:
            i_txt = self.t(node.input[1], node)
        if axis >= 0:
            prefix = ":, " * axis
            self.emit(node, f"{x}[{prefix}{i_txt}]")
        else:
            suffix = ", :" * (-axis - 1)
            self.emit(node, f"{x}[..., {i_txt}{suffix}]")

    def op_Cast(self, node: onnx.NodeProto) -> None:
        v = self.values[node.input[0]]
        if v.kind == "shape":
            self.values[node.output[0]] = v
            return
        to = int(_attrs(node)["to"])
        dtype = _ONNX_TO_TORCH.get(to)
        if dtype is None:
            raise self.unsupported(node, f"cast to {TensorProto.DataType.Name(to)}")
        self.emit(node, f"{self.t(node.input[0], node)}.to({dtype})")

    def _resize_common(
        self,
        node: onnx.NodeProto,
        mode: str,
        coord: str,
        nearest: str,
        scales: list[float] | None,
        sizes: list[int] | None,
    ) -> None:
        x = self.t(node.input[0], node)
        dims = self.dim_list(node.input[0])
        if scales:
            if scales[0] != 1.0 or scales[1] != 1.0:
                raise self.unsupported(node, "resizing batch or channel dims")
            spatial = scales[2:]
        elif sizes:
            spatial = None
        else:
            raise self.unsupported(node, "neither scales nor sizes is a constant")
        nd = len(scales or sizes or []) - 2
        if mode == "nearest":
            integer = spatial is not None and all(float(s).is_integer() for s in spatial)
            if sizes is not None and dims is not None and all(isinstance(d, int) for d in dims[2:]):
                integer = all(o % i == 0 for o, i in zip(sizes[2:], dims[2:], strict=True))
            ok = (coord == "asymmetric" and nearest == "floor") or (
                integer
                and coord in ("half_pixel", "pytorch_half_pixel", "asymmetric")
                and (nearest.startswith("round") or coord == "asymmetric" and nearest == "floor")
            )
            if not ok:
                raise self.unsupported(
                    node,
                    f"nearest resize with coordinate_transformation_mode={coord}, "
                    f"nearest_mode={nearest} (supported: asymmetric+floor, or integer scales)",
                )
            tmode = "nearest"
            extra = ""
        elif mode == "linear":
            tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd)
            if coord == "align_corners":
                extra = ", align_corners=True"
            elif coord in ("half_pixel", "pytorch_half_pixel"):
                extra = ", align_corners=False"
            else:
                raise self.unsupported(node, f"linear resize with {coord} coordinates")
        elif mode == "cubic" and nd == 2:
            tmode = "bicubic"
            extra = ", align_corners=True" if coord == "align_corners" else ", align_corners=False"
        else:
            raise self.unsupported(node, f"resize mode '{mode}'")
        if tmode is None:
            raise self.unsupported(node, f"{nd}-D linear resize")
        if spatial is not None:
            sf = (
                "("
                + ", ".join(_flit(s) for s in spatial)
                + ("," if len(spatial) == 1 else "")
                + ")"
            )
            self.emit(node, f'F.interpolate({x}, scale_factor={sf}, mode="{tmode}"{extra})')
        else:
            sz = "(" + ", ".join(str(s) for s in sizes[2:]) + ("," if nd == 1 else "") + ")"
            self.emit(node, f'F.interpolate({x}, size={sz}, mode="{tmode}"{extra})')

    def op_Resize(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        if a.get("antialias", 0) or "axes" in a or a.get("exclude_outside", 0):
            raise self.unsupported(node, "antialias / axes / exclude_outside")
        if self.opset < 11:
            scales_arr = self.const(node.input[1])
        else:
            scales_arr = (
                self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            )
        if scales_arr is not None and scales_arr.size == 0:
            scales_arr = None
        scales = None if scales_arr is None else [float(s) for s in scales_arr.reshape(-1)]
        sizes = None
        if self.opset >= 11 and len(node.input) > 3 and node.input[3]:
            items = self.int_items(node, 3, "sizes")
            if not all(isinstance(i, int) for i in items[2:]):
                raise self.unsupported(node, "output sizes computed at run time")
            sizes = [i if isinstance(i, int) else -1 for i in items]
        default_coord = "asymmetric" if self.opset < 11 else "half_pixel"
        self._resize_common(
            node,
            a.get("mode", "nearest"),
            a.get("coordinate_transformation_mode", default_coord),
            a.get("nearest_mode", "round_prefer_floor" if self.opset >= 11 else "floor"),
            scales,
            sizes,
        )

    def op_Upsample(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        scales = a.get("scales")
        if scales is None:
            arr = self.const(node.input[1]) if len(node.input) > 1 else None
            scales = None if arr is None else [float(s) for s in arr.reshape(-1)]
        mode = a.get("mode", "nearest")
        if mode != "nearest":
            raise self.unsupported(node, "Upsample modes other than nearest")
        self._resize_common(node, "nearest", "asymmetric", "floor", scales, None)


SUPPORTED_OPS: tuple[str, ...] = tuple(
    sorted(name[3:] for name in dir(_Codegen) if name.startswith("op_"))
)


# ---------------------------------------------------------------- source file

_HEADER = '''"""PyTorch version of {source}, generated by onnx-thinet export-torch.

Edit freely: it is plain PyTorch. ``load()`` builds the model and loads ``weights.pt``
from this directory. Back to ONNX: ``onnx_thinet.to_onnx(model, "{source}", "out.onnx")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INPUT_NAMES", "OUTPUT_NAMES", "INPUT_SHAPES", "OPSET", "ONNX_INITIALIZERS", "Model", "load"
]

INPUT_NAMES = {input_names!r}
OUTPUT_NAMES = {output_names!r}
INPUT_SHAPES = {input_shapes!r}
OPSET = {opset}
'''

_FOOTER = '''

def load(weights: str | Path | None = None, map_location: str | torch.device = "cpu") -> Model:
    """Build Model, load its weights (weights.pt next to this file by default), eval mode."""
    model = Model()
    path = Path(__file__).parent / "weights.pt" if weights is None else Path(weights)
    model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    return model.eval()
'''


def _render_sources(sources: dict[str, InitSource]) -> str:
    """The ONNX_INITIALIZERS table of model.py (state-dict key -> initializer, layout)."""
    lines = [
        "",
        "# Where each parameter/buffer came from in the ONNX graph: state-dict key ->",
        "# (initializer name, transposed, scale). The module holds (T(init) if transposed",
        "# else init) * scale, reshaped; tensors not listed (constant-folded, shared,",
        "# broadcast) have no one-to-one initializer.",
        "ONNX_INITIALIZERS = {",
    ]
    for key, src in sources.items():
        lines.append(f"    {key!r}: ({src.initializer!r}, {src.transpose!r}, {src.scale!r}),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render(gen: _Codegen, source: str) -> str:
    """Assemble model.py from the generator's lines."""
    source = source.replace("\\", "/").replace('"', "'")  # safe inside docstrings
    g = gen.graph
    inputs = _real_inputs(g)
    out_exprs = []
    for o in g.output:
        v = gen.values.get(o.name)
        if v is None:
            raise ThinetError(f"graph output '{o.name}' is not produced by any node")
        if v.kind == "tensor":
            out_exprs.append(v.expr)
        elif v.kind == "const":
            out_exprs.append(
                gen.materialize(o.name, onnx.NodeProto(name=o.name, op_type="Constant"))
            )
        else:
            out_exprs.append(f"torch.tensor({gen.shape_expr(v)})")
    header = _HEADER.format(
        source=source,
        input_names=[vi.name for vi in inputs],
        output_names=[o.name for o in g.output],
        input_shapes={vi.name: _vi_dims(vi) for vi in inputs},
        opset=gen.opset,
    )
    lines = [
        header + _render_sources(gen.initializer_sources()),
        "",
        "class Model(nn.Module):",
        f'    """{source} as PyTorch; forward() follows the ONNX graph node by node."""',
        "",
        "    def __init__(self) -> None:",
        "        super().__init__()",
    ]
    lines += [f"        {ln}" for ln in gen.init_lines]
    args = ", ".join(f"{a}: torch.Tensor" for a in gen.arg_names)
    ret_type = "torch.Tensor" if len(out_exprs) == 1 else "tuple[torch.Tensor, ...]"
    lines += ["", f"    def forward(self, {args}) -> {ret_type}:"]
    lines += [f"        {ln}" for ln in gen.fwd_lines]
    ret = out_exprs[0] if len(out_exprs) == 1 else ", ".join(out_exprs)
    lines.append(f"        return {ret}")
    return "\n".join(lines) + "\n" + _FOOTER


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_torch(onnx_path: str | Path, out_dir: str | Path, *, verify: bool = True) -> Path:
    """Write DIR/model.py (readable nn.Module) and DIR/weights.pt; return the model.py path.

    With ``verify`` the generated module is run against onnxruntime on a dummy batch
    so a translation bug surfaces here rather than during fine-tuning.
    """
    src = Path(onnx_path)
    return export_torch_model(_load_onnx(src), out_dir, source=src.name, verify=verify).model_py


def export_torch_model(
    model: onnx.ModelProto,
    out_dir: str | Path,
    *,
    source: str = "model.onnx",
    verify: bool = True,
) -> TorchExport:
    """``export_torch`` for an in-memory model; also returns the parameter -> initializer map.

    ``source`` is the file name the generated docstrings mention. The model is not
    modified (shape inference works on it temporarily and restores it).
    """
    torch = require_torch()
    if not model.graph.node:
        raise ThinetError(f"{source} has an empty graph")
    gen = _Codegen(model, set(dir(torch.nn.Module)) | {"Model"})
    gen.run()
    text = _render(gen, source)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ThinetError(f"--output must be a directory: {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in gen.state.items()}
    _atomic_write(out / "weights.pt", lambda p: torch.save(state, str(p)))
    _atomic_write(out / "model.py", lambda p: p.write_text(text, encoding="utf-8"))
    logger.info("wrote %s (%d layers/params) and weights.pt", out / "model.py", len(gen.init_lines))
    if verify:
        _verify_export(model, out / "model.py")
    return TorchExport(out / "model.py", gen.initializer_sources())


def load_exported(model_py: str | Path) -> Any:
    """Import a generated model.py by path (no sys.path change) and return its load() module."""
    require_torch()
    path = Path(model_py)
    if path.is_dir():
        path = path / "model.py"
    if not path.is_file():
        raise ThinetError(f"generated model not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"_onnx_thinet_model_{digest}", path)
    if spec is None or spec.loader is None:
        raise ThinetError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        return mod.load()
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc


def _dummy_feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray] | None:
    """Random inputs following the model's input shapes; None if a non-batch dim is unknown."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for vi in _real_inputs(model.graph):
        dims = _vi_dims(vi)
        if dims is None:
            return None
        shape = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                return None
        etype = vi.type.tensor_type.elem_type
        if etype == TensorProto.FLOAT:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
        elif etype == TensorProto.DOUBLE:
            feeds[vi.name] = rng.standard_normal(shape)
        else:
            return None
    return feeds


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """max |a-b| / max |a| (the project's tolerance measure)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return math.inf
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(ref - got)) / max(float(np.max(np.abs(ref))), 1e-12))


def _verify_export(model: onnx.ModelProto, model_py: Path, tol: float = 1e-4) -> None:
    """Compare the generated module with onnxruntime on a dummy batch."""
    torch = require_torch()
    feeds = _dummy_feeds(model)
    if feeds is None:
        logger.info("skipping export check: input shapes are not fully known")
        return
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run(None, feeds)
    except Exception as exc:
        logger.warning("skipping export check: onnxruntime cannot run the source model (%s)", exc)
        return
    module = load_exported(model_py)
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in feeds.values()])
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    for name, r, t in zip([o.name for o in model.graph.output], ref, got, strict=False):
        err = _rel_err(r, t.numpy())
        if err > tol:
            raise ThinetError(
                f"generated {model_py} disagrees with onnxruntime on output '{name}' "
                f"(relative error {err:.2e}); please report this as an onnx-thinet bug"
            )
    logger.info("export check passed on %d output(s)", len(ref))


# ---------------------------------------------------------------- back to ONNX

_TORCH_FROM_ONNX = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool",
}


def _dummy_inputs(torch: Any, ref: onnx.ModelProto, device: Any) -> tuple[Any, ...]:
    """Example inputs for tracing: reference shapes, symbolic batch -> 2, other symbolic -> 32."""
    out = []
    for vi in _real_inputs(ref.graph):
        dims = _vi_dims(vi)
        if dims is None:
            raise ThinetError(f"reference input '{vi.name}' has no shape; pass example_inputs")
        shape = [d if isinstance(d, int) else (2 if i == 0 else 32) for i, d in enumerate(dims)]
        if any(not isinstance(d, int) for d in dims[1:]):
            logger.warning("input '%s' has symbolic non-batch dims; tracing with 32", vi.name)
        dtype = getattr(torch, _TORCH_FROM_ONNX.get(vi.type.tensor_type.elem_type, "float32"))
        if dtype.is_floating_point:
            out.append(torch.randn(*shape, dtype=dtype, device=device))
        else:
            out.append(torch.zeros(*shape, dtype=dtype, device=device))
    return tuple(out)


def _fit_batch(example: Any, vi: onnx.ValueInfoProto) -> Any:
    """Trim/repeat an example to the reference's static batch: tracing bakes it in."""
    dims = _vi_dims(vi)
    if not dims or not isinstance(dims[0], int) or example.dim() == 0:
        return example
    want = dims[0]
    if example.shape[0] < want:
        reps = -(-want // example.shape[0])
        example = example.repeat(reps, *([1] * (example.dim() - 1)))
    return example[:want]


def _dynamic_axes(ref: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Dims that are symbolic or unknown in the reference inputs/outputs stay dynamic."""
    axes: dict[str, dict[int, str]] = {}
    for vi in list(_real_inputs(ref.graph)) + list(ref.graph.output):
        dims = _vi_dims(vi)
        if not dims:
            continue
        dyn = {
            i: (d if isinstance(d, str) else f"{vi.name}_dim{i}")
            for i, d in enumerate(dims)
            if not isinstance(d, int)
        }
        if dyn:
            axes[vi.name] = dyn
    return axes


def to_onnx(
    module: Any,
    reference_onnx: str | Path,
    output_path: str | Path,
    *,
    example_inputs: Sequence[Any] | None = None,
) -> Path:
    """Export a (fine-tuned) module to ONNX with the reference's names, opset and dynamic axes.

    The file is written atomically (temp file + rename) so a failed export never
    leaves a half-written model behind.
    """
    torch = require_torch()
    ref = _load_onnx(reference_onnx, external=False)
    in_names = [vi.name for vi in _real_inputs(ref.graph)]
    out_names = [o.name for o in ref.graph.output]
    opset = min(max(_opset(ref), _EXPORTER_MIN_OPSET), _EXPORTER_MAX_OPSET)
    try:
        device = next(iter(module.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    if example_inputs is None:
        args = _dummy_inputs(torch, ref, device)
    else:
        args = tuple(
            _fit_batch(torch.as_tensor(a).to(device), vi)
            for a, vi in zip(example_inputs, _real_inputs(ref.graph), strict=False)
        )
    if len(args) != len(in_names):
        raise ThinetError(
            f"the reference model has {len(in_names)} inputs, got {len(args)} examples"
        )
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=_dynamic_axes(ref),
                do_constant_folding=True,
            )
        exported = onnx.load(tmp)
        got = [o.name for o in exported.graph.output]
        if got != out_names:
            raise ThinetError(f"exported outputs {got} do not match the reference's {out_names}")
        onnx.checker.check_model(exported)
        os.replace(tmp, out)
    except ThinetError:
        raise
    except Exception as exc:
        raise ThinetError(f"PyTorch could not export the module to ONNX: {exc}") from exc
    finally:
        module.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("wrote %s (opset %d)", out, opset)
    return out
