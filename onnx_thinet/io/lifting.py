"""Third-party graph optimizers without the layer weights they leave alone.

onnx-simplifier copies whatever it is given many times over, and onnxruntime's optimizer writes
every weight to a file that must be read back (VGG-16: 553 MB each way). The large weights of
Conv, Gemm and MatMul go to them as graph inputs instead, and the optimized graph is grafted
back onto the model that holds them, so the weights are never copied at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx

from onnx_thinet.io.weightless import copy_fields, is_large_weight, weightless_copy

__all__ = ["LIFTED_ELEMENTS", "graft_lifted", "lift", "layer_weights"]

LIFTED_ELEMENTS = 1 << 18  # weights of 1 MB (float32) and more
_WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def layer_weights(model: onnx.ModelProto, unless_read_by: Mapping[str, Iterable[str]] | None = None,
                  through: Iterable[str] = ()) -> set[str]:
    """Large float initializers read only as the weight or bias of a Conv, Gemm or MatMul.

    `unless_read_by[layer op]`: op types that, reading such a layer's output, make its weights
    stay (an optimizer may fold that op into them: onnxruntime folds a Mul after a Conv), also
    when they read it through ops in `through` (which the optimizer may move or remove first:
    a Transpose between a tf2onnx Conv and its BatchNorm's Mul).
    """
    folding = {op: set(readers) for op, readers in (unless_read_by or {}).items()}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    large = {t.name for t in model.graph.initializer if is_large_weight(t, above=LIFTED_ELEMENTS - 1)}
    for node in model.graph.node:
        slots = _WEIGHT_SLOTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        large -= {name for k, name in enumerate(node.input) if k not in slots}
        if slots and _reaches(node, readers, folding.get(node.op_type, set()), set(through)):
            large -= set(node.input)
        for attr in node.attribute:  # subgraphs may read them too
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                large -= {i for g in [attr.g, *attr.graphs] for n in g.node for i in n.input}
    return large - {o.name for o in model.graph.output}


def _reaches(node: onnx.NodeProto, readers, targets: set[str], through: set[str]) -> bool:
    """Whether a reader of `node`'s outputs, directly or past `through` ops, is a `targets` op."""
    stack = [out for out in node.output if out]
    seen: set[str] = set()
    while targets and stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for reader in readers.get(name, []):
            if reader.op_type in targets:
                return True
            if reader.op_type in through:
                stack.extend(out for out in reader.output if out)
    return False


def lift(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` without the weight bytes of `names`, which become graph inputs."""
    light = weightless_copy(model, strip=lambda t: t.name in names)
    kept = [t for t in light.graph.initializer if t.name not in names]
    for tensor in light.graph.initializer:
        if tensor.name in names:
            light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    return light


def graft_lifted(source: onnx.ModelProto, optimized: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """`source` (consumed) with the graph of `optimized`, a lifted copy's result.

    The lifted weights the optimized graph still reads stay where they are in `source`; its
    other initializers go, and the optimized graph's own come in. The model's own fields
    (metadata, producer, opsets) and the graph's name stay the source's; its local functions
    are the optimizer's.
    """
    graph, name = optimized.graph, source.graph.name
    read = {v.name for v in graph.input if v.name in names}
    inputs = [v for v in graph.input if v.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    initializers = source.graph.initializer
    for k in reversed(range(len(initializers))):
        if initializers[k].name not in read:
            del initializers[k]
    for field in [f.name for f, _ in source.graph.ListFields() if f.name != "initializer"]:
        source.graph.ClearField(field)
    copy_fields(graph, source.graph, skip="initializer")
    initializers.extend(graph.initializer)
    source.graph.name = name
    del source.functions[:]
    source.functions.extend(optimized.functions)
    return source
