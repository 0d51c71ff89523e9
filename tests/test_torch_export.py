"""ONNX -> PyTorch -> ONNX round trips: the generated module and the re-exported
ONNX must both match onnxruntime on the source model (1e-5 relative)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from onnx_thinet import SlimConfig, slim  # noqa: E402
from onnx_thinet.errors import InternalError, ThinetError  # noqa: E402
from onnx_thinet.io.data import ArrayData  # noqa: E402
from onnx_thinet.pytorch.export import (  # noqa: E402
    SUPPORTED_OPS,
    export_torch,
    load_exported,
    require_torch,
    to_onnx,
)
from tests import builders  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5
BATCHES = (1, 3)  # the re-export traces with batch 2: other sizes prove the batch is dynamic


# ---------------------------------------------------------------- helpers


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """max abs error / max abs value, the tolerance measure of the issue."""
    assert ref.shape == got.shape, (ref.shape, got.shape)
    return float(np.max(np.abs(ref - got)) / max(float(np.max(np.abs(ref))), 1e-12))


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"gen_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torch_to_onnx(module: nn.Module, shape: tuple[int, ...], path: Path, **kw) -> Path:
    """Small nn.Module -> ONNX with a dynamic batch (the kind of model users prune)."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
            **kw,
        )
    return path


def helper_model(
    nodes, inits: dict[str, np.ndarray], in_shape, out_name="y", opset=17
) -> onnx.ModelProto:
    """onnx.helper graph with input 'x' [N, ...] and one float output."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {vi.name: vi for vi in inferred.graph.output if vi.type.tensor_type.HasField("shape")}
    for out in model.graph.output:  # give outputs their inferred [N, ...] shapes
        out.CopyFrom(known.get(out.name, out))
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def rnd(*shape, seed=0, scale=0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def roundtrip(src: Path, in_shape: tuple[int, ...], tmp: Path) -> str:
    """The contract: ONNX -> torch == ORT, torch -> ONNX == ORT, for several batch sizes."""
    model_py = export_torch(src, tmp / "torch_out")
    assert model_py == tmp / "torch_out" / "model.py"
    assert (tmp / "torch_out" / "weights.pt").is_file()
    module = import_file(model_py).load()
    assert not module.training
    back = to_onnx(module, src, tmp / "back.onnx")
    onnx.checker.check_model(onnx.load(str(back)), full_check=True)
    for i, batch in enumerate(BATCHES + (5,)):
        x = rnd(batch, *in_shape, seed=10 + i, scale=1.0)
        ref = ort_run(src, x)
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        got = [got] if isinstance(got, torch.Tensor) else list(got)
        for r, g in zip(ref, got, strict=True):
            assert rel_err(r, g.numpy()) <= TOL
        for r, g in zip(ref, ort_run(back, x), strict=True):
            assert rel_err(r, g) <= TOL
    src_m, back_m = onnx.load(str(src)), onnx.load(str(back))
    assert [i.name for i in back_m.graph.input] == [i.name for i in src_m.graph.input]
    assert [o.name for o in back_m.graph.output] == [o.name for o in src_m.graph.output]
    return model_py.read_text()


# ---------------------------------------------------------------- torch-built models


class ConvChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.conv3 = nn.Conv2d(6, 4, 1, bias=False)

    def forward(self, x):
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():  # non-trivial running stats
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)

    def forward(self, x):
        return self.grouped(F.relu6(self.pw(F.relu6(self.dw(x)))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


class PoolFlattenGemm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 2)
        y = y.view(y.size(0), -1)  # Shape/Gather/Unsqueeze/Concat/Reshape in ONNX
        return torch.softmax(self.fc2(self.drop(F.leaky_relu(self.fc1(y), 0.1))), dim=1)


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return torch.flatten(F.adaptive_avg_pool2d(y * w, 1), 1)


class Misc(nn.Module):
    """Upsample, transposed conv, PReLU, slicing, global max pool, mean over axes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.prelu = nn.PReLU(4)
        with torch.no_grad():
            self.prelu.weight.uniform_(0.05, 0.3)

    def forward(self, x):
        y = self.prelu(self.up(self.conv(x)))
        z = F.interpolate(y[:, :2, 1:-1], scale_factor=2.0, mode="nearest")
        g = F.adaptive_max_pool2d(z, 1).flatten(1)
        m = z.mean(dim=(2, 3))
        return torch.cat([g, m, F.elu(m), torch.tanh(m)], dim=1)


TORCH_CASES = {
    "conv_chain": (ConvChain, (3, 9, 9), {}),
    "conv_bn_relu": (
        ConvBnRelu,
        (3, 8, 8),
        {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False},
    ),
    "depthwise": (Depthwise, (4, 8, 8), {}),
    "residual_add": (Residual, (4, 6, 6), {}),
    "concat": (ConcatNet, (3, 7, 7), {}),
    "maxpool_flatten_gemm": (PoolFlattenGemm, (3, 8, 8), {}),
    "se_block": (SEBlock, (3, 6, 6), {}),
    "misc": (Misc, (3, 8, 8), {"opset_version": 17}),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_roundtrip_torch_built(case: str, tmp_path: Path) -> None:
    cls, shape, kw = TORCH_CASES[case]
    torch.manual_seed(0)
    src = torch_to_onnx(cls(), (2, *shape), tmp_path / f"{case}.onnx", **kw)
    source = roundtrip(src, shape, tmp_path)
    if case == "conv_bn_relu":
        assert "nn.BatchNorm2d(8)" in source
        assert [n.op_type for n in onnx.load(str(src)).graph.node].count("BatchNormalization") == 1
    if case == "maxpool_flatten_gemm":
        assert "reshape(maxpool.shape[0], -1)" in source or ".shape[0], -1)" in source
        assert "nn.Linear(64, 16)" in source


def test_generated_source_is_readable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torch_to_onnx(
        ConvBnRelu(),
        (2, 3, 8, 8),
        tmp_path / "m.onnx",
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    text = export_torch(src, tmp_path / "out").read_text()
    assert "self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)" in text
    assert "self.bn = nn.BatchNorm2d(8)" in text
    assert "conv = self.conv(input)" in text
    assert "bn = self.bn(conv)" in text
    assert "F.relu(bn)" in text
    assert "INPUT_NAMES = ['input']" in text and "OUTPUT_NAMES = ['output']" in text
    assert "def load(" in text
    mod = import_file(tmp_path / "out" / "model.py")
    net = mod.load()
    assert isinstance(net.bn, nn.BatchNorm2d)
    assert all(p.requires_grad for p in net.parameters())
    assert net.bn.running_var.abs().sum() > 0


# ---------------------------------------------------------------- helper-built graphs


def _matmul_add():
    w, b = rnd(12, 7), rnd(7, seed=1)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias"),
    ]
    return helper_model(nodes, {"w": w, "b": b}, (3, 2, 2), opset=11), (3, 2, 2)


def _reshape():
    w = rnd(6, 4, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="to_rows"),
        helper.make_node("Transpose", ["r"], ["t"], name="swap", perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "shape2"], ["y"], name="flat"),
    ]
    inits = {
        "w": w,
        "shape": np.array([0, 6, -1], np.int64),
        "shape2": np.array([-1, 150], np.int64),
    }
    return helper_model(nodes, inits, (4, 5, 5)), (4, 5, 5)


def _avgpool():
    nodes = [
        helper.make_node(
            "AveragePool",
            ["x"],
            ["a"],
            name="pool_a",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        helper.make_node(
            "AveragePool",
            ["x"],
            ["b"],
            name="pool_b",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node(
            "AveragePool",
            ["x"],
            ["c"],
            name="pool_c",
            kernel_shape=[2, 2],
            strides=[2, 2],
            ceil_mode=1,
        ),
        helper.make_node("Add", ["a", "b"], ["ab"], name="sum_ab"),
        helper.make_node("GlobalAveragePool", ["c"], ["gc"], name="gap"),
        helper.make_node("Add", ["ab", "gc"], ["abc"], name="plus_gap"),
        helper.make_node("ReduceMax", ["x"], ["mx"], name="max", axes=[2, 3]),
        helper.make_node("Add", ["abc", "mx"], ["y"], name="out"),
    ]
    return helper_model(nodes, {}, (3, 7, 7)), (3, 7, 7)


def _pad():
    w = rnd(4, 3, 3, 3)
    nodes = [
        helper.make_node("Pad", ["x", "pads", "value"], ["p"], name="pad", mode="constant"),
        helper.make_node("Conv", ["p", "w"], ["c"], name="conv"),
        helper.make_node("Pad", ["c", "pads2"], ["y"], name="reflect", mode="reflect"),
    ]
    inits = {
        "w": w,
        "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64),
        "value": np.array(0.25, np.float32),
        "pads2": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
    }
    return helper_model(nodes, inits, (3, 6, 6), opset=21), (3, 6, 6)


def _clip():
    w = rnd(5, 3, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "zero", "six"], ["r6"], name="relu6"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cl"], name="clip"),
        helper.make_node("Clip", ["c", "", "hi"], ["cmax"], name="clip_max"),
        helper.make_node("HardSigmoid", ["cl"], ["hs"], name="hsig", alpha=0.25),
        helper.make_node("HardSwish", ["cmax"], ["hw"], name="hswish"),
        helper.make_node("Mul", ["r6", "hs"], ["m"], name="gate"),
        helper.make_node("Sub", ["m", "hw"], ["s"], name="diff"),
        helper.make_node("Selu", ["s"], ["y"], name="selu"),
    ]
    inits = {
        "w": w,
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
        "lo": np.array(-0.5, np.float32),
        "hi": np.array(0.75, np.float32),
    }
    return helper_model(nodes, inits, (3, 5, 5)), (3, 5, 5)


def _same_pad_conv():
    w, b = rnd(4, 3, 3, 3), rnd(4, seed=2)
    w1 = rnd(6, 4, 3, seed=3)
    nodes = [
        helper.make_node(
            "Conv", ["x", "w", "b"], ["c"], name="same", auto_pad="SAME_UPPER", strides=[2, 2]
        ),
        helper.make_node(
            "MaxPool", ["c"], ["d"], name="mp", kernel_shape=[3, 3], pads=[0, 1, 1, 0]
        ),
        helper.make_node("Reshape", ["d", "shape"], ["r"], name="rows"),
        helper.make_node("Conv", ["r", "w1"], ["y"], name="conv1d", pads=[1, 1]),
    ]
    inits = {"w": w, "b": b, "w1": w1, "shape": np.array([0, 4, -1], np.int64)}
    return helper_model(nodes, inits, (3, 8, 8)), (3, 8, 8)


def _shape_ops():
    scale = rnd(1, 4, 1, 1, seed=4) + 1.0
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["m"], name="scale"),
        helper.make_node("Split", ["m", "split"], ["s1", "s2"], name="split", axis=1),
        helper.make_node("Slice", ["s2", "starts", "ends", "axes"], ["sl"], name="crop"),
        helper.make_node("ReduceMean", ["sl", "raxes"], ["rm"], name="mean", keepdims=0),
        helper.make_node("ReduceMax", ["s1", "raxes"], ["rx"], name="max", keepdims=0),
        helper.make_node("Unsqueeze", ["rm", "uaxes"], ["u"], name="unsq"),
        helper.make_node("Squeeze", ["u", "uaxes"], ["sq"], name="sq"),
        helper.make_node("Concat", ["sq", "rx"], ["cat"], name="cat", axis=1),
        helper.make_node("Softmax", ["cat"], ["y"], name="softmax", axis=-1),
    ]
    inits = {
        "scale": scale,
        "split": np.array([1, 3], np.int64),
        "starts": np.array([1, 0], np.int64),
        "ends": np.array([-1, 2**62], np.int64),
        "axes": np.array([2, 3], np.int64),
        "raxes": np.array([2, 3], np.int64),
        "uaxes": np.array([-1], np.int64),
    }
    return helper_model(nodes, inits, (4, 6, 6), opset=18), (4, 6, 6)


def _resize_gemm():
    w, b = rnd(5, 2 * 4 * 4), rnd(5, seed=5)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="nearest"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w", "b"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("LeakyRelu", ["g"], ["y"], name="act", alpha=0.2),
    ]
    inits = {"w": w, "b": b, "scales": np.array([1, 1, 2, 2], np.float32)}
    return helper_model(nodes, inits, (2, 4, 4), opset=13), (2, 4, 4)


HELPER_CASES = {
    "matmul_add": _matmul_add,
    "reshape": _reshape,
    "avgpool": _avgpool,
    "pad": _pad,
    "clip": _clip,
    "same_pad_conv1d": _same_pad_conv,
    "shape_ops": _shape_ops,
    "resize_gemm": _resize_gemm,
}


@pytest.mark.parametrize("case", sorted(HELPER_CASES))
def test_roundtrip_helper_built(case: str, tmp_path: Path) -> None:
    model, shape = HELPER_CASES[case]()
    source = roundtrip(save(model, tmp_path / f"{case}.onnx"), shape, tmp_path)
    if case == "matmul_add":
        assert "nn.Linear(12, 7, bias=False)" in source
        assert "nn.Parameter(torch.empty(7))" in source  # the Add's constant is trainable
    if case == "clip":
        assert "r6 = F.relu6(c)" in source


def test_reshape_keeps_dynamic_batch_from_constant(tmp_path: Path) -> None:
    """A reshape constant that baked in batch 1 still works for other batch sizes in torch."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="flat")]
    model = helper_model(nodes, {"shape": np.array([1, 48], np.int64)}, (3, 4, 4))
    text = export_torch(save(model, tmp_path / "r.onnx"), tmp_path / "o").read_text()
    assert "x.reshape(x.shape[0], 48)" in text
    net = load_exported(tmp_path / "o")
    assert tuple(net(torch.zeros(4, 3, 4, 4)).shape) == (4, 48)


def test_static_batch_model_trains_at_any_batch_but_exports_static(tmp_path: Path) -> None:
    """A batch-1 export must still train with batches of 4, and come back as batch 1."""
    torch.manual_seed(0)
    net = PoolFlattenGemm().eval()
    src = tmp_path / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(src), dynamo=False)
    gen = load_exported(export_torch(src, tmp_path / "o"))
    x = rnd(4, 3, 8, 8)
    with torch.no_grad():
        got = gen(torch.from_numpy(x)).numpy()
    for i in range(4):
        assert rel_err(ort_run(src, x[i : i + 1])[0], got[i : i + 1]) <= TOL
    back = to_onnx(gen, src, tmp_path / "back.onnx", example_inputs=(torch.from_numpy(x),))
    dims = onnx.load(str(back)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]
    assert rel_err(ort_run(src, x[:1])[0], ort_run(back, x[:1])[0]) <= TOL


def test_multi_output_and_int_constant_buffer(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Gather", ["x", "idx"], ["g"], name="pick", axis=1),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
        helper.make_node("Neg", ["x"], ["z"], name="neg"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 5, 3]),
        ],
        [numpy_helper.from_array(np.array([4, 0, -1], np.int64), "idx")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    src = save(model, tmp_path / "multi.onnx")
    net = load_exported(export_torch(src, tmp_path / "o"))
    x = rnd(2, 5, 3)
    y, z = net(torch.from_numpy(x))
    ref = ort_run(src, x)
    assert rel_err(ref[0], y.numpy()) <= TOL and rel_err(ref[1], z.numpy()) <= TOL
    back = to_onnx(net, src, tmp_path / "back.onnx")
    assert [o.name for o in onnx.load(str(back)).graph.output] == ["y", "z"]
    for r, g in zip(ref, ort_run(back, x), strict=True):
        assert rel_err(r, g) <= TOL


# ---------------------------------------------------------------- contract details


def test_model_py_imports_in_fresh_process_with_torch_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torch_to_onnx(SEBlock(), (2, 3, 6, 6), tmp_path / "se.onnx")
    model_py = export_torch(src, tmp_path / "gen")
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(model_py)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "net = m.load()\n"
        "assert not net.training\n"
        "out = net(torch.zeros(3, 3, 6, 6))\n"
        "assert 'onnx_thinet' not in sys.modules and 'onnx' not in sys.modules\n"
        "print(tuple(out.shape), m.INPUT_NAMES, m.OUTPUT_NAMES)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "(3, 8) ['input'] ['output']" in res.stdout


def test_unsupported_op_names_op_node_and_list(tmp_path: Path) -> None:
    nodes = [helper.make_node("LRN", ["x"], ["y"], name="my_lrn", size=3)]
    src = save(helper_model(nodes, {}, (3, 4, 4)), tmp_path / "lrn.onnx")
    with pytest.raises(ThinetError) as info:
        export_torch(src, tmp_path / "o")
    msg = str(info.value)
    assert "LRN" in msg and "my_lrn" in msg and "Conv" in msg and "supported" in msg
    assert "Conv" in SUPPORTED_OPS and "BatchNormalization" in SUPPORTED_OPS


def test_missing_torch_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ThinetError, match=r"pip install 'onnx-thinet\[torch\]'"):
        require_torch()


def test_bad_inputs_are_thinet_errors(tmp_path: Path) -> None:
    with pytest.raises(ThinetError, match="no such file"):
        export_torch(tmp_path / "missing.onnx", tmp_path / "o")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not onnx")
    with pytest.raises(ThinetError):
        export_torch(junk, tmp_path / "o")


def test_to_onnx_is_atomic_and_keeps_opset(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torch_to_onnx(ConvChain(), (2, 3, 9, 9), tmp_path / "c.onnx", opset_version=13)
    net = load_exported(export_torch(src, tmp_path / "o"))
    out = tmp_path / "back.onnx"
    out.write_bytes(b"old")

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ThinetError, match="boom"):
        to_onnx(Broken(), src, out)
    assert out.read_bytes() == b"old"  # untouched on failure
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    to_onnx(net, src, out)
    back = onnx.load(str(out))
    assert back.opset_import[0].version == 13
    dim0 = back.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "N"


# ---------------------------------------------------------------- slim models of every family


def _family_slim(family: str) -> onnx.ModelProto:
    model, _ = builders.FAMILIES[family]()
    x = builders.calibration(model, n=32)
    config = SlimConfig(keep_ratio=0.5, prune_coupled=True, reconstruct="scale", correct=False)
    return slim(model, ArrayData({model.graph.input[0].name: x}), config).model


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_roundtrip_of_each_slimmed_family(family: str, tmp_path: Path) -> None:
    """What the pruner writes, for every graph family it supports, survives the round trip."""
    slim_model = _family_slim(family)
    dims = slim_model.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    roundtrip(save(slim_model, tmp_path / f"{family}.slim.onnx"), shape, tmp_path)


# ---------------------------------------------------------------- export check before writing


def test_export_refuses_a_wrong_module_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A translation bug (planted: Relu translated as sigmoid) is measured against onnxruntime
    before anything is written; files already in the output directory are left as they were."""
    from onnx_thinet.ops import registry

    entry = registry.REGISTRY["Relu"]
    wrong = dataclasses.replace(entry, translate=lambda g, node: g.emit(node, f"torch.sigmoid({g.t(node.input[0], node)})"))
    monkeypatch.setitem(registry.REGISTRY, "Relu", wrong)
    model, _ = builders.conv_chain()
    src = save(model, tmp_path / "chain.onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.py").write_text("# the user's earlier export\n")
    with pytest.raises(InternalError, match=r"relative error \d\.\d+e[+-]\d+ > 1e-04.*nothing was written"):
        export_torch(src, out)
    assert (out / "model.py").read_text() == "# the user's earlier export\n"
    assert sorted(p.name for p in out.iterdir()) == ["model.py"]
    with pytest.raises(InternalError, match="nothing was written"):
        export_torch(src, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx", "out"]  # no dir, no scratch


def test_export_checks_models_with_symbolic_spatial_dims(tmp_path: Path, monkeypatch) -> None:
    """Symbolic H and W no longer skip the check (the paddle2onnx case): io's dummy size is used."""
    from onnx_thinet.ops import registry

    entry = registry.REGISTRY["Relu"]
    wrong = dataclasses.replace(entry, translate=lambda g, node: g.emit(node, f"torch.abs({g.t(node.input[0], node)})"))
    monkeypatch.setitem(registry.REGISTRY, "Relu", wrong)
    model, _ = builders.conv_chain()
    for i in (2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "HW"[i - 2]
    with pytest.raises(InternalError, match="disagrees with onnxruntime"):
        export_torch(save(model, tmp_path / "dyn.onnx"), tmp_path / "out")
    assert not (tmp_path / "out" / "model.py").exists()


def test_export_leaves_the_model_unmodified(tmp_path: Path) -> None:
    """Shape inference relaxes the batch dim on a copy: the caller's model is not touched."""
    from onnx_thinet.pytorch.export import export_torch_model

    model, _ = builders.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # a static batch
    model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    before = model.SerializeToString()
    export_torch_model(model, tmp_path / "o")
    assert model.SerializeToString() == before
