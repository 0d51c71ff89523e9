"""The graphs real exporters write: every family slims, runs at other batch sizes, and keeps
its outputs; opsets 11-21, float16 weights, external data, and PyTorch's two exporters."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import onnx_thinet.io.graph as graph_io
from onnx_thinet import SlimConfig, load_model, save_model_atomic, slim
from onnx_thinet.io.data import ArrayData
from tests import builders


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _input_name(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


def _slim(model, config=None, n=48):
    x = builders.calibration(model, n=n)
    return slim(model, ArrayData({_input_name(model): x}), config or SlimConfig())


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_every_family_slims_and_runs_at_other_batch_sizes(family):
    model, _ = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=0.5))
    assert result.flops_after < result.flops_before
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3, 5):
        x = builders.calibration(model, n=batch, seed=batch)
        assert _run(result.model, x).shape == _run(model, x).shape


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_every_family_recovers_its_planted_channels_under_prune_coupled(family):
    """Joint pruning must not disturb what plain pruning gets exactly right."""
    model, dead = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=0.5, prune_coupled=True, only=tuple(dead)))
    x = builders.calibration(model, n=4, seed=11)
    ref = _run(model, x)
    assert np.abs(_run(result.model, x) - ref).max() <= 1e-4 * np.abs(ref).max()


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    out.opset_import[0].version = opset
    out.ir_version = 10 if opset >= 21 else 8 if opset >= 15 else 7
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 21])
@pytest.mark.parametrize("family", ["conv_bn_relu", "pool_flatten_gemm", "depthwise_chain",
                                    "concat_two_producers", "sppf", "yolo_head"])
def test_opsets_11_to_21(family, opset):
    model, dead = builders.FAMILIES[family]()
    model = _with_opset(model, opset)
    result = _slim(model, SlimConfig(keep_ratio=0.5, only=tuple(dead)))
    assert result.model.opset_import[0].version == opset
    assert result.verification.rel_error < 1e-4
    assert result.flops_after < result.flops_before


def test_split_as_attribute_before_opset_13():
    model, dead = builders.c2f_split()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    split = next(n for n in model.graph.node if n.op_type == "Split")
    del split.input[1:]
    split.attribute.append(onnx.helper.make_attribute("split", [4, 4]))
    model = _with_opset(model, 11)
    result = _slim(model, SlimConfig(keep_ratio=0.5, only=tuple(dead), simplify=False))
    assert result.verification.rel_error < 1e-4
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert list(next(a for a in split.attribute if a.name == "split").ints) == [2, 2]


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for t in out.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for value in list(out.graph.input) + list(out.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def test_float16_model_is_computed_in_float32_and_written_back_in_float16():
    model, dead = builders.conv_bn_relu()
    half = _to_float16(model)
    x = builders.calibration(model, n=48).astype(np.float16)
    result = slim(half, ArrayData({"x": x}), SlimConfig(keep_ratio=0.5, only=tuple(dead)))
    weights = [t for t in result.model.graph.initializer if t.name.endswith(".w") or "conv" in t.name]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert result.verification.rel_error < 2e-3  # float16 rounding, not pruning error
    assert result.flops_after < result.flops_before


def test_external_data_models_are_read_and_large_ones_written_with_external_data(tmp_path, monkeypatch):
    model, dead = builders.conv_chain()
    source = tmp_path / "ext.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.weights", size_threshold=0)
    loaded = load_model(source)
    result = slim(loaded, ArrayData({"x": builders.calibration(model)}), SlimConfig(only=tuple(dead)))
    monkeypatch.setattr(graph_io, "_EXTERNAL_DATA_THRESHOLD", 0)  # as if the model were > 2 GB
    target = tmp_path / "out" / "slim.onnx"
    save_model_atomic(result.model, target)
    assert (tmp_path / "out" / "slim.onnx.data").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["slim.onnx", "slim.onnx.data"]
    reread = onnx.load(str(target))
    x = builders.calibration(model, n=3, seed=4)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], _run(reread, x), rtol=1e-6)
    ref = _run(model, x)
    assert np.abs(session.run(None, {"x": x})[0] - ref).max() <= 1e-4 * np.abs(ref).max()


def _torch_models():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    vgg = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))
    resnet = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Block(8), Block(8),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    mobile = nn.Sequential(nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish(),
                           nn.Conv2d(8, 6, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    return torch, {"vgg": vgg, "resnet": resnet, "mobile": mobile}


@pytest.mark.torch
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["vgg", "resnet", "mobile"])
def test_pytorch_exports(tmp_path, name, exporter):
    torch, models = _torch_models()
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    module = models[name].eval()
    for m in module.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.onnx"
    example = torch.randn(2, 1, 16, 16)
    if exporter == "dynamo":
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    model = load_model(path)
    x = np.random.default_rng(0).standard_normal((40, 1, 16, 16)).astype(np.float32)
    same = slim(model, ArrayData({"x": x}), SlimConfig(keep_ratio=1.0))
    assert same.verification.rel_error < 1e-5
    result = slim(model, ArrayData({"x": x}), SlimConfig(keep_ratio=0.5, reconstruct="full"))
    assert result.groups and result.flops_after < result.flops_before
    for batch in (1, 7):
        assert _run(result.model, x[:batch]).shape == (batch, 10)
    assert result.verification.rel_error < 0.5
