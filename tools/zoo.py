"""Model zoo: the acceptance models, rebuilt from code, slimmed with the CLI exactly as a user would.

We cannot download the real models, so each architecture is written here in plain PyTorch with
seeded random weights (BatchNorm statistics made non-trivial by a few train-mode batches of
smooth random images) and exported the way the real exporters write it:

* ``vgg16_tf2onnx``: VGG-16 (13 convs, FC 4096-4096-1000) as tf2onnx writes a Keras model:
  NHWC input, Transpose around every Conv and MaxPool, ``Shape→Gather→Unsqueeze→Concat→Reshape``
  flatten of the NHWC tensor, Dense as MatMul + Add;
* ``resnet50_bn_decomposed``: ResNet-50 (bottlenecks [3, 4, 6, 3], projection shortcuts),
  TorchScript export, every BatchNormalization rewritten as Mul + Add with [1, C, 1, 1] constants;
* ``yolov8n``: YOLOv8n (depth 0.33, width 0.25): Conv+BN+SiLU, C2f, SPPF, FPN/PAN neck, Detect head
  with DFL and box decoding, output [b, 84, anchors];
* ``mobilenetv2_se``: MobileNetV2 with a squeeze-and-excitation block after each depthwise conv.

Every builder checks its ONNX graph against the PyTorch module with onnxruntime.

    python tools/zoo.py                                  # all four, real widths -> docs/zoo.{md,json}
    python tools/zoo.py --models yolov8n --size 160      # one model
    python tools/zoo.py --width 0.25 --out /tmp/zoo      # quick look at reduced widths

Failures of the CLI are recorded (its last stderr line) in the table, not worked around.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS = ("vgg16_tf2onnx", "resnet50_bn_decomposed", "yolov8n", "mobilenetv2_se")
DEFAULT_SIZES = {"vgg16_tf2onnx": 64, "resnet50_bn_decomposed": 64, "yolov8n": 160, "mobilenetv2_se": 64}
TOLERANCE = 1e-4  # relative error allowed between an ONNX graph and its PyTorch module


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


# --------------------------------------------------------------------------- shared helpers


def smooth_images(n: int, size: int, channels: int = 3, seed: int = 0, layout: str = "NCHW") -> np.ndarray:
    """Seeded smooth random images: a sum of upsampled noise octaves, roughly unit variance."""
    torch = _torch()
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    out = np.zeros((n, channels, size, size), np.float32)
    for cells, amplitude in ((2, 1.0), (4, 0.7), (8, 0.5), (16, 0.3)):
        low = torch.from_numpy(rng.standard_normal((n, channels, cells, cells)).astype(np.float32))
        out += amplitude * F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).numpy()
    out += 0.1 * rng.standard_normal(out.shape).astype(np.float32)
    out /= out.std()
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1) if layout == "NHWC" else out)


def _seed(seed: int):
    torch = _torch()
    torch.manual_seed(seed)
    return torch


def _calibrate_batchnorm(module, size: int, seed: int, batches: int = 3, batch: int = 8) -> None:
    """Random affine BN parameters, then running statistics from train-mode batches; eval mode."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1.0 + 0.25 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
        module.train()
        for i in range(batches):
            module(torch.from_numpy(smooth_images(batch, size, seed=seed + 100 + i)))
    module.eval()


def _export(module, x, input_name: str, output_name: str, fold: bool = True, opset: int = 17) -> onnx.ModelProto:
    """TorchScript export (dynamo=False), dynamic batch."""
    torch = _torch()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buf, dynamo=False, opset_version=opset, do_constant_folding=fold,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _verify(model: onnx.ModelProto, module, x_onnx: np.ndarray, x_torch: np.ndarray, what: str) -> None:
    torch = _torch()
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        ref = module(torch.from_numpy(x_torch)).numpy()
    got = run_onnx(model, x_onnx)
    err = rel_error(got, ref)
    if got.shape != ref.shape or not err < TOLERANCE:
        raise AssertionError(f"{what}: ONNX differs from PyTorch (shape {got.shape} vs {ref.shape}, rel {err:.2e})")


def _c(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


# --------------------------------------------------------------------------- 1. VGG-16, tf2onnx

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_torch(size: int, width: float, classes: int = 1000):
    torch = _torch()
    nn = torch.nn
    layers, cin = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, _c(v, width), 3, padding=1), nn.ReLU()]
            cin = _c(v, width)
    fc, side = _c(4096, width), size // 32
    model = nn.Sequential(
        nn.Sequential(*layers), nn.Flatten(),
        nn.Linear(cin * side * side, fc), nn.ReLU(), nn.Linear(fc, fc), nn.ReLU(), nn.Linear(fc, classes),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, std=0.05)
    return model.eval()


def vgg16_tf2onnx(size: int = 64, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """VGG-16 as tf2onnx exports Keras' VGG16 (include_top, logits): an NHWC graph.

    Every Conv and MaxPool runs NCHW between Transpose(0,3,1,2) and Transpose(0,2,3,1); the ReLUs
    run NHWC; Flatten is Shape→Gather(0)→Unsqueeze→Concat([batch, -1])→Reshape of the NHWC tensor;
    Dense layers are MatMul + Add, the first one's rows re-ordered for the NHWC flatten.
    """
    if size % 32:
        raise ValueError("VGG-16 needs an input side divisible by 32")
    _seed(seed)
    module = _vgg16_torch(size, width)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, list(inputs), [f"{name}:0"], name=name, **attrs))
        return f"{name}:0"

    x, block, index, counter = "input_1", 1, 1, 0
    for layer in module[0]:
        kind = type(layer).__name__
        if kind == "Conv2d":
            base = f"model/block{block}_conv{index}"
            w = const(f"{base}/Conv2D/ReadVariableOp:0", layer.weight.detach().numpy())
            b = const(f"{base}/BiasAdd/ReadVariableOp:0", layer.bias.detach().numpy())
            t = node("Transpose", [x], f"{base}/Conv2D__{counter}", perm=[0, 3, 1, 2])
            y = node("Conv", [t, w, b], f"{base}/BiasAdd", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                     strides=[1, 1], dilations=[1, 1], group=1)
            t = node("Transpose", [y], f"{base}/BiasAdd__{counter + 1}", perm=[0, 2, 3, 1])
            x = node("Relu", [t], f"{base}/Relu")
            index, counter = index + 1, counter + 2
        elif kind == "MaxPool2d":
            base = f"model/block{block}_pool"
            t = node("Transpose", [x], f"{base}/MaxPool__{counter}", perm=[0, 3, 1, 2])
            y = node("MaxPool", [t], f"{base}/MaxPool", kernel_shape=[2, 2], strides=[2, 2])
            x = node("Transpose", [y], f"{base}/MaxPool__{counter + 1}", perm=[0, 2, 3, 1])
            block, index, counter = block + 1, 1, counter + 2
    shape = node("Shape", [x], "model/flatten/Shape")
    batch = node("Gather", [shape, const("model/flatten/strided_slice/index:0", np.array(0, np.int64))],
                 "model/flatten/strided_slice", axis=0)
    batch = node("Unsqueeze", [batch, const("model/flatten/axes:0", np.array([0], np.int64))],
                 "model/flatten/strided_slice__unsq")
    target = node("Concat", [batch, const("model/flatten/const_-1:0", np.array([-1], np.int64))],
                  "model/flatten/Reshape/shape", axis=0)
    x = node("Reshape", [x, target], "model/flatten/Reshape")
    linears = [m for m in module if type(m).__name__ == "Linear"]
    side = size // 32
    for i, (name, layer) in enumerate(zip(("fc1", "fc2", "predictions"), linears)):
        w = layer.weight.detach().numpy()
        if i == 0:  # torch flattens NCHW, Keras flattens NHWC
            c = w.shape[1] // (side * side)
            w = w.reshape(w.shape[0], c, side, side).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        kernel = const(f"model/{name}/MatMul/ReadVariableOp:0", np.ascontiguousarray(w.T))
        bias = const(f"model/{name}/BiasAdd/ReadVariableOp:0", layer.bias.detach().numpy())
        x = node("Add", [node("MatMul", [x, kernel], f"model/{name}/MatMul"), bias], f"model/{name}/BiasAdd")
        if name != "predictions":
            x = node("Relu", [x], f"model/{name}/Relu")
    nodes.append(helper.make_node("Identity", [x], ["predictions"], name="Identity"))
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", size, size, 3])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__0", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                              producer_name="tf2onnx", producer_version="1.16.1")
    model.ir_version = 8
    x_nchw = smooth_images(2, size, seed=seed + 7)
    _verify(model, module, np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)), x_nchw, "vgg16_tf2onnx")
    return model


# --------------------------------------------------------------------------- 2. ResNet-50, BN decomposed


def _resnet50_torch(width: float, classes: int = 1000):
    torch = _torch()
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            cout = planes * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            stem = _c(64, width)
            self.conv1, self.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
            self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            cin, stages = stem, []
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                layer = []
                for i in range(blocks):
                    layer.append(Bottleneck(cin, _c(planes, width), stride if i == 0 else 1))
                    cin = _c(planes, width) * 4
                stages.append(nn.Sequential(*layer))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet50()


def decompose_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every inference BatchNormalization as Mul + Add with [1, C, 1, 1] constants."""
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:  # Identity / Constant nodes standing for initializers
        if n.op_type == "Identity" and n.input[0] in arrays:
            arrays[n.output[0]] = arrays[n.input[0]]
        elif n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            arrays[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    nodes, new_inits = [], []
    for n in graph.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (arrays[i].astype(np.float64) for i in n.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        shape = (1, len(scale), 1, 1)
        base = n.name or n.output[0]
        new_inits += [numpy_helper.from_array(scale.reshape(shape).astype(np.float32), f"{base}.mul"),
                      numpy_helper.from_array(shift.reshape(shape).astype(np.float32), f"{base}.add")]
        nodes += [helper.make_node("Mul", [n.input[0], f"{base}.mul"], [f"{base}.mul_out"], name=f"{base}_mul"),
                  helper.make_node("Add", [f"{base}.mul_out", f"{base}.add"], [n.output[0]], name=f"{base}_add")]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    # drop what the BN nodes alone read (and the Identity nodes that only fed them)
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def resnet50_bn_decomposed(size: int = 64, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 exported by PyTorch (TorchScript, opset 17, dynamic batch), BN as Mul + Add."""
    torch = _seed(seed)
    module = _resnet50_torch(width)
    _calibrate_batchnorm(module, size, seed)
    x = smooth_images(2, size, seed=seed + 7)
    model = _export(module, torch.from_numpy(x), "input", "output", fold=False)
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        raise AssertionError("resnet50: the export fused BatchNormalization away")
    model = decompose_batchnorm(model)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    _verify(model, module, x, x, "resnet50_bn_decomposed")
    return model


# --------------------------------------------------------------------------- 3. YOLOv8n


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(math.ceil(v / divisor) * divisor))


def _yolov8n_torch(size: int, width: float, nc: int = 80):
    torch = _torch()
    nn = torch.nn

    class Conv(nn.Module):
        def __init__(self, c1, c2, k=1, s=1, g=1):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c1, c2, shortcut):
            super().__init__()
            self.cv1, self.cv2 = Conv(c1, c2, 3), Conv(c2, c2, 3)
            self.add = shortcut and c1 == c2

        def forward(self, x):
            return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))

    class C2f(nn.Module):
        def __init__(self, c1, c2, n=1, shortcut=False):
            super().__init__()
            self.c = c2 // 2
            self.cv1, self.cv2 = Conv(c1, 2 * self.c, 1), Conv((2 + n) * self.c, c2, 1)
            self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).split((self.c, self.c), 1))  # ultralytics exports C2f.forward_split
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1, c2, k=5):
            super().__init__()
            c_ = c1 // 2
            self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
            self.m = nn.MaxPool2d(k, 1, k // 2)

        def forward(self, x):
            y = [self.cv1(x)]
            y.extend(self.m(y[-1]) for _ in range(3))
            return self.cv2(torch.cat(y, 1))

    class DFL(nn.Module):
        def __init__(self, c1=16):
            super().__init__()
            self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
            self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
            self.c1 = c1

        def forward(self, x):
            b, _, a = x.shape
            return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)

    class Detect(nn.Module):
        def __init__(self, ch, strides=(8, 16, 32), reg_max=16):
            super().__init__()
            self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
            c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
            self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                     for x in ch)
            self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                     for x in ch)
            self.dfl = DFL(reg_max)
            points, strides_ = [], []  # make_anchors, offset 0.5 (static input size, as exported)
            for s in strides:
                h = w = size // s
                sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                strides_.append(torch.full((h * w, 1), float(s)))
            self.register_buffer("anchors", torch.cat(points).transpose(0, 1).contiguous())
            self.register_buffer("strides", torch.cat(strides_).transpose(0, 1).contiguous())
            with torch.no_grad():  # ultralytics' bias_init
                for a, b, s in zip(self.cv2, self.cv3, strides):
                    a[-1].bias.fill_(1.0)
                    b[-1].bias.fill_(math.log(5 / nc / (640 / s) ** 2))

        def forward(self, xs):
            xs = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
            shape = xs[0].shape
            x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in xs], 2)
            box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
            lt, rb = self.dfl(box).chunk(2, 1)
            anchors = self.anchors.unsqueeze(0)
            x1y1, x2y2 = anchors - lt, anchors + rb
            dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
            return torch.cat((dbox, cls.sigmoid()), 1)

    class YOLOv8n(nn.Module):
        def __init__(self):
            super().__init__()
            w = [_make_divisible(min(c, 1024) * 0.25 * width) for c in (64, 128, 256, 512, 1024)]

            def d(n):
                return max(round(n * 0.33), 1)

            self.b0, self.b1 = Conv(3, w[0], 3, 2), Conv(w[0], w[1], 3, 2)
            self.b2, self.b3 = C2f(w[1], w[1], d(3), True), Conv(w[1], w[2], 3, 2)
            self.b4, self.b5 = C2f(w[2], w[2], d(6), True), Conv(w[2], w[3], 3, 2)
            self.b6, self.b7 = C2f(w[3], w[3], d(6), True), Conv(w[3], w[4], 3, 2)
            self.b8, self.b9 = C2f(w[4], w[4], d(3), True), SPPF(w[4], w[4], 5)
            self.up = nn.Upsample(None, 2, "nearest")
            self.h12, self.h15 = C2f(w[4] + w[3], w[3], d(3)), C2f(w[3] + w[2], w[2], d(3))
            self.h16, self.h18 = Conv(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], d(3))
            self.h19, self.h21 = Conv(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], d(3))
            self.detect = Detect((w[2], w[3], w[4]))

        def forward(self, x):
            p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
            p4 = self.b6(self.b5(p3))
            p5 = self.b9(self.b8(self.b7(p4)))
            h12 = self.h12(torch.cat((self.up(p5), p4), 1))
            h15 = self.h15(torch.cat((self.up(h12), p3), 1))
            h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
            h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
            return self.detect([h15, h18, h21])

    return YOLOv8n()


def yolov8n(size: int = 160, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """YOLOv8n detection model (width multiplier on top of v8n's 0.25), output [b, 84, anchors]."""
    if size % 32:
        raise ValueError("YOLOv8 needs an input side divisible by 32")
    torch = _seed(seed)
    module = _yolov8n_torch(size, width)
    _calibrate_batchnorm(module, size, seed)
    x = smooth_images(2, size, seed=seed + 7)
    model = _export(module, torch.from_numpy(x), "images", "output0")
    ops = Counter(n.op_type for n in model.graph.node)
    if ops["Sigmoid"] < 50 or "BatchNormalization" in ops:
        raise AssertionError(f"yolov8n: unexpected export ops {dict(ops)}")
    _verify(model, module, x, x, "yolov8n")
    return model


# --------------------------------------------------------------------------- 4. MobileNetV2 + SE

MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                   (6, 160, 3, 2), (6, 320, 1, 1))


def _tv_make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _mobilenetv2_se_torch(width: float, classes: int = 1000):
    torch = _torch()
    nn = torch.nn

    def conv_bn(cin, cout, k=1, s=1, g=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

    class SqueezeExcitation(nn.Module):
        def __init__(self, c):
            super().__init__()
            squeeze = _tv_make_divisible(c // 4)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.relu = nn.Conv2d(c, squeeze, 1), nn.ReLU()
            self.fc2, self.gate = nn.Conv2d(squeeze, c, 1), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = int(round(cin * t))
            layers = [conv_bn(cin, hidden)] if t != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, hidden), SqueezeExcitation(hidden),
                       conv_bn(hidden, cout, act=False)]
            self.conv = nn.Sequential(*layers)
            self.use_res_connect = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2SE(nn.Module):
        def __init__(self):
            super().__init__()
            cin = _tv_make_divisible(32 * width)
            last = _tv_make_divisible(1280 * max(1.0, width))
            features = [conv_bn(3, cin, 3, 2)]
            for t, c, n, s in MOBILENETV2_CFG:
                cout = _tv_make_divisible(c * width)
                for i in range(n):
                    features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            features.append(conv_bn(cin, last))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                    if m.bias is not None:
                        nn.init.normal_(m.bias, std=0.1)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2SE()


def mobilenetv2_se(size: int = 64, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (torchvision config) with SE (GAP→1x1→ReLU→1x1→HardSigmoid→Mul) after each dw conv."""
    torch = _seed(seed)
    module = _mobilenetv2_se_torch(width)
    _calibrate_batchnorm(module, size, seed)
    x = smooth_images(2, size, seed=seed + 7)
    model = _export(module, torch.from_numpy(x), "input", "output")
    ops = Counter(n.op_type for n in model.graph.node)
    if not (ops["Clip"] and ops["HardSigmoid"] and ops["GlobalAveragePool"]) or "BatchNormalization" in ops:
        raise AssertionError(f"mobilenetv2_se: unexpected export ops {dict(ops)}")
    _verify(model, module, x, x, "mobilenetv2_se")
    return model


BUILDERS = {
    "vgg16_tf2onnx": vgg16_tf2onnx,
    "resnet50_bn_decomposed": resnet50_bn_decomposed,
    "yolov8n": yolov8n,
    "mobilenetv2_se": mobilenetv2_se,
}


def input_layout(model: onnx.ModelProto) -> tuple[str, list]:
    """(name, dims) of the single graph input; dims with the batch as a string."""
    inp = model.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def calibration_for(model: onnx.ModelProto, n: int, seed: int = 1) -> np.ndarray:
    """Smooth random images in the model's own layout (NHWC when the last dim is 3)."""
    _, dims = input_layout(model)
    nhwc = dims[-1] == 3
    return smooth_images(n, dims[1] if nhwc else dims[2], seed=seed, layout="NHWC" if nhwc else "NCHW")


# --------------------------------------------------------------------------- running the CLI


def _cli() -> list[str]:
    """`onnx-thinet` next to this interpreter, else the module entry point."""
    exe = Path(sys.executable).with_name("onnx-thinet")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from onnx_thinet.cli import main; main()"]


def _check_slim(path: Path, original: onnx.ModelProto, calib: np.ndarray) -> dict:
    """Full checker, onnxruntime at batch 1 and 3, output shape as the original's."""
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shapes = {}
    for batch in (1, 3):
        out = session.run(None, {name: calib[:batch]})[0]
        ref = run_onnx(original, calib[:batch])
        if out.shape != ref.shape:
            raise AssertionError(f"batch {batch}: output shape {out.shape}, original {ref.shape}")
        if not np.isfinite(out).all():
            raise AssertionError(f"batch {batch}: non-finite outputs")
        shapes[batch] = list(out.shape)
    return {"checker": "ok", "ort_batch_1": shapes[1], "ort_batch_3": shapes[3]}


def _summarize(report: dict) -> dict:
    skipped = Counter(s["reason"] for s in report["skipped"])
    coupled = Counter(c["reason"] for c in report["coupled"])
    return {
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "flops_before": report["flops_before"],
        "flops_after": report["flops_after"],
        "flops_reduction": 1.0 - report["flops_after"] / report["flops_before"],
        "params_reduction": 1.0 - report["params_after"] / report["params_before"],
        "output_rel_error": report["output_rel_error"],
        "top1_agreement": report.get("top1_agreement"),
        "groups_pruned": len(report["groups"]),
        "producers_pruned": sum(len(g["producer"].split(" + ")) for g in report["groups"]),
        "coupled": len(report["coupled"]),
        "skipped": len(report["skipped"]),
        "skipped_reasons": dict(skipped.most_common()),
        "coupled_reasons": dict(coupled.most_common()),
        "forward_passes": report["forward_passes"],
        "seconds": report["seconds"],
        "config": {k: report["config"].get(k) for k in ("method", "reconstruct", "correct", "samples_per_image")},
    }


def slim_with_cli(name: str, model_path: Path, calib_path: Path, original: onnx.ModelProto,
                  calib: np.ndarray, keep_ratio: float, coupled: bool, workdir: Path) -> dict:
    mode = "prune-coupled" if coupled else "default"
    out = workdir / f"{name}.{mode}.slim.onnx"
    report_path = workdir / f"{name}.{mode}.report.json"
    cmd = [*_cli(), "slim", str(model_path), "--calib", str(calib_path), "--keep-ratio", str(keep_ratio),
           "--report", str(report_path), "--output", str(out)]
    if coupled:
        cmd.append("--prune-coupled")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {"model": name, "mode": mode, "wall_seconds": round(wall, 1),
           "command": "onnx-thinet " + shlex.join(cmd[len(_cli()):]).replace(str(workdir) + "/", "")}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        row.update(status="failed", returncode=proc.returncode, error=lines[-1] if lines else "(no stderr)")
        return row
    try:
        report = json.loads(report_path.read_text())
        row.update(_summarize(report))
        row.update(_check_slim(out, original, calib))
        row["status"] = "ok"
    except Exception as exc:  # recorded, not worked around
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    return row


# --------------------------------------------------------------------------- docs


def _fmt_int(v: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| Model | Input | Params before → after | FLOPs before → after | FLOPs −% | Output rel. error "
        "| Groups pruned | Coupled | Skipped | Passes | Slim s (wall s) | Status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        shape = "×".join(str(d) for d in r["input_shape"])
        if r["status"] != "ok":
            error = r.get("error", "").replace("|", "\\|")
            lines.append(f"| {r['model']} | {shape} | | | | | | | | | ({r['wall_seconds']}) "
                         f"| **failed**: `{error}` |")
            continue
        lines.append(
            f"| {r['model']} | {shape} | {_fmt_int(r['params_before'])} → {_fmt_int(r['params_after'])} "
            f"| {_fmt_int(r['flops_before'])} → {_fmt_int(r['flops_after'])} | {100 * r['flops_reduction']:.1f} "
            f"| {r['output_rel_error']:.4f} | {r['groups_pruned']} | {r['coupled']} | {r['skipped']} "
            f"| {r['forward_passes']} | {r['seconds']:.1f} ({r['wall_seconds']}) | ok |"
        )
    return lines


def write_docs(out: Path, results: dict, args: argparse.Namespace, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["runs"]
    md = [
        "# Model zoo: the acceptance models",
        "",
        "`onnx-thinet slim MODEL --keep-ratio 0.5` on four architectures as their exporters write them.",
        "The real models cannot be downloaded here, so `tools/zoo.py` builds each architecture in",
        "PyTorch at its real channel widths, with seeded random weights (BatchNorm statistics from a few",
        "train-mode batches, random affine BN parameters), exports it, checks the ONNX graph against",
        "PyTorch with onnxruntime (relative error < 1e-4), and slims it with the CLI exactly as a user",
        "would. Calibration: seeded smooth random images (sums of upsampled noise octaves) in the",
        "model's own layout. Each slim model is checked with the full ONNX checker and run in",
        "onnxruntime at batch 1 and 3 with the original output shape.",
        "",
        "Regenerate (about "
        f"{results['total_seconds'] / 60:.0f} min on {results['machine']}):",
        "",
        "```bash",
        command,
        "```",
        "",
        "| Model | Built as |",
        "| --- | --- |",
        "| vgg16_tf2onnx | VGG-16 (13 convs, FC 4096-4096-1000), tf2onnx style: NHWC input, Transpose "
        "around every Conv and MaxPool, Relu in NHWC, `Shape→Gather→Unsqueeze→Concat→Reshape` flatten, "
        "Dense as MatMul + Add |",
        "| resnet50_bn_decomposed | ResNet-50 (bottlenecks [3, 4, 6, 3], projection shortcuts), TorchScript "
        "export opset 17, every BatchNormalization rewritten as Mul + Add with [1, C, 1, 1] constants |",
        "| yolov8n | YOLOv8n (depth 0.33, width 0.25): Conv+BN+SiLU (Sigmoid·Mul), C2f (Split, Concat, "
        "residual Bottlenecks in the backbone), SPPF, Resize/Concat neck, Detect head with DFL and "
        "box decoding, output [b, 84, anchors]; TorchScript export, BN folded as ultralytics exports |",
        "| mobilenetv2_se | MobileNetV2 (torchvision config), SE after every depthwise conv "
        "(GlobalAveragePool→1×1→Relu→1×1→HardSigmoid→Mul), ReLU6 as Clip; TorchScript export, BN folded |",
        "",
        "FLOPs count a multiply-add as 2. *Output rel. error* is ‖slim − original‖ / ‖original‖ on the",
        "held-out 10% of the calibration images. For yolov8n the output is dominated by the decoded box",
        "coordinates (anchor positions × stride), so its relative error is small even when class scores",
        "move more. Weights are random, so these numbers say that the graphs are handled, not how",
        "accurate a pruned trained model is.",
        "",
    ]
    for mode, title in (("default", "Default (coupled channels kept)"), ("prune-coupled", "`--prune-coupled`")):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        md += [f"## {title}", "", *_table(mode_rows), ""]
        for r in mode_rows:
            if r["status"] != "ok":
                continue
            reasons = r["skipped_reasons"]
            if reasons:
                md.append(f"Skipped in {r['model']}: "
                          + "; ".join(f"{k} (×{v})" for k, v in reasons.items()).replace("|", "\\|"))
                md.append("")
    md += [
        "## Settings",
        "",
        f"`--keep-ratio {args.keep_ratio}`, `--calib-n {args.calib_n}`, width multiplier {args.width}, "
        f"seed {args.seed}; slim settings from the reports: "
        + "; ".join(sorted({", ".join(f"{k}={v}" for k, v in r["config"].items()) for r in rows if "config" in r}))
        + "; sizes: "
        + ", ".join(f"{r['model']} {r['input_shape']}" for r in rows if r["mode"] == "default") + ".",
        f"Machine: {results['machine']}, shared (5-minute load average at the end of each model: "
        + ", ".join(f"{k} {v.get('load_average', '?')}" for k, v in results["builds"].items())
        + f"); total {results['total_seconds']:.0f} s. Package: onnx-thinet at `{results['package_commit']}`.",
        "",
    ]
    (out / "zoo.md").write_text("\n".join(md))


def _package_commit() -> str:
    """HEAD of the checkout, with "+dirty" when onnx_thinet/ has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "onnx_thinet"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--size", type=int, default=None,
                        help="input side for every model (default: 64 for classifiers, 160 for yolov8n)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0 = real widths)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for zoo.md and zoo.json")
    parser.add_argument("--calib-n", type=int, default=64, help="calibration images per model")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--modes", default="default,prune-coupled", help="default and/or prune-coupled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep models, calibration and reports here")
    parser.add_argument("--update", action="store_true",
                        help="replace only these models' rows in an existing OUT/zoo.json, keep the others")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"default", "prune-coupled"}:
        parser.error("--modes: default and/or prune-coupled")
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--keep" in shown:  # where the files go does not change the results
        del shown[shown.index("--keep"):shown.index("--keep") + 2]
    shown = [a for a in shown if not a.startswith("--keep=")]
    argv_shown = ["python", "tools/zoo.py", *shown]
    _torch()
    start_all = time.perf_counter()
    runs, builds = [], {}
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            size = args.size or DEFAULT_SIZES[name]
            start = time.perf_counter()
            try:
                model = BUILDERS[name](size=size, width=args.width, seed=args.seed)
            except Exception as exc:
                print(f"[zoo] {name}: build failed: {type(exc).__name__}: {exc}", flush=True)
                builds[name] = {"status": "build failed", "error": f"{type(exc).__name__}: {exc}"}
                continue
            model_path = workdir / f"{name}.onnx"
            onnx.save(model, str(model_path))
            calib = calibration_for(model, args.calib_n, seed=args.seed + 1)
            calib_path = workdir / f"{name}.calib.npy"
            np.save(calib_path, calib)
            _, dims = input_layout(model)
            ops = Counter(n.op_type for n in model.graph.node)
            builds[name] = {"status": "ok", "seconds": round(time.perf_counter() - start, 1),
                            "input": dims, "nodes": len(model.graph.node), "ops": dict(ops.most_common())}
            print(f"[zoo] {name}: built in {builds[name]['seconds']} s, {len(model.graph.node)} nodes", flush=True)
            for mode in modes:
                row = slim_with_cli(name, model_path, calib_path, model, calib, args.keep_ratio,
                                    mode == "prune-coupled", workdir)
                row["input_shape"] = [1 if isinstance(d, str) else d for d in dims]
                runs.append(row)
                summary = (f"FLOPs -{100 * row['flops_reduction']:.1f}%, rel err {row['output_rel_error']:.4f}"
                           if row["status"] == "ok" else row["error"])
                print(f"[zoo] {name} [{mode}]: {row['status']} in {row['wall_seconds']} s: {summary}", flush=True)
            builds[name]["load_average"] = round(os.getloadavg()[1], 1)
    total = time.perf_counter() - start_all
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores"
    command = shlex.join(argv_shown)
    if args.update and (args.out / "zoo.json").exists():
        old = json.loads((args.out / "zoo.json").read_text())
        same = all(old.get(k) == getattr(args, k) for k in ("keep_ratio", "calib_n", "width", "seed"))
        if not same:
            parser.error("--update: keep-ratio, calib-n, width and seed must match the existing zoo.json")
        builds = {**{k: v for k, v in old["builds"].items() if k not in builds}, **builds}
        replaced = {(r["model"], r["mode"]) for r in runs}
        runs = [r for r in old["runs"] if (r["model"], r["mode"]) not in replaced] + runs
        runs.sort(key=lambda r: (MODELS.index(r["model"]), r["mode"] != "default"))
        command = old["command"]
        total = sum(b.get("seconds", 0) for b in builds.values()) + sum(r["wall_seconds"] for r in runs)
    results = {"command": command, "keep_ratio": args.keep_ratio, "calib_n": args.calib_n,
               "width": args.width, "seed": args.seed, "machine": machine,
               "package_commit": _package_commit(), "total_seconds": round(total, 1),
               "builds": builds, "runs": runs}
    write_docs(args.out, results, args, command)
    print(f"[zoo] wrote {args.out / 'zoo.md'} and {args.out / 'zoo.json'} in {total:.0f} s", flush=True)
    return 0 if all(r["status"] == "ok" for r in runs) and all(b["status"] == "ok" for b in builds.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
