"""Model size and cost: parameters, FLOPs per layer (a multiply-add counts as 2 FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_thinet.io.graph import GraphIndex, static_input_shapes

__all__ = ["LayerCost", "count_params", "layer_costs", "total_flops"]

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class LayerCost:
    node: str
    op_type: str
    params: int
    flops: int | None  # None when shapes could not be inferred


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (weights, biases, BN statistics)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in _FLOAT_TYPES:
            total += int(np.prod(t.dims, dtype=np.int64))
    return total


def layer_costs(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> list[LayerCost]:
    """Params and FLOPs of each Conv/ConvTranspose/Gemm/MatMul for one sample (batch 1)."""
    shaped = static_input_shapes(model, input_shapes)
    index = GraphIndex.build(shaped)
    costs = []
    for node in shaped.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        params = sum(
            int(np.prod(index.initializers[i].dims, dtype=np.int64))
            for i in node.input if i in index.initializers
        )
        costs.append(LayerCost(node.name, node.op_type, params, _node_flops(index, node)))
    return costs


def total_flops(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    return int(sum(c.flops or 0 for c in layer_costs(model, input_shapes)))


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _node_flops(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    out = index.shapes.get(node.output[0])
    a = index.shapes.get(node.input[0])
    b = index.shapes.get(node.input[1]) if len(node.input) > 1 else None
    if b is None and len(node.input) > 1 and node.input[1] in index.initializers:
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
