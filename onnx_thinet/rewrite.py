"""Graph surgery: cut a channel group down to the kept channels and fold in consumer scales."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_thinet.channels import ChannelGroup, Consumer, ParamSlice, slice_channels

__all__ = ["apply_selection", "initializer_array"]


def apply_selection(
    model: onnx.ModelProto,
    group: ChannelGroup,
    kept: np.ndarray,
    consumer_scales: dict[str, np.ndarray] | None = None,
    consumer_refits: dict | None = None,
) -> None:
    """Slice `group` in place on `model` to the channels `kept` (sorted indices).

    The producer's filters, every per-channel parameter on the path, depthwise groups and
    channel-encoding Reshape constants are cut; each consumer loses the matching input
    channels, which are multiplied by `consumer_scales[consumer]` when given, or replaced by
    `consumer_refits[consumer]` (a Refit: [K_kept, F] matrix and bias).
    """
    kept = np.asarray(kept, dtype=np.int64)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(name for n in model.graph.node for name in n.input if name)
    for item in group.slices:
        _update_param(model, nodes, inits, uses, item,
                      lambda a, item=item: slice_channels(a, kept, group.channels, item.axis, item.inner))
    for consumer in group.consumers:
        refit = (consumer_refits or {}).get(consumer.node)
        if refit is not None:
            _update_param(model, nodes, inits, uses, consumer.weight,
                          lambda a, c=consumer, r=refit: _refit_layout(a, c, r.matrix, len(kept), group.channels))
            if refit.bias is not None:
                _set_bias(model, nodes, inits, uses, consumer, refit.bias)
            continue
        scale = None if consumer_scales is None else consumer_scales.get(consumer.node)
        _update_param(model, nodes, inits, uses, consumer.weight,
                      lambda a, c=consumer, s=scale: _cut_consumer(a, c.weight, kept, group.channels, s))
    for update in group.attr_updates:
        _set_int_attribute(nodes[update.node], update.attribute, len(kept) * update.inner)
    for fix in group.shape_fixes:
        _update_param(model, nodes, inits, uses, ParamSlice(fix.node, fix.input_index, 0),
                      lambda a, fix=fix: _fix_shape(a, fix.position, len(kept), group.channels))
    _drop_stale_shapes(model)


def _cut_consumer(array, weight: ParamSlice, kept, channels: int, scale) -> np.ndarray:
    cut = slice_channels(array, kept, channels, weight.axis, weight.inner)
    if scale is None:
        return cut
    factors = np.repeat(np.asarray(scale, dtype=np.float64), weight.inner)
    outer = cut.shape[weight.axis] // factors.size
    factors = np.tile(factors, outer)
    shape = [1] * cut.ndim
    shape[weight.axis] = factors.size
    return (cut.astype(np.float64) * factors.reshape(shape)).astype(array.dtype)


def _refit_layout(array: np.ndarray, consumer: Consumer, matrix: np.ndarray, kept: int, channels: int):
    """A [K_kept, F] refit matrix in the consumer's weight layout (conv [F, C', k...], Gemm, MatMul)."""
    if consumer.kind == "conv":
        in_kept = array.shape[1] // channels * kept
        return matrix.T.reshape(array.shape[0], in_kept, *array.shape[2:]).astype(array.dtype)
    return (matrix.T if consumer.transpose else matrix).astype(array.dtype)


def _set_bias(model, nodes, inits, uses, consumer: Consumer, bias: np.ndarray) -> None:
    """Give the consumer this bias (a Gemm's beta is folded in), adding the input if it had none."""
    node = nodes[consumer.node]
    index = consumer.bias_index
    for attr in node.attribute:
        if attr.name == "beta":
            attr.f = 1.0  # the refit bias is the whole additive term
    if len(node.input) > index and node.input[index]:
        dtype = numpy_helper.to_array(inits[node.input[index]]).dtype
        _update_param(model, nodes, inits, uses, ParamSlice(node.name, index, 0),
                      lambda a: bias.astype(dtype).reshape(-1))
        return
    name = _fresh_name(inits, f"{node.name}.bias")
    model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
    inits[name] = model.graph.initializer[-1]
    while len(node.input) < index:
        node.input.append("")
    node.input.append(name)


def _fix_shape(shape: np.ndarray, position: int, kept: int, channels: int) -> np.ndarray:
    shape = shape.copy()
    shape[position] = shape[position] // channels * kept
    return shape


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def _update_param(model, nodes, inits, uses, item: ParamSlice, transform) -> None:
    """Replace the initializer a node reads; a shared initializer is copied, not cut for all."""
    node = nodes[item.node]
    name = node.input[item.input_index]
    tensor = inits[name]
    new_array = transform(numpy_helper.to_array(tensor))
    if uses[name] > 1:
        new_name = _fresh_name(inits, f"{name}_{item.node}")
        uses[name] -= 1
        uses[new_name] = 1
        new_tensor = numpy_helper.from_array(new_array.astype(numpy_helper.to_array(tensor).dtype), new_name)
        model.graph.initializer.append(new_tensor)
        inits[new_name] = model.graph.initializer[-1]
        node.input[item.input_index] = new_name
        return
    tensor.CopyFrom(numpy_helper.from_array(new_array.astype(numpy_helper.to_array(tensor).dtype), name))


def _fresh_name(existing, base: str) -> str:
    name, k = base, 1
    while name in existing:
        name, k = f"{base}_{k}", k + 1
    return name


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, int(value)))
            return
    node.attribute.append(helper.make_attribute(name, int(value)))


def _drop_stale_shapes(model: onnx.ModelProto) -> None:
    """Intermediate shapes changed; shape inference recomputes them after all rewrites."""
    del model.graph.value_info[:]
