"""The code-generation core of export-torch: names, values, emitted lines, constant folding,
and the loop that hands each node to its op's translator in the registry (onnx_thinet.ops)."""

from __future__ import annotations

import keyword
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet.errors import ThinetError
from onnx_thinet.io.graph import graph_inputs, opset_version
from onnx_thinet.ops.registry import translatable_ops, translator
from onnx_thinet.pytorch.source import (
    FLOAT_DTYPES,
    NP_TO_TORCH,
    RESERVED_LOCALS,
    Val,
    auto_name,
    lit,
    node_base,
    same_pads,
    sanitize,
    vi_dims,
)

__all__ = ["Codegen", "InitSource", "infer_types", "live_nodes"]

logger = logging.getLogger(__name__)

_FLOAT_ONNX_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})

# Folding these only reads an initializer's shape, never its values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


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


def infer_types(model: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, int]]:
    """Dims and element types of every value, from ONNX shape inference on a copy.

    The batch dim (dim 0 of each input) is made symbolic for the inference so the
    generated code never bakes in a batch size: training needs other batch sizes
    than a static-batch export had. `model` itself is left untouched.
    """
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    for vi in graph_inputs(relaxed.graph):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) > 0 and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    del relaxed.graph.value_info[:]  # stale static shapes would defeat the relaxed batch
    try:
        relaxed = onnx.shape_inference.infer_shapes(relaxed, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is a help, not a requirement
        logger.info("shape inference failed (%s); continuing without it", exc)
    g = relaxed.graph
    dims: dict[str, Any] = {}
    etypes: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims[vi.name] = vi_dims(vi)
        if vi.type.tensor_type.elem_type:
            etypes[vi.name] = vi.type.tensor_type.elem_type
    return dims, etypes


def live_nodes(graph: onnx.GraphProto, known: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes in topological order minus those no graph output depends on, and the names used."""
    producers = {o for n in graph.node for o in n.output if o}
    known = set(known)
    order: list[onnx.NodeProto] = []
    pending = list(graph.node)
    while pending:
        ready = [n for n in pending if all(not i or i in known or i not in producers for i in n.input)]
        if not ready:
            raise ThinetError("the ONNX graph has a cycle; cannot export it")
        for n in ready:
            order.append(n)
            known.update(o for o in n.output if o)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(order):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(live)), needed


class Codegen:
    """Walks an ONNX graph once and writes the lines of a readable nn.Module."""

    def __init__(self, model: onnx.ModelProto, reserved_attrs: set[str]) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.values: dict[str, Val] = {}
        self.dims: dict[str, list[int | str | None] | None] = {}
        self.etypes: dict[str, int] = {}
        self.init_lines: list[str] = []
        self.fwd_lines: list[str] = []
        self.state: dict[str, np.ndarray] = {}
        self.locals_used: set[str] = set(RESERVED_LOCALS)
        self.attrs_used: set[str] = set(reserved_attrs)
        self.const_attrs: dict[str, str] = {}
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
        base = node_base(node) + (f"_{suffix}" if suffix else "")
        return self.unique(base, self.attrs_used, node.op_type.lower())

    def new_var(self, node: onnx.NodeProto, index: int) -> str:
        """Local variable for output `index` of a node, named after the tensor or node."""
        name = node.output[index]
        if not auto_name(name):
            base = sanitize(name)
        else:
            base = node_base(node) + (f"_{index}" if index else "")
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
        base = sanitize(name) if not auto_name(name) else node_base(node) + "_const"
        attr = self.unique(base, self.attrs_used, "const")
        shape = ", ".join(map(str, arr.shape)) if arr.ndim else "()"
        dtype = NP_TO_TORCH.get(arr.dtype)
        if dtype is None:
            raise self.unsupported(node, f"constant '{name}' has unsupported dtype {arr.dtype}")
        dt = "" if arr.dtype == np.float32 else f", dtype={dtype}"
        if arr.dtype in FLOAT_DTYPES:
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
            return lit(arr.reshape(()))
        return self.materialize(name, node)

    def shape_expr(self, v: Val) -> str:
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
        self.values[node.output[0]] = Val("tensor", var)
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
        """Generate code for every live node in topological order, through the op registry."""
        self.dims, self.etypes = infer_types(self.model)
        for init in self.graph.initializer:
            self.values[init.name] = Val("const", array=numpy_helper.to_array(init))
        for vi in graph_inputs(self.graph):
            arg = self.unique(sanitize(vi.name), self.locals_used, "input")
            self.arg_names.append(arg)
            self.values[vi.name] = Val("tensor", arg)
        live, self.used_names = live_nodes(self.graph, set(self.values))
        for node in live:
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported_op(node)
            if self._foldable(node):
                self.fold(node)
                continue
            translate = translator(node.op_type)
            if translate is None:
                raise self.unsupported_op(node)
            for name in node.input:
                if name and name not in self.values:
                    raise self.unsupported(node, f"input '{name}' is not produced by any node")
            translate(self, node)

    def unsupported_op(self, node: onnx.NodeProto) -> ThinetError:
        """The error for an op the exporter has no translation for."""
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        return ThinetError(
            f"cannot export {op} node '{node.name or node.output[0]}' to PyTorch: "
            f"unsupported op (supported: {', '.join(translatable_ops())})"
        )

    def _foldable(self, node: onnx.NodeProto) -> bool:
        """A node whose inputs are all constants is computed now, not in forward()."""
        if node.op_type.startswith("Random") or node.op_type in ("Dropout",):
            return False
        if node.op_type == "Constant":
            return True
        return bool(node.input) and all(
            not i or self.values.get(i, Val("tensor")).kind == "const" for i in node.input
        )

    def fold(self, node: onnx.NodeProto) -> None:
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
                self.values[name] = Val("const", array=np.asarray(arr))

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
            pads = same_pads(
                dims[2:] if dims else None, kernel, strides, dilations, auto == "SAME_UPPER"
            )
        elif auto == "VALID":
            pads = [0] * (2 * nd)
        else:
            pads = list(a.get("pads", [0] * (2 * nd)))
        return pads[:nd], pads[nd:]
