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


# --- graph families from real exporters (issue: any ONNX CNN) ------------------------------


def _silu(n: Net, x: str, name: str) -> str:
    return n.node("Mul", [x, n.node("Sigmoid", [x], f"{name}_sig")], name)


def concat_two_producers(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """a(6) and b(4) → Concat → conv: each producer cut inside its own slice of the concat."""
    n = Net(seed)
    a = n.node("Relu", [n.conv("x", "a", 3, 6)], "ra")
    b = n.node("Relu", [n.conv("x", "b", 3, 4)], "rb")
    cat = n.node("Concat", [a, b], "cat", axis=1)
    n.conv(cat, "head", 10, 5)
    n.plant("a", "head.w", [0, 2, 3])
    _plant_at(n, "b", "head.w", [1, 3], offset=6)
    return n.model(["N", 3, 8, 8], "head", ["N", 5, 8, 8]), n.dead


def _plant_at(n: Net, producer: str, weight: str, dead: list[int], offset: int) -> None:
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    arrays[weight][:, [offset + d for d in dead]] = 0.0
    arrays[f"{producer}.w"][dead] *= 10.0
    n._replace(weight, arrays[weight])
    n._replace(f"{producer}.w", arrays[f"{producer}.w"])
    n.dead[producer] = sorted(dead)


def sppf(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """YOLO SPPF: cv1 → SiLU → MaxPool×3 chain → Concat(x, p1, p2, p3) → cv2: 4 copies of cv1."""
    n = Net(seed)
    x = _silu(n, n.conv("x", "cv1", 3, 6, k=1, pads=[0, 0, 0, 0]), "act1")
    pools = [x]
    for i in range(3):
        pools.append(n.node("MaxPool", [pools[-1]], f"pool{i}", kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    cat = n.node("Concat", pools, "cat", axis=1)
    n.conv(cat, "cv2", 24, 5, k=1, pads=[0, 0, 0, 0])
    dead = [1, 2, 4]
    for copy in range(4):
        _plant_at(n, "cv1", "cv2.w", dead, offset=6 * copy)
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    arrays["cv1.w"][dead] /= 10.0**3  # _plant_at scaled them once per copy; keep one ×10
    n._replace("cv1.w", arrays["cv1.w"])
    return n.model(["N", 3, 10, 10], "cv2", ["N", 5, 10, 10]), n.dead


def _c2f_trunk(n: Net) -> str:
    """cv1(3→8, 1×1) → SiLU → Split(4, 4) into y0, y1 → bottleneck m_cv1, m_cv2 on y1."""
    y = _silu(n, n.conv("x", "cv1", 3, 8, k=1, pads=[0, 0, 0, 0]), "act1")
    n.nodes.append(helper.make_node("Split", [y, n.const("sizes", np.array([4, 4], np.int64))],
                                    ["y0", "y1"], name="split", axis=1))
    m = _silu(n, n.conv("y1", "m_cv1", 4, 4), "m_act1")
    return _silu(n, n.conv(m, "m_cv2", 4, 4), "m_act2")


def c2f_split(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """YOLOv8 C2f without shortcut: cv1 → Split → (y0, y1); y1 → bottleneck; Concat → cv2."""
    n = Net(seed)
    m = _c2f_trunk(n)
    cat = n.node("Concat", ["y0", "y1", m], "cat", axis=1)
    n.conv(cat, "cv2", 12, 6, k=1, pads=[0, 0, 0, 0])
    # cv1 channels 1, 3 (in y0) and 5, 6 (in y1 as 1, 2) are dead everywhere they are read.
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    arrays["cv2.w"][:, [1, 3, 5, 6]] = 0.0
    arrays["m_cv1.w"][:, [1, 2]] = 0.0
    arrays["cv1.w"][[1, 3, 5, 6]] *= 10.0
    for name in ("cv2.w", "m_cv1.w", "cv1.w"):
        n._replace(name, arrays[name])
    n.dead["cv1"] = [1, 3, 5, 6]
    n.plant("m_cv1", "m_cv2.w", [0, 3])
    _plant_at(n, "m_cv2", "cv2.w", [1, 2], offset=8)
    return n.model(["N", 3, 8, 8], "cv2", ["N", 6, 8, 8]), n.dead


def c2f_shortcut(seed: int = 0) -> tuple[onnx.ModelProto, list[int]]:
    """YOLOv8 C2f with a residual bottleneck: the second Split output and the bottleneck's
    last conv are summed, so cv1[4:8] and m_cv2 are coupled through the Split.

    Planted: channels 1 and 2 of that summed stream (cv1 filters 5, 6 and m_cv2 filters 1, 2)
    are exactly zero and carry no weight in any reader (m_cv1, and cv2 at both Concat slots).
    Returns the model and the dead stream channels.
    """
    n = Net(seed)
    m = _c2f_trunk(n)
    stream = n.node("Add", ["y1", m], "m_add")
    cat = n.node("Concat", ["y0", "y1", stream], "cat", axis=1)
    n.conv(cat, "cv2", 12, 6, k=1, pads=[0, 0, 0, 0])
    dead = [1, 2]
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    for name in ("cv1.w", "cv1.b"):
        arrays[name][[4 + d for d in dead]] = 0.0
    for name in ("m_cv2.w", "m_cv2.b"):
        arrays[name][dead] = 0.0
    arrays["m_cv1.w"][:, dead] = 0.0
    arrays["cv2.w"][:, [4 + d for d in dead] + [8 + d for d in dead]] = 0.0
    for name in ("cv1.w", "cv1.b", "m_cv2.w", "m_cv2.b", "m_cv1.w", "cv2.w"):
        n._replace(name, arrays[name])
    return n.model(["N", 3, 8, 8], "cv2", ["N", 6, 8, 8]), dead


def tf2onnx_nhwc(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """Keras through tf2onnx: NHWC input, Transpose pairs around convs, BN as Mul/Add on the last
    axis, flatten as Shape→Gather→Unsqueeze→Concat→Reshape, Dense as MatMul + Add."""
    n = Net(seed)
    h = n.node("Transpose", ["x"], "to_nchw1", perm=[0, 3, 1, 2])
    h = n.node("Transpose", [n.conv(h, "conv1", 3, 6)], "to_nhwc1", perm=[0, 2, 3, 1])
    h = n.node("Mul", [h, n.weight("bn1_scale", (6,))], "bn1_mul")
    h = n.node("Add", [h, n.weight("bn1_shift", (6,))], "bn1_add")
    h = n.node("Relu", [h], "relu1")
    h = n.node("Transpose", [h], "to_nchw2", perm=[0, 3, 1, 2])
    h = n.node("Relu", [n.conv(h, "conv2", 6, 4, strides=[2, 2])], "relu2")
    h = n.node("Transpose", [h], "to_nhwc2", perm=[0, 2, 3, 1])
    shape = n.node("Shape", [h], "shape")
    batch = n.node("Gather", [shape, n.const("zero_idx", np.array(0, np.int64))], "batch", axis=0)
    batch = n.node("Unsqueeze", [batch, n.const("axes0", np.array([0], np.int64))], "batch1")
    target = n.node("Concat", [batch, n.const("minus_one", np.array([-1], np.int64))], "target", axis=0)
    h = n.node("Reshape", [h, target], "flatten")
    h = n.node("MatMul", [h, n.weight("dense.w", (4 * 4 * 4, 5))], "dense")
    n.node("Add", [h, n.weight("dense.b", (5,), 0.1)], "logits")
    n.plant("conv1", "conv2.w", [0, 2, 5])
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    dense = arrays["dense.w"].reshape(16, 4, 5)  # NHWC flatten: channel is the fastest index
    dense[:, [1, 2]] = 0.0
    arrays["conv2.w"][[1, 2]] *= 10.0
    n._replace("dense.w", dense.reshape(64, 5))
    n._replace("conv2.w", arrays["conv2.w"])
    n.dead["conv2"] = [1, 2]
    return n.model(["N", 8, 8, 3], "logits", ["N", 5]), n.dead


def se_block(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """MobileNetV3/EfficientNet block: expand → dw → SE (GAP→conv→Relu→conv→Sigmoid→Mul) → project."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "expand", 3, 8, k=1, pads=[0, 0, 0, 0])], "relu_e")
    h = n.node("Relu", [n.conv(h, "dw", 8, 8, group=8)], "relu_dw")
    s = n.node("GlobalAveragePool", [h], "se_pool")
    s = n.node("Relu", [n.conv(s, "se_reduce", 8, 6, k=1, pads=[0, 0, 0, 0])], "se_relu")
    s = n.node("Sigmoid", [n.conv(s, "se_expand", 6, 8, k=1, pads=[0, 0, 0, 0])], "se_gate")
    h = n.node("Mul", [h, s], "se_mul")
    n.conv(h, "project", 8, 4, k=1, pads=[0, 0, 0, 0])
    n.plant("se_reduce", "se_expand.w", [0, 2, 5])
    n._replace("se_reduce.b", np.full(6, 3.0, np.float32))  # every SE unit active: no ties at zero
    return n.model(["N", 3, 8, 8], "project", ["N", 4, 8, 8]), n.dead


def yolo_head(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """Neck and head: conv → SiLU → Resize ×2 → Concat(skip) → conv; head branches → Concat →
    Reshape → Softmax (DFL-like) at the output. Inner head convs are prunable, box convs are not."""
    n = Net(seed)
    skip = _silu(n, n.conv("x", "stem", 3, 4), "stem_act")
    h = _silu(n, n.conv(skip, "down", 4, 6, strides=[2, 2]), "down_act")
    roi, scales = n.const("roi", np.zeros(0, np.float32)), n.const("scales", np.array([1, 1, 2, 2], np.float32))
    up = n.node("Resize", [h, roi, scales], "up", mode="nearest")
    cat = n.node("Concat", [up, skip], "neck_cat", axis=1)
    h = _silu(n, n.conv(cat, "neck", 10, 8), "neck_act")
    box = _silu(n, n.conv(h, "box1", 8, 6), "box1_act")
    box = n.conv(box, "box2", 6, 8, k=1, pads=[0, 0, 0, 0])
    cls = _silu(n, n.conv(h, "cls1", 8, 6), "cls1_act")
    cls = n.conv(cls, "cls2", 6, 3, k=1, pads=[0, 0, 0, 0])
    out = n.node("Concat", [box, cls], "head_cat", axis=1)
    out = n.node("Reshape", [out, n.const("head_shape", np.array([0, 11, -1], np.int64))], "head_flat")
    n.node("Softmax", [out], "probs", axis=1)
    n.plant("box1", "box2.w", [1, 4, 5])
    n.plant("cls1", "cls2.w", [0, 2, 3])
    return n.model(["N", 3, 8, 8], "probs", ["N", 11, 64]), n.dead


FAMILIES.update({
    "concat_two_producers": concat_two_producers,
    "sppf": sppf,
    "c2f_split": c2f_split,
    "tf2onnx_nhwc": tf2onnx_nhwc,
    "se_block": se_block,
    "yolo_head": yolo_head,
})
