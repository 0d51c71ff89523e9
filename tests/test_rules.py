"""Channel rules, one family at a time: each rule is called on a hand-built node and must
answer with the right `Step` variant (Through / Consumed / CoupledStop / Blocked) and the
right axis, layout and parameter slices. Plus the coupled traversal the registry declares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet import SlimConfig, analyze, canonicalize, slim
from onnx_thinet.channels.layout import Layout
from onnx_thinet.channels.rules import Blocked, Consumed, CoupledStop, Flow, RuleContext, Through
from onnx_thinet.io.data import ArrayData
from onnx_thinet.io.graph import GraphIndex, infer_shapes
from onnx_thinet.ops import REGISTRY, channel_rule, traversal
from tests import builders

C = 8


def _context(nodes, inits: dict, x_shape=("N", C, 6, 6)) -> RuleContext:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return RuleContext(GraphIndex.build(infer_shapes(model)), C, 17)


def _step(node: onnx.NodeProto, inits: dict | None = None, flows=None, x_shape=("N", C, 6, 6)):
    ctx = _context([node], inits or {}, x_shape)
    flows = flows or {0: Flow("x", 1, Layout.full(C))}
    return channel_rule(node.op_type)(ctx, node, flows)


def test_unary_ops_pass_the_channels_through_unchanged():
    for op in ("Relu", "Mish", "Round", "Celu", "ThresholdedRelu", "HardSigmoid", "Identity"):
        step = _step(helper.make_node(op, ["x"], ["y"], name="n"))
        assert step == Through((Flow("y", 1, Layout.full(C)),)), op


def test_channels_on_a_parameter_input_are_blocked():
    node = helper.make_node("PRelu", ["s", "x"], ["y"], name="n")
    step = _step(node, {"s": np.ones((C, 1, 1), np.float32)}, flows={1: Flow("x", 1, Layout.full(C))})
    assert isinstance(step, Blocked) and "parameter" in step.reason


def test_per_channel_constants_are_sliced_with_the_channels():
    node = helper.make_node("Mul", ["x", "k"], ["y"], name="scale")
    step = _step(node, {"k": np.ones((1, C, 1, 1), np.float32)})
    assert isinstance(step, Through) and [s.input_index for s in step.slices] == [1]
    assert _step(node, {"k": np.float32(2.0)}).slices == ()  # a scalar needs no cut


def test_two_computed_operands_couple_the_channels():
    step = _step(helper.make_node("Add", ["x", "other"], ["y"], name="res"))
    assert isinstance(step, CoupledStop) and "residual" in step.reason
    step = _step(helper.make_node("Where", ["c", "x", "other"], ["y"], name="w"),
                 flows={1: Flow("x", 1, Layout.full(C))})
    assert isinstance(step, CoupledStop)


def test_norms_slice_their_parameters_or_block():
    params = {k: np.ones(C, np.float32) for k in ("s", "b", "m", "v")}
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    step = _step(bn, params)
    assert isinstance(step, Through) and [s.input_index for s in step.slices] == [1, 2, 3, 4]
    inorm = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], name="in")
    assert isinstance(_step(inorm, {"s": params["s"]}), Blocked)  # bias not constant


def test_pools_and_reductions_keep_the_channel_axis_or_block():
    assert isinstance(_step(helper.make_node("GlobalLpPool", ["x"], ["y"], name="p")), Through)
    reduce_hw = helper.make_node("ReduceL2", ["x", "a"], ["y"], name="r", keepdims=0)
    assert _step(reduce_hw, {"a": np.array([2, 3])}).outputs[0].axis == 1
    reduce_c = helper.make_node("ReduceL1", ["x", "a"], ["y"], name="r")
    assert isinstance(_step(reduce_c, {"a": np.array([1])}), Blocked)


def test_conv_consumes_dense_and_carries_depthwise():
    dense = helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3, 3])
    step = _step(dense, {"w": np.ones((4, C, 3, 3), np.float32)})
    assert isinstance(step, Consumed) and step.consumer.kind == "conv"
    dw = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=C, kernel_shape=[3, 3])
    step = _step(dw, {"w": np.ones((C, 1, 3, 3), np.float32)})
    assert isinstance(step, Through) and step.attr_updates[0].attribute == "group"


def test_flatten_keeps_the_channels_as_the_outer_factor():
    step = _step(helper.make_node("Flatten", ["x"], ["y"], name="f"), x_shape=("N", C, 2, 3))
    assert step.outputs[0].axis == 1 and step.outputs[0].layout.inner == 6


def test_concat_shifts_each_inputs_channels():
    node = helper.make_node("Concat", ["a", "x"], ["y"], name="cat", axis=1)
    ctx = _context([helper.make_node("Identity", ["x"], ["a"]), node], {})
    step = channel_rule("Concat")(ctx, node, {1: Flow("x", 1, Layout.full(C))})
    assert isinstance(step, Through) and step.outputs[0].layout.total == 2 * C


@pytest.mark.parametrize("op", ["Softsign", "Abs", "Neg", "Exp", "Sqrt", "Reciprocal", "Erf", "Celu",
                                "ThresholdedRelu", "Floor", "Ceil", "Round"])
def test_the_twelve_unary_ops_are_traversed_by_coupled_pruning(op):
    assert REGISTRY[op].rule is not None and traversal(op) == "data"


def _residual_through_exp() -> onnx.ModelProto:
    """stem -> Relu -> [conv1 -> Relu -> conv2 -> Exp] + Neg(stem) -> head: each side of the sum
    reaches it through an op coupled pruning could not traverse before (Exp, Neg)."""
    n = builders.Net(0)
    stem = n.node("Relu", [n.conv("x", "stem", 3, 8)], "stem_relu")
    h = n.conv(n.node("Relu", [n.conv(stem, "conv1", 8, 8)], "relu1"), "conv2", 8, 8)
    h = n.node("Add", [n.node("Exp", [h], "exp"), n.node("Neg", [stem], "neg")], "add")
    n.conv(n.node("Relu", [h], "relu_out"), "head", 8, 4)
    return n.model(["N", 3, 8, 8], "head", ["N", 4, 8, 8])


def test_prune_coupled_joins_a_residual_through_newly_traversed_ops():
    model = canonicalize(_residual_through_exp())
    assert "conv2" in {c.producer for c in analyze(model).coupled}
    joint = analyze(model, prune_coupled=True)
    assert "stem + conv2" in {g.producer for g in joint.groups}
    x = builders.calibration(model, n=16)
    config = SlimConfig(keep_ratio=0.5, prune_coupled=True, reconstruct="scale", correct=False)
    result = slim(model, ArrayData({"x": x}), config)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights["stem.w"].shape[0] == weights["conv2.w"].shape[0] == 4
