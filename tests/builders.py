"""Tiny ONNX CNNs built in code, some with planted redundancy (exactness oracles).

Planted redundancy: some producer channels get the *largest* filter norms but exactly zero
weight in the next layer. ThiNet must remove exactly those at keep ratio 0.5 and keep the
output unchanged, while a weight-magnitude criterion keeps exactly the wrong ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass
class Net:
    """A graph under construction: nodes, seeded initializers, and the planted dead channels."""

    seed: int = 0
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    dead: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def weight(self, name: str, shape, scale: float = 0.3) -> str:
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, bias: bool = True,
             group: int = 1, **attrs) -> str:
        inputs = [x, self.weight(f"{name}.w", (cout, cin // group, k, k))]
        if bias:
            inputs.append(self.weight(f"{name}.b", (cout,), 0.1))
        attrs.setdefault("pads", [k // 2] * 4)
        return self.node("Conv", inputs, name, group=group, kernel_shape=[k, k], **attrs)

    def bn(self, x: str, name: str, c: int) -> str:
        scale = self.const(f"{name}.scale", (1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32))
        bias = self.const(f"{name}.bias", (0.1 * self.rng.standard_normal(c)).astype(np.float32))
        mean = self.const(f"{name}.mean", (0.1 * self.rng.standard_normal(c)).astype(np.float32))
        var = self.const(f"{name}.var", (1 + 0.5 * self.rng.random(c)).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def plant(self, producer: str, consumer_weight: str, dead: list[int], axis: int = 1,
              inner: int = 1, producer_weight_axis: int = 0) -> None:
        """Zero `dead` channels in the consumer and give their producer filters the largest norms."""
        arrays = {t.name: numpy_helper.to_array(t).copy() for t in self.inits}
        w = arrays[consumer_weight]
        channels = w.shape[axis] // inner
        idx = np.concatenate([np.arange(c * inner, (c + 1) * inner) for c in dead])
        moved = np.moveaxis(w, axis, 0)
        moved[idx] = 0.0
        pw = np.moveaxis(arrays[f"{producer}.w"], producer_weight_axis, 0)
        pw[dead] *= 10.0
        assert channels > len(dead)
        for name in (consumer_weight, f"{producer}.w"):
            self._replace(name, arrays[name])
        self.dead[producer] = sorted(dead)

    def _replace(self, name: str, array: np.ndarray) -> None:
        for i, t in enumerate(self.inits):
            if t.name == name:
                self.inits[i] = numpy_helper.from_array(array.astype(np.float32), name)

    def model(self, x_shape, out: str, out_shape, x_name: str = "x") -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_chain(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """x → conv1(8) → Relu → conv2(6) → Relu → conv3(4): two prunable groups."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    h = n.node("Relu", [n.conv(h, "conv2", 8, 6)], "relu2")
    n.conv(h, "conv3", 6, 4)
    n.plant("conv1", "conv2.w", [1, 4, 5, 6])
    n.plant("conv2", "conv3.w", [0, 2, 5])
    return n.model(["N", 3, 12, 12], "conv3", ["N", 4, 12, 12]), n.dead


def conv_bn_relu(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """x → conv1 → BN → Relu → conv2 → BN → Relu → conv3 (strided, no bias)."""
    n = Net(seed)
    h = n.node("Relu", [n.bn(n.conv("x", "conv1", 3, 8, bias=False), "bn1", 8)], "relu1")
    h = n.node("Relu", [n.bn(n.conv(h, "conv2", 8, 8, strides=[2, 2]), "bn2", 8)], "relu2")
    n.conv(h, "conv3", 8, 5, bias=False)
    n.plant("conv1", "conv2.w", [0, 3, 6, 7])
    n.plant("conv2", "conv3.w", [1, 2, 4, 5])
    return n.model(["N", 3, 12, 12], "conv3", ["N", 5, 6, 6]), n.dead


def pool_flatten_gemm(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """conv → Relu → MaxPool → Flatten → Gemm(transB) → Relu → Gemm: conv and hidden FC prunable."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 6)], "relu1")
    h = n.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    h = n.node("Flatten", [h], "flatten", axis=1)
    fc1 = n.node("Gemm", [h, n.weight("fc1.w", (10, 6 * 16)), n.weight("fc1.b", (10,), 0.1)],
                 "fc1", transB=1)
    h = n.node("Relu", [fc1], "relu2")
    n.node("Gemm", [h, n.weight("fc2.w", (10, 4)), n.weight("fc2.b", (4,), 0.1)], "fc2")
    n.plant("conv1", "fc1.w", [0, 2, 5], axis=1, inner=16)
    n.plant("fc1", "fc2.w", [1, 3, 4, 7, 8], axis=0)
    return n.model(["N", 3, 8, 8], "fc2", ["N", 4]), n.dead


def residual_block(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """stem → [conv1-BN-Relu-conv2-BN] + shortcut → Add → Relu → head conv: conv1 is prunable."""
    n = Net(seed)
    stem = n.node("Relu", [n.conv("x", "stem", 3, 8)], "stem_relu")
    h = n.node("Relu", [n.bn(n.conv(stem, "conv1", 8, 8), "bn1", 8)], "relu1")
    h = n.bn(n.conv(h, "conv2", 8, 8), "bn2", 8)
    h = n.node("Add", [h, stem], "add")
    h = n.node("Relu", [h], "relu_out")
    n.conv(h, "head", 8, 4)
    n.plant("conv1", "conv2.w", [2, 3, 5, 7])
    return n.model(["N", 3, 10, 10], "head", ["N", 4, 10, 10]), n.dead


def depthwise_chain(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """conv1 → Relu → depthwise 3x3 → BN → Clip(ReLU6) → pointwise conv2: dw carried along."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    h = n.bn(n.conv(h, "dw", 8, 8, group=8), "bn_dw", 8)
    h = n.node("Clip", [h, n.const("zero", np.float32(0)), n.const("six", np.float32(6))], "relu6")
    n.conv(h, "conv2", 8, 4, k=1, pads=[0, 0, 0, 0])
    n.plant("conv1", "conv2.w", [0, 1, 4, 6])
    return n.model(["N", 3, 10, 10], "conv2", ["N", 4, 10, 10]), n.dead


FAMILIES = {
    "conv_chain": conv_chain,
    "conv_bn_relu": conv_bn_relu,
    "pool_flatten_gemm": pool_flatten_gemm,
    "residual_block": residual_block,
    "depthwise_chain": depthwise_chain,
}


def calibration(model: onnx.ModelProto, n: int = 64, seed: int = 1) -> np.ndarray:
    """Seeded random inputs for `model`'s single input."""
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = n
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
