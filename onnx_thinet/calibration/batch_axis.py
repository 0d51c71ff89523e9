"""Which segments compute every image from that image alone, so that a model exported with a
fixed batch may still run them on whole calibration batches.

A model whose inputs fix the batch (a U-Net exported with batch 1) must otherwise run each
segment one image at a time: thousands of onnxruntime calls of a few milliseconds. Most of its
segments are convolutions, activations, pools and skip Concats, which never read the batch
size; only a few nodes (a Reshape to [1, classes, H·W], a Resize to fixed sizes) do, and the
segments holding them keep running in pieces of the model's batch.

The table is deliberately short: an op missing from it only costs speed, never correctness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_thinet.io.graph import tensor_shape

__all__ = ["runs_per_sample"]


class _Lookups:
    """The constants and ranks the checks read. A whole `GraphIndex` (every node's producer
    and readers) per segment cost the U-Net's 216 segments 0.7 s under cProfile."""

    def __init__(self, model: onnx.ModelProto):
        self.initializers = {t.name: t for t in model.graph.initializer}
        graph = model.graph
        self._infos = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}

    def rank(self, name: str) -> int | None:
        info = self._infos.get(name)
        shape = None if info is None else tensor_shape(info)
        return None if shape is None else len(shape)

    def const(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


Check = Callable[[onnx.NodeProto, _Lookups], bool]


def _constant(index: _Lookups, name: str) -> bool:
    return name in index.initializers


def _data_rank(node: onnx.NodeProto, index: _Lookups) -> int | None:
    """The largest rank among the node's computed (per-image) inputs, if all are known."""
    ranks = [index.rank(i) for i in node.input if i and not _constant(index, i)]
    return None if not ranks or None in ranks else max(ranks)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _data_first(node: onnx.NodeProto, index: _Lookups) -> bool:
    """Input 0 is the image data; every other input is a weight (Conv, BatchNormalization)."""
    return bool(node.input) and not _constant(index, node.input[0]) and all(
        not name or _constant(index, name) for name in node.input[1:])


def _broadcast(node: onnx.NodeProto, index: _Lookups) -> bool:
    """Elementwise: a constant operand must not have a batch axis of its own (lower rank than
    the data, or a leading 1)."""
    rank = _data_rank(node, index)
    if rank is None:
        return False
    for name in node.input:
        if name and _constant(index, name):
            dims = list(index.initializers[name].dims)
            if len(dims) >= rank and dims[0] != 1:
                return False
    return True


def _axis_not_batch(node: onnx.NodeProto, index: _Lookups, default: int) -> bool:
    """Ops along one axis (Concat, Softmax, Flatten): any axis but the batch, constants aside."""
    if any(name and _constant(index, name) for name in node.input):
        return False
    axis = int(_attr(node, "axis", default))
    if axis > 0:
        return True
    rank = _data_rank(node, index)
    return rank is not None and axis < 0 and axis + rank > 0


def _resize(node: onnx.NodeProto, index: _Lookups) -> bool:
    """Resize by constant scales that keep the batch (sizes name the batch: they stay in pieces)."""
    inputs = list(node.input) + [""] * 4
    scales, sizes = (inputs[1], "") if len(node.input) == 2 else (inputs[2], inputs[3])  # opset 10: (X, scales)
    if sizes or not scales or not _constant(index, scales) or _constant(index, inputs[0]):
        return False
    value = index.const(scales)
    return value.size > 0 and float(value.reshape(-1)[0]) == 1.0


def _gemm(node: onnx.NodeProto, index: _Lookups) -> bool:
    return _data_first(node, index) and not _attr(node, "transA", 0)


def _matmul(node: onnx.NodeProto, index: _Lookups) -> bool:
    """Data times a 2-D weight: the data's leading axes are batch-like and stay apart."""
    return (len(node.input) == 2 and not _constant(index, node.input[0]) and _constant(index, node.input[1])
            and len(index.initializers[node.input[1]].dims) == 2)


def _max_pool(node: onnx.NodeProto, index: _Lookups) -> bool:
    """MaxPool's optional indices count from the start of the whole batch."""
    return _data_first(node, index) and not (len(node.output) > 1 and node.output[1])


def _batchnorm(node: onnx.NodeProto, index: _Lookups) -> bool:
    return _data_first(node, index) and not _attr(node, "training_mode", 0)


_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
          "Celu", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs", "Neg",
          "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Identity", "Cast", "Dropout", "Clip")
_CHECKS: dict[str, Check] = {
    **{op: _data_first for op in _UNARY},  # Clip's min/max and Dropout's ratio are constants
    **{op: _data_first for op in ("Conv", "ConvTranspose", "AveragePool", "LpPool",
                                  "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization",
                                  "LRN", "Upsample")},
    **{op: _broadcast for op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "PRelu")},
    "Concat": lambda node, index: _axis_not_batch(node, index, 0),
    "Softmax": lambda node, index: _axis_not_batch(node, index, -1),
    "LogSoftmax": lambda node, index: _axis_not_batch(node, index, -1),
    "Flatten": lambda node, index: _axis_not_batch(node, index, 1),
    "MaxPool": _max_pool,
    "Resize": _resize,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,
}


def runs_per_sample(nodes: Sequence[onnx.NodeProto], model: onnx.ModelProto) -> bool:
    """True when every node computes each image from that image alone, whatever the batch size.

    Upsample is only listed with its scales as an attribute (opset < 9: no second input).
    """
    index = _Lookups(model)
    for node in nodes:
        check = _CHECKS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if check is None or not check(node, index):
            return False
        if node.op_type == "Upsample" and len(node.input) > 1:
            return False
    return True
