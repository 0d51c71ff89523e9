"""The five real-graph failures of the fine-tuning path, each rebuilt as a tiny graph in code.

Each graph is slimmed at keep 0.5, exported to PyTorch, loaded, run, and brought back with
``to_onnx``; the module and the re-exported ONNX must match onnxruntime on the slim model
within 1e-5 relative, and the graph's input and output names must survive verbatim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnx_thinet import SlimConfig, export_torch, slim, to_onnx  # noqa: E402
from onnx_thinet.io.data import ArrayData  # noqa: E402
from onnx_thinet.pytorch.export import load_exported  # noqa: E402
from tests.builders import OPSET, Net  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5


def _model(n: Net, x: str, x_shape, out: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        n.nodes, "net",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        n.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])  # give the output its shape
    onnx.checker.check_model(model, full_check=True)
    return model


def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.max(np.abs(ref - got)) / max(float(np.max(np.abs(ref))), 1e-12))


def _slim(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    x = np.random.default_rng(1).standard_normal((32, *shape)).astype(np.float32)
    config = SlimConfig(keep_ratio=0.5, reconstruct="scale", correct=False)
    result = slim(model, ArrayData({model.graph.input[0].name: x}), config)
    assert result.params_after < result.params_before  # something was really cut
    return result.model


def slim_roundtrip(model: onnx.ModelProto, shapes: list[tuple[int, ...]], tmp: Path) -> str:
    """slim at keep 0.5 -> export-torch -> load -> forward -> to_onnx, checked at `shapes`."""
    src = tmp / "slim.onnx"
    onnx.save(_slim(model, shapes[0][1:]), str(src))
    model_py = export_torch(src, tmp / "torch")
    module = load_exported(model_py)
    back = to_onnx(module, src, tmp / "back.onnx")
    ref_sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    back_sess = ort.InferenceSession(str(back), providers=["CPUExecutionProvider"])
    name = ref_sess.get_inputs()[0].name
    for seed, shape in enumerate(shapes):
        x = np.random.default_rng(10 + seed).standard_normal(shape).astype(np.float32)
        ref = ref_sess.run(None, {name: x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        got = [got] if isinstance(got, torch.Tensor) else list(got)
        for r, g, b in zip(ref, got, back_sess.run(None, {name: x}), strict=True):
            assert _rel(r, g.numpy()) <= TOL
            assert _rel(r, b) <= TOL
    src_m, back_m = onnx.load(str(src)), onnx.load(str(back))
    assert [i.name for i in back_m.graph.input] == [i.name for i in src_m.graph.input]
    assert [o.name for o in back_m.graph.output] == [o.name for o in src_m.graph.output]
    return model_py.read_text()


def _chain(n: Net, x: str, cin: int = 3) -> str:
    """conv(8) -> Relu -> conv(6) -> Relu: a prunable group feeding a second conv."""
    h = n.node("Relu", [n.conv(x, "conv1", cin, 8)], "relu1")
    return n.node("Relu", [n.conv(h, "conv2", 8, 6)], "relu2")


def test_numeric_input_and_output_names(tmp_path: Path) -> None:
    """(a) PyTorch exports name tensors '4195' or 'input.1': both must survive to_onnx."""
    n = Net(0)
    h = _chain(n, "input.1")
    n.nodes.append(helper.make_node("Conv", [h, n.weight("head.w", (4, 6, 1, 1))], ["4195"]))
    model = _model(n, "input.1", ["N", 3, 8, 8], "4195")
    slim_roundtrip(model, [(2, 3, 8, 8), (3, 3, 8, 8)], tmp_path)


def test_range_anchor_grid(tmp_path: Path) -> None:
    """(b) YOLOv8 anchors: Shape -> Gather -> Range -> Cast -> Add 0.5, added to the features."""
    n = Net(0)
    h = n.conv(_chain(n, "x"), "head", 6, 4)
    width = n.node("Gather", [n.node("Shape", [h], "shape"), n.const("i3", np.int64(3))], "width")
    grid = n.node("Range", [n.const("zero", np.int64(0)), width, n.const("one", np.int64(1))], "grid")
    grid = n.node("Cast", [grid], "grid_f", to=TensorProto.FLOAT)
    grid = n.node("Add", [grid, n.const("half", np.float32(0.5))], "centers")
    n.node("Add", [h, grid], "y")
    model = _model(n, "x", ["N", 3, "H", "W"], "y")  # dynamic: the grid is not folded away
    assert "torch.arange(" in slim_roundtrip(model, [(2, 3, 8, 8), (1, 3, 8, 12)], tmp_path)


def test_resize_to_runtime_sizes_and_reshape_to_computed_shape(tmp_path: Path) -> None:
    """(c) FPN: Resize to sizes taken from Shape at run time; Reshape to a computed shape."""
    n = Net(0)
    lateral = _chain(n, "x")
    deep = n.node("Relu", [n.conv(lateral, "down", 6, 6, strides=[2, 2])], "down_relu")
    sizes = n.node("Concat", [
        n.node("Slice", [n.node("Shape", [deep], "deep_shape"), n.const("s0", np.array([0])),
                         n.const("s2", np.array([2]))], "deep_nc"),
        n.node("Slice", [n.node("Shape", [lateral], "lat_shape"), n.const("s2b", np.array([2])),
                         n.const("s4", np.array([4]))], "lat_hw"),
    ], "sizes", axis=0)
    up = n.node("Resize", [deep, "", "", sizes], "up", mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    h = n.conv(n.node("Add", [up, lateral], "merge"), "head", 6, 4)
    batch = n.node("Unsqueeze", [n.node("Gather", [n.node("Shape", [h], "h_shape"),
                                                   n.const("i0", np.int64(0))], "batch"),
                                 n.const("ax0", np.array([0]))], "batch_1d")
    flat = n.node("Concat", [batch, n.const("minus1", np.array([-1]))], "flat_shape", axis=0)
    n.node("Reshape", [h, flat], "y")
    model = _model(n, "x", ["N", 3, "H", "W"], "y")
    slim_roundtrip(model, [(2, 3, 16, 16), (1, 3, 24, 20)], tmp_path)


def test_max_as_leaky_clamp(tmp_path: Path) -> None:
    """(d) tf2onnx writes LeakyRelu-like clamps as Max(x, 0.2 * x)."""
    n = Net(0)
    c = n.conv("x", "conv1", 3, 8)
    h = n.node("Max", [c, n.node("Mul", [c, n.const("slope", np.float32(0.2))], "scaled")], "leaky")
    n.conv(n.node("Relu", [n.conv(h, "conv2", 8, 6)], "relu2"), "y", 6, 4)
    model = _model(n, "x", ["N", 3, 8, 8], "y")
    assert "torch.maximum(" in slim_roundtrip(model, [(2, 3, 8, 8), (3, 3, 8, 8)], tmp_path)


def _hard_swish(n: Net, x: str, name: str) -> str:
    gate = n.node("HardSigmoid", [x], f"{name}_gate", alpha=1 / 6, beta=0.5)
    return n.node("Mul", [x, gate], name)


def _dbnet(n: Net) -> str:
    """paddle2onnx DBNet pattern: MobileNetV3 (hard-swish, SE), FPN (nearest Resize by scales
    in asymmetric coordinates, paddle's default round_prefer_floor), ConvTranspose head."""
    stem = _hard_swish(n, n.bn(n.conv("x", "stem", 3, 8, strides=[2, 2]), "stem_bn", 8), "stem_hs")
    c2 = _hard_swish(n, n.bn(n.conv(stem, "c2", 8, 8, strides=[2, 2]), "c2_bn", 8), "c2_hs")
    se = n.node("GlobalAveragePool", [c2], "se_pool")
    se = n.node("Relu", [n.conv(se, "se_fc1", 8, 4, k=1, pads=[0] * 4)], "se_relu")
    se = n.node("HardSigmoid", [n.conv(se, "se_fc2", 4, 8, k=1, pads=[0] * 4)], "se_gate", alpha=0.2)
    c2 = n.node("Mul", [c2, se], "se_mul")
    c3 = n.node("Relu", [n.conv(c2, "c3", 8, 8, strides=[2, 2])], "c3_relu")
    in2 = n.conv(stem, "in2", 8, 6, k=1, pads=[0] * 4)
    in3 = n.conv(c3, "in3", 8, 6, k=1, pads=[0] * 4)
    roi = n.const("roi", np.zeros(0, np.float32))
    up = n.node("Resize", [in3, roi, n.const("x4", np.array([1, 1, 4, 4], np.float32))], "up4",
                mode="nearest", coordinate_transformation_mode="asymmetric")
    fuse = n.node("Add", [up, in2], "fuse")
    h = n.node("Relu", [n.bn(n.conv(fuse, "head1", 6, 8), "head1_bn", 8)], "head1_relu")
    w = n.weight("deconv.w", (8, 4, 2, 2))
    h = n.node("ConvTranspose", [h, w, n.weight("deconv.b", (4,), 0.1)], "deconv", strides=[2, 2])
    h = n.node("Relu", [n.bn(h, "deconv_bn", 4)], "deconv_relu")
    h = n.node("ConvTranspose", [h, n.weight("deconv2.w", (4, 1, 2, 2))], "deconv2", strides=[2, 2])
    return n.node("Sigmoid", [h], "maps")


def test_paddle2onnx_text_detector(tmp_path: Path) -> None:
    """(e) The module ran but differed from onnxruntime: a x4 nearest upsample in asymmetric
    coordinates rounds (round_prefer_floor), which F.interpolate(mode='nearest') does not."""
    n = Net(0)
    _dbnet(n)
    model = _model(n, "x", ["N", 3, "H", "W"], "maps")  # dynamic, as paddle2onnx writes it
    slim_roundtrip(model, [(2, 3, 32, 32), (1, 3, 64, 32)], tmp_path)
