"""onnx-simplifier without the weights it cannot fold.

It copies whatever it is given many times over (4.4 GB for VGG-16's 553 MB), so the large
weights of Conv, Gemm and MatMul go to it as graph inputs and come back afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_thinet.io.weightless import is_large_weight, weightless_copy

__all__ = ["simplify_lifted"]


def simplify_lifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-simplifier on the graph with its large layer weights lifted out as graph inputs.

    It cannot fold a Conv, Gemm or MatMul weight, but it copies whatever it is given many times
    over (4.4 GB for VGG-16's 553 MB), so those weights stay here and go back in afterwards.
    """
    import onnxsim

    lifted = _layer_weights(model, _LIFTED_ELEMENTS)
    light = weightless_copy(model, strip=lambda t: t.name in lifted)
    _initializers_to_inputs(light, lifted)
    simplified, ok = onnxsim.simplify(light, check_n=0, skip_shape_inference=False)
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    _inputs_to_initializers(simplified, model, lifted)
    return simplified


_LIFTED_ELEMENTS = 1 << 18  # weights of 1 MB (float32) and more
_WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def _layer_weights(model: onnx.ModelProto, elements: int) -> set[str]:
    """Large float initializers read only as the weight or bias of a Conv, Gemm or MatMul."""
    large = {t.name for t in model.graph.initializer
             if is_large_weight(t) and int(np.prod(t.dims, dtype=np.int64)) >= elements}
    for node in model.graph.node:
        slots = _WEIGHT_SLOTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        large -= {name for k, name in enumerate(node.input) if k not in slots}
        for attr in node.attribute:  # subgraphs may read them too
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                large -= {i for g in [attr.g, *attr.graphs] for n in g.node for i in n.input}
    return large - {o.name for o in model.graph.output}


def _initializers_to_inputs(light: onnx.ModelProto, names: set[str]) -> None:
    kept = [t for t in light.graph.initializer if t.name not in names]
    lifted = [t for t in light.graph.initializer if t.name in names]
    for tensor in lifted:
        light.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)


def _inputs_to_initializers(simplified: onnx.ModelProto, source: onnx.ModelProto, names: set[str]) -> None:
    """Put the lifted weights back (a copy from `source`), as initializers, not graph inputs."""
    present = [v.name for v in simplified.graph.input if v.name in names]
    inputs = [v for v in simplified.graph.input if v.name not in names]
    del simplified.graph.input[:]
    simplified.graph.input.extend(inputs)
    wanted = set(present)
    simplified.graph.initializer.extend(t for t in source.graph.initializer if t.name in wanted)
