"""Graph surgery on hand-built channel groups: what each cut does to each weight, attribute and
shape constant, checked against the arrays directly and against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_thinet.channels.consumers import CONV, CONV_TRANSPOSE, LINEAR
from onnx_thinet.channels.layout import (
    AttrUpdate,
    ChannelGroup,
    Consumer,
    Layout,
    ParamSlice,
    Segment,
    ShapeFix,
)
from onnx_thinet.rewrite.surgery import apply_selection, initializer_array
from onnx_thinet.solve.selection import Refit
from tests.builders import Net

FULL8 = Layout.full(8)


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _chain(dead=(1, 3, 4, 6)):
    """conv1(3→8) → BN → Relu → conv2(8→4); conv2 reads nothing of the `dead` channels."""
    n = Net(0)
    h = n.node("Relu", [n.bn(n.conv("x", "conv1", 3, 8), "bn", 8)], "relu")
    n.conv(h, "conv2", 8, 4)
    n.plant("conv1", "conv2.w", list(dead))
    group = ChannelGroup(
        producer="conv1", producer_op="Conv", channels=8, output="conv1",
        slices=(ParamSlice("conv1", 1, 0, FULL8), ParamSlice("conv1", 2, 0, FULL8),
                *(ParamSlice("bn", j, 0, FULL8) for j in range(1, 5))),
        consumers=(Consumer("conv2", CONV, "relu", ParamSlice("conv2", 1, 1, FULL8)),),
        producers=("conv1",),
    )
    return n.model(["N", 3, 6, 6], "conv2", ["N", 4, 6, 6]), group


def test_cut_removes_filters_every_per_channel_parameter_and_reader_inputs():
    model, group = _chain()
    before = _arrays(model)
    kept = np.array([0, 2, 5, 7])
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    reference = _run(model, x)
    apply_selection(model, group, kept)
    after = _arrays(model)
    np.testing.assert_array_equal(after["conv1.w"], before["conv1.w"][kept])
    np.testing.assert_array_equal(after["conv1.b"], before["conv1.b"][kept])
    for name in ("bn.scale", "bn.bias", "bn.mean", "bn.var"):
        np.testing.assert_array_equal(after[name], before[name][kept])
    np.testing.assert_array_equal(after["conv2.w"], before["conv2.w"][:, kept])
    np.testing.assert_allclose(_run(model, x), reference, atol=1e-5)


@pytest.mark.parametrize("raw", [True, False])
def test_a_cut_weight_keeps_one_value_field(raw):
    """Raw weights are rewritten in place, others through a new tensor: either way one value
    field (raw bytes), the kept values, and no bytes of the old shape."""
    model, group = _chain()
    before = _arrays(model)
    tensors = {t.name: t for t in model.graph.initializer}
    for name in ("conv1.w", "conv2.w"):
        tensors[name].CopyFrom(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, before[name].shape,
                                                       before[name].ravel(), raw=raw))
    kept = np.array([0, 2, 5, 7])
    apply_selection(model, group, kept)
    tensors = {t.name: t for t in model.graph.initializer}
    for name, expected in (("conv1.w", before["conv1.w"][kept]), ("conv2.w", before["conv2.w"][:, kept])):
        tensor = tensors[name]
        assert list(tensor.dims) == list(expected.shape) and len(tensor.float_data) == 0
        assert len(tensor.raw_data) == expected.nbytes
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected)
    onnx.checker.check_model(model, full_check=True)


def test_reader_scales_multiply_the_kept_input_positions():
    model, group = _chain()
    before = _arrays(model)["conv2.w"]
    kept = np.array([0, 2, 5, 7])
    scales = np.array([1.0, 2.0, 0.5, -1.0])
    apply_selection(model, group, kept, consumer_scales={"conv2": scales})
    expected = before[:, kept] * scales[None, :, None, None]
    np.testing.assert_allclose(initializer_array(model, "conv2.w"), expected, rtol=1e-6)


def test_an_initializer_read_by_a_node_outside_the_group_is_copied_not_cut():
    model, group = _chain()
    shared = onnx.helper.make_node("Identity", ["conv1.b"], ["bias_copy"], name="reader")
    model.graph.node.append(shared)
    model.graph.output.append(onnx.helper.make_tensor_value_info("bias_copy", onnx.TensorProto.FLOAT, [8]))
    full = _arrays(model)["conv1.b"]
    apply_selection(model, group, np.array([0, 2, 5, 7]))
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert conv1.input[2] != "conv1.b"
    np.testing.assert_array_equal(initializer_array(model, "conv1.b"), full)
    np.testing.assert_array_equal(initializer_array(model, conv1.input[2]), full[[0, 2, 5, 7]])


def test_refit_goes_back_into_each_reader_layout():
    """A [K_kept·window, F] refit matrix becomes a conv [F, K, k, k], a ConvTranspose
    [K, F, k, k] (kernel flipped back), a Gemm weight stored transposed or not."""
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((4 * 9, 5))
    conv = CONV.from_matrix(matrix, (5, 8, 3, 3))
    np.testing.assert_array_equal(conv.reshape(5, -1).T, matrix)
    transposed = CONV_TRANSPOSE.from_matrix(matrix, (8, 5, 3, 3))
    assert transposed.shape == (4, 5, 3, 3)
    np.testing.assert_array_equal(CONV_TRANSPOSE.working(transposed).reshape(5, -1).T, matrix)
    linear = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(LINEAR.from_matrix(linear, (8, 5)), linear)
    np.testing.assert_array_equal(LINEAR.from_matrix(linear, (5, 8), transpose=True), linear.T)


def test_refit_with_bias_adds_the_bias_input_to_a_reader_without_one():
    n = Net(0)
    n.conv(n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu"), "conv2", 8, 4, bias=False)
    model = n.model(["N", 3, 6, 6], "conv2", ["N", 4, 6, 6])
    group = ChannelGroup("conv1", "Conv", 8, "conv1", (ParamSlice("conv1", 1, 0, FULL8),),
                         (Consumer("conv2", CONV, "relu", ParamSlice("conv2", 1, 1, FULL8)),),
                         producers=("conv1",))
    matrix = np.arange(4 * 9 * 4, dtype=np.float64).reshape(36, 4)
    bias = np.array([1.0, 2.0, 3.0, 4.0])
    apply_selection(model, group, np.array([0, 1, 2, 3]), consumer_refits={"conv2": Refit(matrix, bias)})
    conv2 = next(nd for nd in model.graph.node if nd.name == "conv2")
    assert len(conv2.input) == 3
    np.testing.assert_array_equal(initializer_array(model, conv2.input[2]), bias.astype(np.float32))
    np.testing.assert_array_equal(initializer_array(model, "conv2.w").reshape(4, -1).T, matrix)


def test_depthwise_group_and_shape_constants_lose_the_removed_positions():
    """A concatenated layout (group at entries 2..5 of 8), a depthwise group count, a Split size
    attribute and a Reshape constant: each loses exactly the removed channels' positions."""
    layout = Layout((Segment(2, 0, 4),), 8)
    n = Net(0)
    n.conv("x", "dw", 8, 8, group=8)
    n.nodes.append(onnx.helper.make_node("Split", ["dw"], ["a", "b"], name="split", axis=1))
    n.node("Reshape", ["a", n.const("target", np.array([1, 6, -1]))], "flat")
    n.nodes[-2].attribute.append(onnx.helper.make_attribute("split", [6, 2]))
    model = onnx.helper.make_model(onnx.helper.make_graph(n.nodes, "g", [], [], n.inits))
    group = ChannelGroup(
        "p", "Conv", 4, "x", slices=(ParamSlice("dw", 1, 0, layout),),
        consumers=(), attr_updates=(AttrUpdate("dw", "group", layout, 8),),
        shape_fixes=(ShapeFix("split", -1, 0, layout.window(0, 6), 6),
                     ShapeFix("flat", 1, 1, layout.window(0, 6), 6)),
    )
    apply_selection(model, group, np.array([1, 3]))
    dw = next(nd for nd in model.graph.node if nd.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 6
    assert initializer_array(model, "dw.w").shape[0] == 6
    split = next(nd for nd in model.graph.node if nd.name == "split")
    assert list(next(a.ints for a in split.attribute if a.name == "split")) == [4, 2]
    np.testing.assert_array_equal(initializer_array(model, "target"), [1, 4, -1])


def test_consumer_kinds_equal_their_names_for_code_that_still_compares_strings():
    assert CONV == "conv" and LINEAR == "linear" and CONV_TRANSPOSE == "conv_transpose"
    assert CONV_TRANSPOSE != "conv" and CONV != CONV_TRANSPOSE
    assert CONV_TRANSPOSE.windowed and CONV_TRANSPOSE.channel_axis(4) == 1 and LINEAR.channel_axis(3) == 2
    assert Consumer("c", "conv_transpose", "x", ParamSlice("c", 1, 0, FULL8)).kind is CONV_TRANSPOSE
