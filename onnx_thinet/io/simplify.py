"""onnx-simplifier without the weights it cannot fold.

It copies whatever it is given many times over (4.4 GB for VGG-16's 553 MB), so the large
weights of Conv, Gemm and MatMul go to it as graph inputs and its graph is grafted back onto
the model that holds them (`io.lifting`).
"""

from __future__ import annotations

import onnx

from onnx_thinet.io.lifting import graft_lifted, layer_weights, lift

__all__ = ["simplify_lifted"]


def simplify_lifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-simplifier on the graph with its large layer weights lifted out as graph inputs.

    It cannot fold a Conv, Gemm or MatMul weight. `model` is consumed: the result is `model`
    with the simplified graph, its weights where they were (none copied); on failure it is
    left as it was.
    """
    import onnxsim

    lifted = layer_weights(model)
    simplified, ok = onnxsim.simplify(lift(model, lifted), check_n=0, skip_shape_inference=False)
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    return graft_lifted(model, simplified, lifted)
