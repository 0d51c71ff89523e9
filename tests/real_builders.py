"""Graphs in the shapes that real exporters write for detectors, decoders and streaming models.

Each builder returns a model with planted redundancy where it is prunable: the planted
channels carry exactly zero weight in every reader, so a ThiNet cut at keep ratio 0.5 must
remove exactly them and leave every output unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.builders import OPSET, Net

__all__ = [
    "constant_weight_classifier",
    "decomposed_bn_resnet",
    "dynamic_chain",
    "feature_pyramid",
    "grouped_block",
    "grouped_producer",
    "upsampling_decoder",
    "quantized_dynamic",
    "quantized_qdq",
    "shared_weight_pair",
    "streaming_state_cache",
]


def _zero_inputs(n: Net, weight: str, channels, axis: int = 1, offset: int = 0) -> None:
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    moved = np.moveaxis(arrays[weight], axis, 0)
    moved[[offset + c for c in channels]] = 0.0
    n._replace(weight, arrays[weight])


def _shape_pieces(n: Net, x: str, like: str, name: str) -> str:
    """PyTorch's interpolate(x, size=like.shape[-2:]) sizes: Concat(Shape(x)[0:2], H, W of like)."""
    head = n.node("Slice", [n.node("Shape", [x], f"{name}_shape_x"), n.const(f"{name}_s0", np.array([0])),
                            n.const(f"{name}_e2", np.array([2]))], f"{name}_nc")
    like_shape = n.node("Shape", [like], f"{name}_shape_like")
    pieces = [head]
    for axis in (2, 3):
        dim = n.node("Gather", [like_shape, n.const(f"{name}_i{axis}", np.array(axis))], f"{name}_g{axis}", axis=0)
        pieces.append(n.node("Unsqueeze", [dim, n.const(f"{name}_ax{axis}", np.array([0]))], f"{name}_u{axis}"))
    return n.node("Concat", pieces, f"{name}_sizes", axis=0)


def _flat_scores(n: Net, x: str, name: str, per_place: int) -> str:
    t = n.node("Transpose", [x], f"{name}_nhwc", perm=[0, 2, 3, 1])
    return n.node("Reshape", [t, n.const(f"{name}_shape", np.array([0, -1, per_place]))], f"{name}_flat")


PYRAMID_DEAD = {"c1": [0, 3, 5, 6], "c2": [1, 2, 4, 7], "c3": [0, 1, 2, 3], "l3": [0, 2, 4],
                "l4": [1, 3, 5], "smooth3": [2, 3, 6, 7], "smooth4": [2, 3, 6, 7],
                "deconv": [0, 1, 5], "hid_p3": [1, 4, 5, 6], "hid_p4": [1, 4, 5, 6]}


def feature_pyramid(seed: int = 0, batch: int | str = "N", merge: str = "Concat"
                    ) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A two-level detector at dynamic H/W, as PyTorch exports it.

    backbone c1 → c2 (1/2) → c3 (1/4); laterals l3, l4; top-down: Resize(l4, sizes =
    Concat(Shape(l4)[0:2], Shape(l3)[2], Shape(l3)[3])) concatenated with l3 → smooth3;
    smooth4 on l4; a shared head (hid, cls: one weight for both levels) → scores [?,?,?];
    a ConvTranspose decoder on p3 → seg. `batch=1` lets onnx-simplifier fold Shape(l4)[0:2]
    into a constant piece of the sizes; `merge="Add"` is RetinaFace's l3 + up (coupled).
    """
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "c1", 3, 8)], "r1")
    c3_in = n.node("Relu", [n.conv(h, "c2", 8, 8, strides=[2, 2])], "r2")
    c4_in = n.node("Relu", [n.conv(c3_in, "c3", 8, 8, strides=[2, 2])], "r3")
    l3 = n.conv(c3_in, "l3", 8, 6, k=1, pads=[0, 0, 0, 0])
    l4 = n.conv(c4_in, "l4", 8, 6, k=1, pads=[0, 0, 0, 0])
    sizes = _shape_pieces(n, l4, l3, "up")
    up = n.node("Resize", [l4, "", "", sizes], "up", mode="nearest")
    if merge == "Add":
        p3 = n.node("Relu", [n.conv(n.node("Add", [l3, up], "merge"), "smooth3", 6, 8)], "p3")
    else:
        p3 = n.node("Relu", [n.conv(n.node("Concat", [l3, up], "merge", axis=1), "smooth3", 12, 8)], "p3")
    p4 = n.node("Relu", [n.conv(l4, "smooth4", 6, 8)], "p4")
    _shared_head(n, {"p3": p3, "p4": p4})
    n.weight("deconv.w", (8, 6, 4, 4))
    n.weight("deconv.b", (6,), 0.1)
    d = n.node("ConvTranspose", [p3, "deconv.w", "deconv.b"], "deconv", kernel_shape=[4, 4],
               strides=[2, 2], pads=[1, 1, 1, 1])
    n.conv(n.node("Relu", [d], "deconv_relu"), "seg", 6, 2, k=1, pads=[0, 0, 0, 0])
    dead = dict(PYRAMID_DEAD)
    if merge == "Add":  # l3 + up: one joint group under --prune-coupled, the same channels dead
        dead["l4"] = dead["l3"]
    readers = {"c1": [("c2.w", 1, 0)], "c2": [("c3.w", 1, 0), ("l3.w", 1, 0)], "c3": [("l4.w", 1, 0)],
               "l3": [("smooth3.w", 1, 0)], "l4": [("smooth3.w", 1, 6 if merge == "Concat" else 0),
                                                    ("smooth4.w", 1, 0)],
               "smooth3": [("hid.w", 1, 0), ("deconv.w", 0, 0)], "deconv": [("seg.w", 1, 0)],
               "hid_p3": [("cls.w", 1, 0)]}
    for producer, places in readers.items():
        for weight, axis, offset in places:
            _zero_inputs(n, weight, dead[producer], axis, offset)
    graph = helper.make_graph(
        n.nodes, "pyramid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, None, None]),
         helper.make_tensor_value_info("seg", TensorProto.FLOAT, [batch, 2, "H2", "W2"])],
        n.inits)
    if merge == "Add":
        dead["l3 + l4"] = dead.pop("l3")
        del dead["l4"]
    return _finish(graph), dead


def _shared_head(n: Net, levels: dict[str, str]) -> None:
    """RetinaNet-style head: one hid (3×3) and one cls (1×1) weight for every level → scores."""
    n.weight("hid.w", (8, 8, 3, 3))
    n.weight("hid.b", (8,), 0.1)
    n.weight("cls.w", (3, 8, 1, 1))
    n.weight("cls.b", (3,), 0.1)
    flats = []
    for level, p in levels.items():
        hid = n.node("Conv", [p, "hid.w", "hid.b"], f"hid_{level}", kernel_shape=[3, 3], pads=[1] * 4)
        hid = n.node("Relu", [hid], f"hid_{level}_relu")
        cls = n.node("Conv", [hid, "cls.w", "cls.b"], f"cls_{level}", kernel_shape=[1, 1])
        flats.append(_flat_scores(n, cls, f"cls_{level}", 3))
    n.node("Concat", flats, "scores", axis=1)


def _finish(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _tbn(n: Net, x: str, name: str, c: int) -> str:
    """BN decomposed and wrapped in Transposes: NCHW → NHWC → ·scale + shift → NCHW."""
    h = n.node("Transpose", [x], f"{name}_nhwc", perm=[0, 2, 3, 1])
    h = n.node("Mul", [h, n.weight(f"{name}.scale", (c,))], f"{name}_mul")
    h = n.node("Add", [h, n.weight(f"{name}.shift", (c,), 0.1)], f"{name}_add")
    return n.node("Transpose", [h], f"{name}_nchw", perm=[0, 3, 1, 2])


def decomposed_bn_resnet(seed: int = 0, batch: int = 8) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A PyTorch ResNet block exported at a fixed batch, BN decomposed in Transposes:
    stem → [c1 → bn → relu → c2 → bn] + stem → relu → GAP → Flatten → fc."""
    n = Net(seed)
    stem = n.node("Relu", [_tbn(n, n.conv("x", "stem", 3, 8, bias=False), "bn0", 8)], "r0")
    h = n.node("Relu", [_tbn(n, n.conv(stem, "c1", 8, 8, bias=False), "bn1", 8)], "r1")
    h = _tbn(n, n.conv(h, "c2", 8, 8, bias=False), "bn2", 8)
    h = n.node("Relu", [n.node("Add", [h, stem], "add")], "r2")
    h = n.node("Flatten", [n.node("GlobalAveragePool", [h], "gap")], "flat")
    n.node("Gemm", [h, n.weight("fc.w", (5, 8)), n.weight("fc.b", (5,), 0.1)], "fc", transB=1)
    _zero_inputs(n, "c2.w", [1, 2, 5, 6])
    return n.model([batch, 3, 16, 16], "fc", [batch, 5]), {"c1": [1, 2, 5, 6]}


def constant_weight_classifier(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """paddle2onnx style: every weight in a Constant node, none in the initializers."""
    model, dead = _plain_chain(seed)
    graph = model.graph
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
                 for t in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model, dead


def dynamic_chain(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """conv1 (3→8, 3×3) → conv2 (8→6, 3×3, stride 2) → GAP → fc (6→4) at dynamic H/W."""
    return _plain_chain(seed, ["N", 3, "H", "W"])


def _plain_chain(seed: int, x_shape=("N", 3, 12, 12)) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    h = n.node("Relu", [n.conv(h, "conv2", 8, 6, strides=[2, 2])], "relu2")
    h = n.node("Flatten", [n.node("GlobalAveragePool", [h], "gap")], "flat")
    n.node("Gemm", [h, n.weight("fc.w", (4, 6)), n.weight("fc.b", (4,), 0.1)], "fc", transB=1)
    _zero_inputs(n, "conv2.w", [0, 2, 3, 7])
    _zero_inputs(n, "fc.w", [1, 4, 5])
    return n.model(list(x_shape), "fc", ["N", 4]), {"conv1": [0, 2, 3, 7], "conv2": [1, 4, 5]}


def shared_weight_pair(seed: int = 0, through_identity: bool = False) -> tuple[onnx.ModelProto, dict]:
    """One initializer read by two convs on two branches (the second through Identity if asked):
    x → a(shared w) → relu → ra; x → b(shared w) → relu → rb; ra → ha, rb → hb; out = ha + hb."""
    n = Net(seed)
    n.weight("shared.w", (8, 3, 3, 3))
    n.weight("shared.b", (8,), 0.1)
    second = "shared.w"
    if through_identity:
        second = n.node("Identity", ["shared.w"], "shared_alias")
    a = n.node("Relu", [n.node("Conv", ["x", "shared.w", "shared.b"], "a", kernel_shape=[3, 3], pads=[1] * 4)], "ra")
    xb = n.node("Neg", ["x"], "xb")
    b = n.node("Relu", [n.node("Conv", [xb, second, "shared.b"], "b", kernel_shape=[3, 3], pads=[1] * 4)], "rb")
    ha = n.conv(a, "ha", 8, 4)
    hb = n.conv(b, "hb", 8, 4)
    n.node("Add", [ha, hb], "out")
    _zero_inputs(n, "ha.w", [0, 1, 2, 3])
    _zero_inputs(n, "hb.w", [4, 5, 6, 7])
    return n.model(["N", 3, 8, 8], "out", ["N", 4, 8, 8]), {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}


def quantized_qdq(seed: int = 0) -> onnx.ModelProto:
    """A QDQ-quantized conv chain (QuantizeLinear/DequantizeLinear around every conv)."""
    n = Net(seed)
    scale, zero = n.const("s", np.float32(0.05)), n.const("z", np.uint8(128))
    q = n.node("QuantizeLinear", ["x", scale, zero], "xq")
    h = n.node("DequantizeLinear", [q, scale, zero], "xdq")
    h = n.node("Relu", [n.conv(h, "conv1", 3, 8)], "relu1")
    q = n.node("QuantizeLinear", [h, scale, zero], "hq")
    h = n.node("DequantizeLinear", [q, scale, zero], "hdq")
    n.conv(h, "conv2", 8, 4)
    return n.model(["N", 3, 8, 8], "conv2", ["N", 4, 8, 8])


def quantized_dynamic(seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's dynamic quantization of a conv: DynamicQuantizeLinear → ConvInteger →
    Cast → Mul by the scales."""
    n = Net(seed)
    n.nodes.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="quant"))
    w = n.const("w_q", np.random.default_rng(seed).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8))
    acc = n.node("ConvInteger", ["xq", w, "xz", n.const("w_z", np.uint8(128))], "conv", kernel_shape=[3, 3])
    scale = n.node("Mul", ["xs", n.const("w_s", np.float32(0.01))], "scale")
    n.node("Mul", [n.node("Cast", [acc], "acc_f", to=TensorProto.FLOAT), scale], "out")
    return n.model(["N", 3, 8, 8], "out", ["N", 4, 6, 6])


def streaming_state_cache(seed: int = 0) -> onnx.ModelProto:
    """A streaming 1-D conv model: conv1's channels are concatenated in time with the state
    cache input, and the last frames leave as the next state output."""
    n = Net(seed)
    n.weight("conv1.w", (6, 4, 1))
    h = n.node("Relu", [n.node("Conv", ["x", "conv1.w"], "conv1", kernel_shape=[1])], "relu1")
    cat = n.node("Concat", ["state_in", h], "with_state", axis=2)
    n.weight("conv2.w", (5, 6, 3))
    n.node("Conv", [cat, "conv2.w"], "conv2", kernel_shape=[3])
    n.nodes.append(helper.make_node("Slice", [cat, n.const("st", np.array([-2])), n.const("en", np.array([2**31])),
                                              n.const("ax", np.array([2]))], ["state_out"], name="next_state"))
    graph = helper.make_graph(
        n.nodes, "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10]),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["N", 6, 2])],
        [helper.make_tensor_value_info("conv2", TensorProto.FLOAT, ["N", 5, 10]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", 6, 2])],
        n.inits)
    return _finish(graph)


def grouped_block(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """ResNeXt-style: conv1 (3→8) → Relu → grouped conv (group 4: 2 channels in, 2 out per
    group) → BN → Relu → conv3 (8→4). conv1 is cut by whole groups; groups 1 and 3 are dead."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    h = n.node("Relu", [n.bn(n.conv(h, "grouped", 8, 8, group=4), "bn", 8)], "relu2")
    n.conv(h, "conv3", 8, 4)
    _zero_inputs(n, "conv3.w", [2, 3, 6, 7])
    return n.model(["N", 3, 8, 8], "conv3", ["N", 4, 8, 8]), {"conv1": [1, 3]}


def upsampling_decoder(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A segmentation decoder: conv1 (3→8, stride 2) → Relu → per-channel ConvTranspose
    (group 8, bilinear ×2 upsampling, bias) → conv2 (8→3)."""
    n = Net(seed)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8, strides=[2, 2])], "relu1")
    bilinear = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]).astype(np.float32)
    n.const("up.w", np.tile(bilinear, (8, 1, 1, 1)))
    n.weight("up.b", (8,), 0.1)
    up = n.node("ConvTranspose", [h, "up.w", "up.b"], "up", group=8, kernel_shape=[4, 4],
                strides=[2, 2], pads=[1, 1, 1, 1])
    n.conv(up, "conv2", 8, 3)
    _zero_inputs(n, "conv2.w", [0, 3, 4, 6])
    return n.model(["N", 3, 8, 8], "conv2", ["N", 3, 8, 8]), {"conv1": [0, 3, 4, 6]}


def grouped_producer(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """x (8 channels) → grouped conv G (group 2, 4 filters per group) → BN → Relu → conv_c:
    G's filter 1 and 2 of every group (positions 1, 2, 5, 6) are dead in conv_c."""
    n = Net(seed)
    h = n.node("Relu", [n.bn(n.conv("x", "G", 8, 8, group=2), "bn", 8)], "relu")
    n.conv(h, "conv_c", 8, 4)
    _zero_inputs(n, "conv_c.w", [1, 2, 5, 6])
    return n.model(["N", 8, 8, 8], "conv_c", ["N", 4, 8, 8]), {"G": [1, 2, 5, 6]}
