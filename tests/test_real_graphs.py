"""Patterns of real detector, decoder, classifier and streaming exports (issue 12): each one
slims exactly on planted redundancy, reports true costs, or is refused for its real reason."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from onnx_thinet import SlimConfig, slim
from onnx_thinet.channels.analysis import analyze
from onnx_thinet.channels.consumers import CONV_TRANSPOSE, transposed_conv_as_conv
from onnx_thinet.cli.main import app
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.canonical import canonicalize
from onnx_thinet.io.data import ArrayData
from onnx_thinet.rewrite.surgery import initializer_array
from tests import real_builders
from tests.builders import Net


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _images(n: int, size, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, channels, *size)).astype(np.float32)


def _assert_same_outputs(original, slimmed, feeds) -> None:
    for ref, got in zip(_run(original, feeds), _run(slimmed, feeds), strict=True):
        assert ref.shape == got.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _interface(model: onnx.ModelProto) -> list[bytes]:
    return [vi.SerializeToString() for vi in list(model.graph.input) + list(model.graph.output)]


@pytest.fixture(scope="module")
def pyramid():
    model, dead = real_builders.feature_pyramid()
    result = slim(model, ArrayData({"x": _images(40, (16, 16))}), SlimConfig(keep_ratio=0.5))
    return model, dead, result


@pytest.mark.parametrize("variant", ["batch 1 (sizes piece folded)", "Add merge, --prune-coupled"])
def test_feature_pyramid_variants_prune_every_conv_exactly(variant):
    """onnx-simplifier folds Shape(l4)[0:2] into a constant piece of the sizes at batch 1;
    RetinaFace merges levels with an Add, which --prune-coupled cuts jointly."""
    if variant.startswith("batch"):
        model, dead = real_builders.feature_pyramid(batch=1)
        config = SlimConfig(batch_size=1)
    else:
        model, dead = real_builders.feature_pyramid(merge="Add")
        config = SlimConfig(prune_coupled=True)
    result = slim(model, ArrayData({"x": _images(40, (16, 16))}), config)
    _assert_kept_is_the_complement(result, dead)
    for size in (12, 20):
        _assert_same_outputs(model, result.model, {"x": _images(1, (size, size), seed=size)})
    assert _interface(result.model) == _interface(model)


def _assert_kept_is_the_complement(result, dead) -> None:
    kept = {g.producer: set(g.kept) for g in result.groups}
    assert set(kept) == set(dead)
    for producer, channels in dead.items():
        assert not kept[producer] & set(channels), producer
        assert len(kept[producer]) == len(channels), producer


def test_feature_pyramid_prunes_every_conv_of_the_pyramid_exactly(pyramid):
    """Shape→Gather→Resize(sizes) top-down path, ConvTranspose head (as producer and consumer)
    and a head whose weights both levels share: every planted channel goes, outputs stay."""
    model, dead, result = pyramid
    _assert_kept_is_the_complement(result, dead)
    for size in (12, 16, 20):  # other sizes than calibration: H and W are dynamic
        _assert_same_outputs(model, result.model, {"x": _images(2, (size, size), seed=size)})


def test_feature_pyramid_keeps_its_declared_interface_verbatim(pyramid):
    model, _, result = pyramid
    assert _interface(result.model) == _interface(model)  # scores stays [?, ?, ?]


def test_shape_that_reads_the_channel_count_for_a_reshape_is_not_safe():
    n = Net(0)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    channels = n.node("Gather", [n.node("Shape", [h], "shape"), n.const("one", np.array([1]))], "c", axis=0)
    target = n.node("Concat", [n.const("lead", np.array([1])), channels, n.const("hw", np.array([8, -1]))],
                    "target", axis=0)
    n.conv(n.node("Reshape", [h, target], "reshape"), "conv2", 8, 4)
    model = n.model([1, 3, 8, 8], "conv2", [1, 4, 8, 8])
    skipped = {s.producer: s.reason for s in analyze(canonicalize(model, simplify=False)).skipped}
    assert "channel count read by Shape" in skipped["conv1"]


@pytest.mark.parametrize("strides, pads, dilations, output_padding", [
    ((2, 2), (1, 1, 1, 1), (1, 1), (0, 0)),
    ((2, 3), (0, 1, 2, 0), (2, 1), (1, 2)),
    ((1, 1), (0, 0, 0, 0), (1, 1), (0, 0)),
])
def test_transposed_conv_equals_the_stride_1_conv_of_its_working_weight(strides, pads, dilations,
                                                                         output_padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=list(strides),
                            pads=list(pads), dilations=list(dilations), output_padding=list(output_padding))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    expected = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x, "w": w})[0]
    up, conv_pads = transposed_conv_as_conv(x, (3, 3), strides, dilations, pads, output_padding)
    got = _conv_numpy(up, CONV_TRANSPOSE.working(w), conv_pads, dilations)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(CONV_TRANSPOSE.stored(CONV_TRANSPOSE.working(w)), w)


def _conv_numpy(x, w, pads, dilations):
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    f, _, kh, kw = w.shape
    oh = x.shape[2] - dilations[0] * (kh - 1)
    ow = x.shape[3] - dilations[1] * (kw - 1)
    out = np.zeros((x.shape[0], f, oh, ow))
    for a in range(kh):
        for b in range(kw):
            window = x[:, :, a * dilations[0]: a * dilations[0] + oh, b * dilations[1]: b * dilations[1] + ow]
            out += np.einsum("nchw,fc->nfhw", window, w[:, :, a, b])
    return out


@pytest.mark.parametrize("reconstruct", ["none", "scale"])
def test_transposed_conv_reader_is_cut_exactly_with_every_reconstruction(pyramid, reconstruct):
    model, dead, _ = pyramid
    config = SlimConfig(keep_ratio=0.5, reconstruct=reconstruct, only=("smooth3", "deconv"))
    result = slim(model, ArrayData({"x": _images(24, (16, 16))}), config)
    assert {g.producer: set(g.kept) for g in result.groups} == {
        p: set(range(8 if p == "smooth3" else 6)) - set(dead[p]) for p in ("smooth3", "deconv")}
    _assert_same_outputs(model, result.model, {"x": _images(2, (12, 12), seed=3)})


def _conv_flops(cout, h, w, cin, k):
    return 2 * cout * h * w * cin * k * k


def test_decomposed_bn_resnet_exported_at_a_fixed_batch_reports_true_costs():
    """BN in Transposes (folded into the convs by canonicalization), batch fixed at 8 by the
    export: costs are for one 16×16 sample of the canonical graph, counted here by hand."""
    model, dead = real_builders.decomposed_bn_resnet(batch=8)
    result = slim(model, ArrayData({"x": _images(40, (16, 16))}), SlimConfig(batch_size=8, holdout=0.2))
    assert {g.producer: set(g.kept) for g in result.groups} == {"c1": {0, 3, 4, 7}}
    convs = _conv_flops(8, 16, 16, 3, 3) + 2 * _conv_flops(8, 16, 16, 8, 3)
    assert result.flops_before == convs + 2 * 5 * 8
    assert result.flops_after == _conv_flops(8, 16, 16, 3, 3) + 2 * _conv_flops(4, 16, 16, 8, 3) + 80
    folded_bias = 3 * 8  # each BN shift becomes its conv's bias, each scale goes into the weights
    assert result.params_before == 8 * 3 * 9 + 2 * 8 * 8 * 9 + folded_bias + 5 * 8 + 5
    assert result.params_after == 8 * 3 * 9 + 2 * 4 * 8 * 9 + folded_bias - 4 + 5 * 8 + 5
    assert result.report()["flops_input_shapes"] == {"x": [1, 3, 16, 16]}


def test_constant_node_weights_are_counted_before_and_after():
    model, dead = real_builders.constant_weight_classifier()
    assert not model.graph.initializer
    result = slim(model, ArrayData({"x": _images(40, (12, 12))}), SlimConfig())
    assert {g.producer: set(g.kept) for g in result.groups} == {"conv1": {1, 4, 5, 6}, "conv2": {0, 2, 3}}
    assert result.params_before == (8 * 27 + 8) + (6 * 8 * 9 + 6) + (4 * 6 + 4)
    assert result.params_after == (4 * 27 + 4) + (3 * 4 * 9 + 3) + (4 * 3 + 4)
    assert result.flops_before == _conv_flops(8, 12, 12, 3, 3) + _conv_flops(6, 6, 6, 8, 3) + 2 * 4 * 6
    _assert_same_outputs(model, result.model, {"x": _images(3, (12, 12), seed=5)})


def test_inspect_counts_dynamic_sizes_only_at_a_stated_input_shape(tmp_path):
    model, _ = real_builders.dynamic_chain()
    onnx.save(model, tmp_path / "m.onnx")
    runner = CliRunner()
    given = runner.invoke(app, ["inspect", str(tmp_path / "m.onnx"), "--json", "--input-shape", "x=1,3,640,640"])
    assert given.exit_code == 0, given.output
    info = json.loads(given.output)
    assert info["flops"] == _conv_flops(8, 640, 640, 3, 3) + _conv_flops(6, 320, 320, 8, 3) + 2 * 4 * 6
    assert info["flops_input_shapes"] == {"x": [1, 3, 640, 640]}
    unstated = runner.invoke(app, ["inspect", str(tmp_path / "m.onnx")])
    assert unstated.exit_code == 0, unstated.output
    assert "--input-shape" in unstated.output and "FLOPs unknown" in unstated.output
    bad = runner.invoke(app, ["inspect", str(tmp_path / "m.onnx"), "--input-shape", "y=1,3,8,8"])
    assert bad.exit_code == 2 and bad.output.startswith("error:")
    np.save(tmp_path / "c.npy", _images(24, (12, 12)))
    slimmed = runner.invoke(app, ["slim", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "-q",
                                  "--report", str(tmp_path / "r.json"), "--input-shape", "x=1,3,640,640"])
    assert slimmed.exit_code == 0, slimmed.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flops_input_shapes"] == {"x": [1, 3, 640, 640]}
    assert report["flops_before"] == info["flops"]
    assert report["flops_after"] == _conv_flops(4, 640, 640, 3, 3) + _conv_flops(3, 320, 320, 4, 3) + 2 * 4 * 3


@pytest.mark.parametrize("through_identity", [False, True])
def test_a_weight_shared_by_two_convs_is_copied_before_either_is_cut(through_identity):
    model, dead = real_builders.shared_weight_pair(through_identity=through_identity)
    config = SlimConfig(simplify=False)  # keeps the Identity alias as the exporter wrote it
    result = slim(model, ArrayData({"x": _images(40, (8, 8))}), config)
    assert {g.producer: set(g.kept) for g in result.groups} == {"a": {4, 5, 6, 7}, "b": {0, 1, 2, 3}}
    _assert_same_outputs(model, result.model, {"x": _images(3, (8, 8), seed=9)})
    weights = {n.name: n.input[1] for n in result.model.graph.node if n.name in ("a", "b")}
    assert weights["a"] != weights["b"]


def test_dynamically_quantized_model_is_refused_with_its_ops():
    with pytest.raises(ThinetError, match=r"quantized \(ConvInteger, DynamicQuantizeLinear\)"):
        slim(real_builders.quantized_dynamic(), ArrayData({"x": _images(8, (8, 8))}), SlimConfig())


def test_quantized_model_is_refused_with_its_reason(tmp_path):
    with pytest.raises(ThinetError, match="quantized .*prune the float model first"):
        slim(real_builders.quantized_qdq(), ArrayData({"x": _images(8, (8, 8))}), SlimConfig())
    onnx.save(real_builders.quantized_qdq(), tmp_path / "q.onnx")
    np.save(tmp_path / "c.npy", _images(8, (8, 8)))
    runner = CliRunner()
    refused = runner.invoke(app, ["slim", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "c.npy")])
    assert refused.exit_code == 2
    assert refused.output.startswith("error: the model is quantized (DequantizeLinear, QuantizeLinear)")
    assert not (tmp_path / "q.slim.onnx").exists()
    shown = runner.invoke(app, ["inspect", str(tmp_path / "q.onnx"), "--json"])
    assert "prune the float model first" in json.loads(shown.output)["refusal"]


def test_state_cache_refusal_names_the_tensor_that_ties_the_channels():
    feeds = {"x": _images(8, (10,), channels=4), "state_in": _images(8, (2,), seed=1, channels=6)}
    with pytest.raises(ThinetError, match="interface.*graph input 'state_in'"):
        slim(real_builders.streaming_state_cache(), ArrayData(feeds), SlimConfig())


def _fails_at_other_sizes() -> onnx.ModelProto:
    """Runs only at 12×12 (a constant added at full size): canonicalization probes at 8×8 fail."""
    n = Net(0)
    h = n.node("Add", [n.conv("x", "conv1", 3, 8), n.weight("pos", (1, 1, 12, 12))], "pos_add")
    n.conv(n.node("Relu", [h], "relu"), "conv2", 8, 4)
    return n.model(["N", 3, "H", "W"], "conv2", ["N", 4, "H", "W"])


def test_canonicalization_probes_keep_onnxruntime_errors_off_the_screen(tmp_path):
    onnx.save(_fails_at_other_sizes(), tmp_path / "m.onnx")
    command = [sys.executable, "-m", "onnx_thinet.cli", "inspect", str(tmp_path / "m.onnx")]
    quiet = subprocess.run(command, capture_output=True, text=True, check=False)
    assert quiet.returncode == 0, quiet.stderr
    assert "[E:onnxruntime" not in quiet.stderr + quiet.stdout
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, text=True, check=False)
    assert "canonicalization" in verbose.stderr and "[E:onnxruntime" not in verbose.stderr


@pytest.mark.parametrize("reconstruct", ["full", "scale"])
def test_grouped_conv_reader_cuts_its_producer_by_whole_groups(reconstruct):
    model, dead = real_builders.grouped_block()
    config = SlimConfig(reconstruct=reconstruct, only=("conv1",))  # the grouped conv is a producer too
    result = slim(model, ArrayData({"x": _images(40, (8, 8))}), config)
    assert {g.producer: set(g.kept) for g in result.groups} == {"conv1": {0, 1, 4, 5}}  # groups 0 and 2
    assert (result.groups[0].channels_before, result.groups[0].channels_after) == (8, 4)
    grouped = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.name == "grouped")
    assert next(a.i for a in grouped.attribute if a.name == "group") == 2
    _assert_same_outputs(model, result.model, {"x": _images(3, (8, 8), seed=4)})
    assert result.flops_after < result.flops_before


def test_per_channel_transposed_conv_upsampling_is_carried_along():
    model, dead = real_builders.upsampling_decoder()
    result = slim(model, ArrayData({"x": _images(40, (8, 8))}), SlimConfig())
    _assert_kept_is_the_complement(result, dead)
    up = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert next(a.i for a in up.attribute if a.name == "group") == 4
    _assert_same_outputs(model, result.model, {"x": _images(3, (8, 8), seed=2)})


@pytest.mark.parametrize("start, prunable", [(2, True), (-2, True), (1, False), (0, False)])
def test_shape_with_start_reads_the_channel_count_only_when_its_range_covers_it(start, prunable):
    """Shape(start=...) (opset 15) whose entries leave the graph: safe only without the channels."""
    n = Net(0)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    n.conv(h, "conv2", 8, 4)
    n.nodes.append(helper.make_node("Shape", [h], ["dims"], name="dims", start=start))
    graph = helper.make_graph(n.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("conv2", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("dims", TensorProto.INT64, [None])], n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    analysis = analyze(canonicalize(model, simplify=False))
    assert ("conv1" in {g.producer for g in analysis.groups}) == prunable


@pytest.mark.parametrize("width", [8, 48])
def test_layers_whose_shapes_inference_cannot_derive_are_measured_by_running_the_model(tmp_path, width):
    """A Reshape target computed through float arithmetic defeats ONNX shape inference; the
    layers after it still get their FLOPs, from one onnxruntime run at the stated size (also
    when the weights are large enough that the counting copy carries their dims alone)."""
    n = Net(0)
    h = n.node("Relu", [n.conv("x", "conv1", 3, width)], "relu1")
    dims = n.node("Cast", [n.node("Shape", [h], "shape")], "dims_f", to=TensorProto.FLOAT)
    dims = n.node("Mul", [dims, n.const("one", np.array([1.0], np.float32))], "dims_x1")
    h = n.node("Reshape", [h, n.node("Cast", [dims], "dims_i", to=TensorProto.INT64)], "same_shape")
    n.conv(h, "conv2", width, 4)
    onnx.save(n.model(["N", 3, "H", "W"], "conv2", ["N", 4, "H", "W"]), tmp_path / "m.onnx")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.onnx"), "--json", "--no-simplify",
                                      "--input-shape", "x=1,3,16,20"])
    assert result.exit_code == 0, result.output
    flops = {layer["node"]: layer["flops"] for layer in json.loads(result.output)["layers"]}
    assert flops == {"conv1": _conv_flops(width, 16, 20, 3, 3), "conv2": _conv_flops(4, 16, 20, width, 3)}


@pytest.mark.parametrize("method", ["thinet", "l1"])
def test_grouped_conv_producer_loses_the_same_filters_in_every_group(method):
    model, dead = real_builders.grouped_producer()
    result = slim(model, ArrayData({"x": _images(40, (8, 8), channels=8)}), SlimConfig(method=method))
    group = result.groups[0]
    assert (group.producer, group.channels_before, group.channels_after) == ("G", 8, 4)
    if method == "thinet":
        assert set(group.kept) == {0, 3, 4, 7}
        _assert_same_outputs(model, result.model, {"x": _images(3, (8, 8), seed=6, channels=8)})
    conv = next(n for n in result.model.graph.node if n.name == "G")
    assert next(a.i for a in conv.attribute if a.name == "group") == 2
    assert initializer_array(result.model, conv.input[1]).shape == (4, 4, 3, 3)


@pytest.mark.parametrize("simplify", [True, False])
def test_weights_also_listed_as_graph_inputs_are_cut_and_listed_again(simplify):
    """Older PyTorch exports (keep_initializers_as_inputs) declare every weight as an input."""
    from tests import builders

    model, dead = builders.conv_chain()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    result = slim(model, ArrayData({"x": builders.calibration(model, 40)}), SlimConfig(simplify=simplify))
    assert {g.producer: set(range(g.channels_before)) - set(g.kept) for g in result.groups} == \
        {p: set(d) for p, d in dead.items()}
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert declared["conv2.w"] == [3, 4, 3, 3]
    _assert_same_outputs(model, result.model, {"x": builders.calibration(model, 3, seed=8)})
