"""Model size and cost: parameters, FLOPs per layer (a multiply-add counts as 2 FLOPs).

Costs are counted on the canonical graph (Constant nodes are initializers there, so weights
stored in Constant nodes count) at one stated input size: the calibration sample's, or the
user's `--input-shape`. A dynamic height or width with no size given is not guessed: its
FLOPs are unknown (None). Shapes that ONNX shape inference cannot derive are read from one
onnxruntime run on zeros at that size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_thinet.io.graph import GraphIndex, graph_inputs, static_input_shapes
from onnx_thinet.io.weightless import weightless_copy

__all__ = ["LayerCost", "cost_input_shapes", "count_params", "layer_costs", "total_flops"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
_COSTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LayerCost:
    node: str
    op_type: str
    params: int
    flops: int | None  # None when the input size or the shapes are unknown


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers and Constant nodes (weights, biases, BN statistics)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            total += int(np.prod(t.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(a.t.dims, dtype=np.int64))
                elif a.name == "value_floats":
                    total += len(a.floats)
                elif a.name == "value_float":
                    total += 1
    return total


def cost_input_shapes(model: onnx.ModelProto, fixed: Shapes | None = None) -> Shapes | None:
    """The batch-1 input sizes costs are counted at, or None when a dim other than the batch
    is dynamic and `fixed` does not give it."""
    init_names = {i.name for i in model.graph.initializer}
    shapes: Shapes = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if fixed and inp.name in fixed:
            shapes[inp.name] = (1, *tuple(int(d) for d in fixed[inp.name][1:]))
            continue
        dims = inp.type.tensor_type.shape.dim
        if not inp.type.tensor_type.HasField("shape"):
            return None
        values = [1] + [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in list(dims)[1:]]
        if any(v is None for v in values) or not dims:
            return None
        shapes[inp.name] = tuple(int(v) for v in values)
    return shapes


def layer_costs(model: onnx.ModelProto, input_shapes: Shapes | None = None) -> list[LayerCost]:
    """Params and FLOPs of each Conv/ConvTranspose/Gemm/MatMul for one sample (batch 1).

    FLOPs are None throughout when the input size is unknown (see `cost_input_shapes`).
    """
    shapes = cost_input_shapes(model, input_shapes)
    # counting reads dims alone: the sized copy has none of the weights' bytes (VGG-16's
    # copies had been 553 MB each, two per run)
    shaped = static_input_shapes(weightless_copy(model), shapes) if shapes is not None else model
    index = GraphIndex.build(shaped)
    nodes = [n for n in shaped.graph.node if n.op_type in _COSTED]
    if shapes is not None:
        _fill_runtime_shapes(model, index, nodes, shapes)
    costs = []
    for node in nodes:
        params = sum(
            int(np.prod(index.initializers[i].dims, dtype=np.int64))
            for i in node.input if i in index.initializers
        )
        flops = _node_flops(index, node) if shapes is not None else None
        costs.append(LayerCost(node.name, node.op_type, params, flops))
    return costs


def total_flops(model: onnx.ModelProto, input_shapes: Shapes | None = None) -> int:
    return int(sum(c.flops or 0 for c in layer_costs(model, input_shapes)))


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _fill_runtime_shapes(model: onnx.ModelProto, index: GraphIndex, nodes, shapes: Shapes) -> None:
    """Shapes of costed tensors that inference missed, from one onnxruntime run on zeros of
    `shapes` (of `model` sized to them, with its weights: copied only here, where needed)."""
    missing = sorted({name for n in nodes for name in (n.input[0], n.output[0])
                      if not _static(index.shapes.get(name)) and name not in index.initializers})
    if not missing:
        return
    from onnx_thinet.calibration.runtime import run_model, truncated_model
    from onnx_thinet.io.feeds import ONNX_TO_NUMPY

    try:
        model = static_input_shapes(model, shapes)
        feeds = {i.name: np.zeros(shapes[i.name], ONNX_TO_NUMPY.get(i.type.tensor_type.elem_type, np.float32))
                 for i in graph_inputs(model)}
        values = run_model(truncated_model(model, missing), feeds, missing)
    except Exception as exc:  # a model that cannot run at this size keeps its unknown FLOPs
        logger.info("could not run the model to measure layer shapes: %s", exc)
        return
    for name, value in zip(missing, values):
        index.shapes[name] = tuple(int(d) for d in value.shape)


def _node_flops(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    out = index.shapes.get(node.output[0])
    a = index.shapes.get(node.input[0])
    b = index.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if len(node.input) > 1 and node.input[1] in index.initializers:
        b = tuple(index.initializers[node.input[1]].dims)
    if not (_static(out) and _static(a) and _static(b)):
        return None
    attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if node.op_type == "Conv":
        # out: [N, F, *spatial]; weight: [F, C/group, *kernel]
        return 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        # weight: [C, F/group, *kernel]; every input element scatters into F/group·kernel outputs
        return 2 * int(np.prod(a, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
    if node.op_type == "Gemm":
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return 2 * int(np.prod(out, dtype=np.int64)) * int(k)
    return 2 * int(np.prod(out, dtype=np.int64)) * int(a[-1])
