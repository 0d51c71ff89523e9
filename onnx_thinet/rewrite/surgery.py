"""Graph surgery: cut a channel group down to the kept channels and fold in the reconstruction."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_thinet.channels.layout import (
    ChannelGroup,
    Consumer,
    ParamSlice,
    ShapeFix,
    removed_positions,
    slice_channels,
)

__all__ = ["apply_selection", "initializer_array", "initializer_dims"]


class _Initializers:
    """Edits node inputs' initializers; one shared with other nodes is copied, not cut for all."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.uses = Counter(name for n in model.graph.node for name in n.input if name)

    def update(self, node_name: str, input_index: int, transform: Callable[[np.ndarray], np.ndarray]) -> None:
        node = self.nodes[node_name]
        name = node.input[input_index]
        old = numpy_helper.to_array(self.tensors[name])
        new = np.asarray(transform(old)).astype(old.dtype, copy=False)
        if self.uses[name] > 1:
            self.uses[name] -= 1
            name = self._fresh(f"{name}_{node_name}")
            self.uses[name] = 1
            node.input[input_index] = name
            self.add(name, new)
            return
        _overwrite(self.tensors[name], new)

    def add(self, base: str, array: np.ndarray) -> str:
        name = self._fresh(base)
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        self.tensors[name] = self.model.graph.initializer[-1]
        return name

    def _fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.tensors:
            name, k = f"{base}_{k}", k + 1
        return name


def _overwrite(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """`tensor` now holds `array` (its own type). Raw little-endian bytes are written in place:
    a new TensorProto copied into it moved VGG-16's 411 MB FC weight three times."""
    native = array.dtype.kind in "fiu" and array.dtype.isnative and sys.byteorder == "little"
    if native and tensor.HasField("raw_data") and tensor.data_type == helper.np_dtype_to_tensor_dtype(array.dtype):
        del tensor.dims[:]
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array).tobytes()
    else:
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def apply_selection(
    model: onnx.ModelProto,
    group: ChannelGroup,
    kept: np.ndarray,
    consumer_scales: dict[str, np.ndarray] | None = None,
    consumer_refits: dict | None = None,
) -> None:
    """Slice `group` in place on `model` to the channels `kept` (sorted indices).

    The producer's filters, every per-channel parameter on the path, depthwise groups,
    channel-counting shape and split constants are cut; each consumer loses the matching input
    positions, which are multiplied by `consumer_scales[consumer]` when given, or replaced by
    `consumer_refits[consumer]` (a Refit: [K_kept, F] matrix and bias).
    """
    kept = np.asarray(kept, dtype=np.int64)
    channels = group.channels
    params = _Initializers(model)
    for item in group.slices:
        params.update(item.node, item.input_index,
                      lambda a, s=item: slice_channels(a, kept, channels, s.axis, s.layout))
    for consumer in group.consumers:
        refit = (consumer_refits or {}).get(consumer.node)
        weight = consumer.weight
        if refit is not None:
            params.update(consumer.node, weight.input_index,
                          lambda a, c=consumer, r=refit: _refit_layout(a, c, r.matrix, kept, channels))
            if refit.bias is not None:
                _set_bias(params, consumer, refit.bias)
            continue
        scale = (consumer_scales or {}).get(consumer.node)
        params.update(consumer.node, weight.input_index,
                      lambda a, w=weight, s=scale: _cut_consumer(a, w, kept, channels, s))
    for update in group.attr_updates:
        lost = len(removed_positions(update.layout, kept, channels, update.length))
        _set_int_attribute(params.nodes[update.node], update.attribute, (update.length - lost) // update.per)
    for fix in group.shape_fixes:
        _apply_shape_fix(params, fix, len(removed_positions(fix.layout, kept, channels, fix.length)))
    del model.graph.value_info[:]  # stale; shape inference runs again after the rewrite


def _cut_consumer(array: np.ndarray, weight: ParamSlice, kept, channels: int, scale) -> np.ndarray:
    """Scale the kept channels' input positions by `scale` and drop the removed ones."""
    if scale is not None:
        length = array.shape[weight.axis]
        per_channel = np.ones(channels)
        per_channel[kept] = scale
        factors = np.ones(length)
        pos, ids = weight.layout.positions(np.arange(channels), length)
        factors[pos] = per_channel[ids]
        shape = [1] * array.ndim
        shape[weight.axis] = length
        array = (array.astype(np.float64) * factors.reshape(shape)).astype(array.dtype)
    return slice_channels(array, kept, channels, weight.axis, weight.layout)


def _refit_layout(array: np.ndarray, consumer: Consumer, matrix: np.ndarray, kept, channels: int):
    """A [K_kept, F] refit matrix in the consumer's stored weight layout."""
    return consumer.kind.from_matrix(matrix, array.shape, consumer.transpose)


def _set_bias(params: _Initializers, consumer: Consumer, bias: np.ndarray) -> None:
    """Give the consumer this bias (a Gemm's beta becomes 1), adding the input if it had none."""
    node = params.nodes[consumer.node]
    index = consumer.bias_index
    for attr in node.attribute:
        if attr.name == "beta":
            attr.f = 1.0  # the refit bias is the whole additive term
    if len(node.input) > index and node.input[index]:
        params.update(node.name, index, lambda a: bias.reshape(-1))
        return
    dtype = helper.tensor_dtype_to_np_dtype(params.tensors[node.input[1]].data_type)
    name = params.add(f"{node.name}.bias", bias.astype(dtype))
    while len(node.input) < index:
        node.input.append("")
    node.input.append(name)


def _apply_shape_fix(params: _Initializers, fix: ShapeFix, lost: int) -> None:
    def shrink(values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values[fix.position] -= lost
        return values

    if fix.input_index >= 0:
        params.update(fix.node, fix.input_index, shrink)
        return
    for attr in params.nodes[fix.node].attribute:
        if attr.name == "split":
            values = shrink(np.array(list(attr.ints), dtype=np.int64))
            attr.CopyFrom(helper.make_attribute("split", [int(v) for v in values]))


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, int(value)))
            return
    node.attribute.append(helper.make_attribute(name, int(value)))


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_initializer(model, name))


def initializer_dims(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    """An initializer's shape, without reading its data."""
    return tuple(int(d) for d in _initializer(model, name).dims)


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for t in model.graph.initializer:
        if t.name == name:
            return t
    raise KeyError(name)
