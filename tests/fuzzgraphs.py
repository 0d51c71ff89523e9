"""Random CNN graphs for property tests and tools/fuzz.py, with one planted redundancy each.

A graph is a stem conv, 1-4 random blocks and a head. Every choice goes through a `Chooser`,
so the same builder serves hypothesis (shrinkable draws) and tools/fuzz.py (a numpy RNG per
seed, reproducible by seed). Blocks: plain conv (kernel, stride, padding incl. auto_pad and
asymmetric, dilation, groups, bias, BN, activation), depthwise, pools, residual Add, Concat of
two branches, Split + Concat (C2f-like), SE gate, an NHWC Transpose wrapper, ConvTranspose,
Resize; heads: 1x1 conv or GAP/Flatten -> Gemm (-> Relu -> Gemm). Opsets 11-21.

Planted redundancy: where a group-1 conv P feeds one group-1 conv C only through element-wise
ops (Relu, BN, Clip, ...), C's weights on half of P's channels are zeroed and P's filters for
them scaled up: pruning P to half must remove exactly those and keep the output. P never reads
a globally pooled tensor (SE gates): one value per sample lets a live ReLU unit be zero on every
calibration sample, a tie with the planted channels that no data-driven method can break.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Chooser", "FuzzCase", "RngChooser", "build_case", "ir_version_for"]

OPSETS = tuple(range(11, 22))
BLOCKS = ("conv", "conv", "depthwise", "pool", "residual", "concat", "split", "se", "nhwc",
          "convtranspose", "resize")
ACTIVATIONS = ("relu", "silu", "clip", "leaky", "none")
_PASS_THROUGH = {"Relu", "LeakyRelu", "Clip", "BatchNormalization", "Identity"}


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...  # inclusive bounds
    def choice(self, options: tuple | list) -> Any: ...


class RngChooser:
    """Choices from a seeded numpy generator (tools/fuzz.py: one seed per graph)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, options: tuple | list) -> Any:
        return options[int(self.rng.integers(len(options)))]


@dataclass(frozen=True)
class FuzzCase:
    """A generated graph, its block kinds, and the planted (producer, dead channels) if any."""

    model: onnx.ModelProto
    blocks: tuple[str, ...]
    planted: tuple[str, tuple[int, ...]] | None
    opset: int
    prune_coupled: bool = False  # slim with --prune-coupled (joint cuts across residual Adds)


def ir_version_for(opset: int) -> int:
    return 10 if opset >= 21 else 8 if opset >= 15 else 7


@dataclass
class _Builder:
    choose: Chooser
    opset: int
    seed: int
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape, fan_in: int) -> str:
        scale = math.sqrt(2.0 / max(fan_in, 1))
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs, outputs=None, **attrs) -> str:
        name = self.name(op.lower())
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, x: str, cin: int, cout: int, s: int, k: int = 3, stride: int = 1,
             dilation: int = 1, group: int = 1, pads: str = "same", bias: bool = True) -> tuple[str, int]:
        """A Conv and its output side; `pads` is same | valid | asym | auto."""
        name = self.name("conv")
        inputs = [x, self.weight(f"{name}.w", (cout, cin // group, k, k), cin // group * k * k)]
        if bias:
            inputs.append(self.const(f"{name}.b", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)))
        attrs: dict[str, Any] = {"kernel_shape": [k, k], "group": group}
        if stride > 1:
            attrs["strides"] = [stride, stride]
        if dilation > 1:
            attrs["dilations"] = [dilation, dilation]
        span = dilation * (k - 1)
        if pads == "auto":
            attrs["auto_pad"] = "SAME_UPPER"
            out = -(-s // stride)
        else:
            begin, end = {"same": (span // 2, span - span // 2), "valid": (0, 0),
                          "asym": (0, min(1, span) if span else 1)}[pads]
            attrs["pads"] = [begin, begin, end, end]
            out = (s + begin + end - span - 1) // stride + 1
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, **attrs))
        return name, out

    def bn(self, x: str, c: int) -> str:
        name = self.name("bn")
        values = [(1 + 0.2 * self.rng.standard_normal(c)), 0.1 * self.rng.standard_normal(c),
                  0.1 * self.rng.standard_normal(c), 1 + 0.5 * self.rng.random(c)]
        inputs = [self.const(f"{name}.{k}", v.astype(np.float32))
                  for k, v in zip(("scale", "bias", "mean", "var"), values)]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *inputs], [name], name=name,
                                           epsilon=1e-5))
        return name

    def act(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "leaky":
            return self.node("LeakyRelu", [x], alpha=0.1)
        if kind == "clip":
            lo = self.const(self.name("lo"), np.float32(0.0))
            hi = self.const(self.name("hi"), np.float32(6.0))
            return self.node("Clip", [x, lo, hi])
        if kind == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        return x

    def conv_unit(self, x: str, cin: int, cout: int, s: int, **kw) -> tuple[str, int]:
        """Conv (+ BN) + activation, BN and activation drawn."""
        h, s = self.conv(x, cin, cout, s, bias=self.choose.choice((True, False)), **kw)
        if self.choose.choice((True, False)):
            h = self.bn(h, cout)
        return self.act(h, self.choose.choice(ACTIVATIONS)), s


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _block_conv(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    k = b.choose.choice((1, 3, 5) if s >= 5 else (1, 3))
    stride = b.choose.choice((1, 2)) if s >= 6 else 1
    dilation = b.choose.choice((1, 2)) if k == 3 and s >= 7 else 1
    pads = ("same", "valid", "asym") + (("auto",) if dilation == 1 else ())  # ORT: no SAME with dilation
    pads = b.choose.choice(pads if s > dilation * (k - 1) + 1 else ("same",))
    cout = b.choose.integer(2, 12)
    common = [g for g in _divisors(c) if cout % g == 0]
    group = b.choose.choice(common[:3])
    h, s = b.conv_unit(h, c, cout, s, k=k, stride=stride, dilation=dilation, group=group, pads=pads)
    return h, cout, s


def _block_depthwise(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    cout = c * b.choose.choice((1, 1, 2))
    h, s = b.conv_unit(h, c, cout, s, k=3, group=c, stride=b.choose.choice((1, 2)) if s >= 6 else 1)
    return h, cout, s


def _block_pool(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    op = b.choose.choice(("MaxPool", "AveragePool"))
    if s >= 4 and b.choose.choice((True, False)):
        return b.node(op, [h], kernel_shape=[2, 2], strides=[2, 2]), c, s // 2
    return b.node(op, [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), c, s


def _block_residual(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    mid = b.choose.integer(2, 10)
    t, _ = b.conv_unit(h, c, mid, s)
    t, _ = b.conv(t, mid, c, s, bias=b.choose.choice((True, False)))
    if b.choose.choice((True, False)):
        t = b.bn(t, c)
    return b.act(b.node("Add", [t, h]), b.choose.choice(("relu", "silu", "none"))), c, s


def _block_concat(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    ca, cb = b.choose.integer(2, 8), b.choose.integer(2, 8)
    left, _ = b.conv_unit(h, c, ca, s, k=1, pads="valid")
    right, _ = b.conv_unit(h, c, cb, s, k=3)
    parts = [left, right] if b.choose.choice((True, False)) else [right, left, h]
    total = ca + cb + (c if len(parts) == 3 else 0)
    return b.node("Concat", parts, axis=1), total, s


def _block_split(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    if c < 2:
        return _block_conv(b, h, c, s)
    first = b.choose.integer(1, c - 1)
    name = b.name("split")
    outs = [f"{name}_a", f"{name}_b"]
    sizes = np.array([first, c - first], np.int64)
    if b.opset >= 13:
        b.nodes.append(helper.make_node("Split", [h, b.const(f"{name}.sizes", sizes)], outs, name=name, axis=1))
    else:
        b.nodes.append(helper.make_node("Split", [h], outs, name=name, axis=1, split=sizes.tolist()))
    m, _ = b.conv_unit(outs[1], c - first, c - first, s)
    if b.choose.choice((True, False)):
        m = b.node("Add", [outs[1], m])
    return b.node("Concat", [outs[0], outs[1], m], axis=1), c + (c - first), s


def _block_se(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    r = b.choose.integer(2, 8)
    g = b.node("GlobalAveragePool", [h])
    g, _ = b.conv(g, c, r, 1, k=1, pads="valid")
    g = b.node("Relu", [g])
    g, _ = b.conv(g, r, c, 1, k=1, pads="valid")
    return b.node("Mul", [h, b.node("Sigmoid", [g])]), c, s


def _block_nhwc(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    """tf2onnx style: Transpose to NHWC, per-channel Mul/Add on the last axis, back to NCHW."""
    t = b.node("Transpose", [h], perm=[0, 2, 3, 1])
    t = b.node("Mul", [t, b.const(b.name("scale"), (1 + 0.2 * b.rng.standard_normal(c)).astype(np.float32))])
    t = b.node("Add", [t, b.const(b.name("shift"), (0.1 * b.rng.standard_normal(c)).astype(np.float32))])
    t = b.act(t, b.choose.choice(("relu", "none")))
    return b.node("Transpose", [t], perm=[0, 3, 1, 2]), c, s


def _block_convtranspose(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    cout = b.choose.integer(2, 10)
    name = b.name("deconv")
    up = s <= 8 and b.choose.choice((True, False))
    k, stride, pad = (2, 2, 0) if up else (3, 1, 1)
    inputs = [h, b.weight(f"{name}.w", (c, cout, k, k), c * k * k)]
    if b.choose.choice((True, False)):
        inputs.append(b.const(f"{name}.b", (0.1 * b.rng.standard_normal(cout)).astype(np.float32)))
    b.nodes.append(helper.make_node("ConvTranspose", inputs, [name], name=name, kernel_shape=[k, k],
                                    strides=[stride, stride], pads=[pad] * 4))
    return b.act(name, b.choose.choice(("relu", "none"))), cout, s * stride


def _block_resize(b: _Builder, h: str, c: int, s: int) -> tuple[str, int, int]:
    if s > 8:
        return _block_pool(b, h, c, s)
    scales = b.const(b.name("scales"), np.array([1, 1, 2, 2], np.float32))
    roi = "" if b.opset >= 13 and b.choose.choice((True, False)) else b.const(b.name("roi"), np.zeros(0, np.float32))
    mode = b.choose.choice(("nearest", "linear"))
    return b.node("Resize", [h, roi, scales], mode=mode), c, s * 2


_BLOCK_BUILDERS = {
    "conv": _block_conv, "depthwise": _block_depthwise, "pool": _block_pool,
    "residual": _block_residual, "concat": _block_concat, "split": _block_split, "se": _block_se,
    "nhwc": _block_nhwc, "convtranspose": _block_convtranspose, "resize": _block_resize,
}


def _head(b: _Builder, h: str, c: int, s: int) -> tuple[str, list]:
    kind = b.choose.choice(("conv", "gap_fc", "flatten_fc") if c * s * s <= 768 else ("conv", "gap_fc"))
    if kind == "conv":
        cout = b.choose.integer(2, 6)
        out, _ = b.conv(h, c, cout, s, k=1, pads="valid")
        return out, ["N", cout, s, s]
    if kind == "gap_fc":
        h, features = b.node("GlobalAveragePool", [h]), c
    else:
        features = c * s * s
    h = b.node("Flatten", [h], axis=1)
    classes = b.choose.integer(2, 6)
    if b.choose.choice((True, False)):
        hidden = b.choose.integer(4, 12)
        h = b.node("Relu", [_gemm(b, h, features, hidden)])
        features = hidden
    return _gemm(b, h, features, classes), ["N", classes]


def _gemm(b: _Builder, h: str, fin: int, fout: int) -> str:
    name = b.name("fc")
    w = b.weight(f"{name}.w", (fout, fin), fin)
    bias = b.const(f"{name}.b", (0.1 * b.rng.standard_normal(fout)).astype(np.float32))
    b.nodes.append(helper.make_node("Gemm", [h, w, bias], [name], name=name, transB=1))
    return name


def build_case(choose: Chooser) -> FuzzCase:
    """Draw one graph: input, stem conv, 1-4 blocks, head; plant one redundancy where possible."""
    opset = choose.choice(OPSETS)
    b = _Builder(choose, opset, seed=choose.integer(0, 2**16))
    cin, side = choose.integer(1, 4), choose.integer(6, 12)
    s = side
    nhwc_input = choose.choice((False, False, True))
    x = "x"
    h = b.node("Transpose", [x], perm=[0, 3, 1, 2]) if nhwc_input else x
    c = choose.integer(3, 10)
    h, s = b.conv_unit(h, cin, c, s)
    blocks = tuple(choose.choice(BLOCKS) for _ in range(choose.integer(1, 4)))
    for kind in blocks:
        h, c, s = _BLOCK_BUILDERS[kind](b, h, c, s)
    out, out_shape = _head(b, h, c, s)
    x_shape = ["N", side, side, cin] if nhwc_input else ["N", cin, side, side]
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version_for(opset)
    planted = _plant(model, choose)
    onnx.checker.check_model(model, full_check=True)
    return FuzzCase(model, blocks, planted, opset, prune_coupled=choose.choice((False, True)))


def _plant(model: onnx.ModelProto, choose: Chooser) -> tuple[str, tuple[int, ...]] | None:
    """Zero a reader conv's weights on half its producer's channels (see module docstring)."""
    sites = _plant_sites(model)
    if not sites:
        return None
    producer, consumer = choose.choice(sites)
    arrays = {t.name: t for t in model.graph.initializer}
    pw = numpy_helper.to_array(arrays[producer.input[1]]).copy()
    cw = numpy_helper.to_array(arrays[consumer.input[1]]).copy()
    channels = pw.shape[0]
    keep = max(1, int(round(channels * 0.5)))
    dead = sorted(int(i) for i in np.random.default_rng(channels).permutation(channels)[: channels - keep])
    cw[:, dead] = 0.0
    pw[dead] *= 10.0
    arrays[producer.input[1]].CopyFrom(numpy_helper.from_array(pw, producer.input[1]))
    arrays[consumer.input[1]].CopyFrom(numpy_helper.from_array(cw, consumer.input[1]))
    return producer.name, tuple(dead)


def _plant_sites(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(producer, reader) conv pairs joined only by element-wise ops, both group 1, channels ≥ 2."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    pooled = {n.output[0] for n in model.graph.node if n.op_type == "GlobalAveragePool"}
    sites = []
    for node in model.graph.node:
        if node.op_type != "Conv" or _group(node) != 1 or node.input[0] in pooled:
            continue  # after global pooling a live unit can be silent on all calibration samples
        tensor = node.output[0]
        while tensor not in outputs and len(uses.get(tensor, [])) == 1:
            reader = uses[tensor][0]
            if reader.op_type == "Conv" and reader.input[0] == tensor and _group(reader) == 1:
                if _out_channels(model, node) >= 2:
                    sites.append((node, reader))
                break
            if reader.op_type not in _PASS_THROUGH or reader.input[0] != tensor:
                break
            tensor = reader.output[0]
    return sites


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _out_channels(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    return int(weight.dims[0])
