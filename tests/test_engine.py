"""The calibration engine: fixed-batch models, stored activations, memory refusal, progress, device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_thinet import SlimConfig, slim
from onnx_thinet.calibration.store import ActivationStore
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.data import ArrayData
from onnx_thinet.solve.moments import FitMoments, FitSamples
from onnx_thinet.solve.solvers import choose_ridge, refit_least_squares
from tests import builders

ROOT = Path(__file__).resolve().parent.parent


def _fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as an exporter writes it for batch 1: fixed input/output batch and a Reshape
    whose constant spells the batch out."""
    fixed = onnx.ModelProto.FromString(model.SerializeToString())
    graph = fixed.graph
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    out = graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(dims, np.int64), "fixed.shape"))
    old = out.name
    for node in graph.node:
        node.output[:] = [o + ".raw" if o == old else o for o in node.output]
    graph.node.append(helper.make_node("Reshape", [old + ".raw", "fixed.shape"], [old], name="fixed.reshape"))
    onnx.checker.check_model(fixed, full_check=True)
    return fixed


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("family", ["conv_chain", "pool_flatten_gemm"])
def test_a_fixed_batch_model_calibrates_and_keeps_its_planted_channels(family):
    model, dead = builders.FAMILIES[family]()
    fixed = _fixed_batch(model)
    calib = builders.calibration(model, n=37)  # not a multiple of anything
    result = slim(fixed, ArrayData({"x": calib}), SlimConfig(keep_ratio=0.5, only=tuple(dead)))
    by_producer = {g.producer: g for g in result.groups}
    for producer, channels in dead.items():
        assert set(by_producer[producer].kept).isdisjoint(channels)
    x = builders.calibration(model, n=5, seed=3)
    reference, slimmed = _run(fixed, x), _run(result.model, x)
    assert np.abs(reference - slimmed).max() < 1e-4 * max(np.abs(reference).max(), 1.0)
    assert result.verification.rel_error < 1e-4


def test_the_activation_store_copies_borrowed_outputs_it_keeps_in_memory():
    """Segment outputs live in their session's onnxruntime arena: kept as they are, they would
    keep the whole arena alive after the session is gone."""
    output = np.arange(12, dtype=np.float32).reshape(3, 4)
    store = ActivationStore(1, ram_budget=1 << 30)
    store.put("borrowed", 0, output, borrowed=True)
    store.put("owned", 0, output)
    output[:] = -1.0
    np.testing.assert_array_equal(store.get("borrowed", 0), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.shares_memory(store.get("owned", 0), output)


def test_the_activation_store_reads_back_from_disk_with_deleted_positions(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 5, 4)).astype(np.float32) for _ in range(2)]
    memory, disk = ActivationStore(2, ram_budget=1 << 30), ActivationStore(2, ram_budget=0)
    try:
        for store in (memory, disk):
            for batch, array in enumerate(arrays):
                store.put("t", batch, array)
            store.delete_positions("t", 1, np.array([0, 3]))
            store.delete_positions("t", -1, np.array([2]))
            assert "t" in store and store.axis_length("t", 1) == 3 and store.axis_length("t", 2) == 3
            for batch, array in enumerate(arrays):
                expected = np.delete(np.delete(array, [0, 3], axis=1), [2], axis=2)
                np.testing.assert_array_equal(store.get("t", batch), expected)
        assert disk.disk_bytes > 0 and disk.ram_bytes == 0 and memory.disk_bytes == 0
        disk.drop("t")
        assert "t" not in disk and disk.disk_bytes == 0
    finally:
        memory.close()
        disk.close()


def test_a_lower_memory_budget_moves_the_earliest_stored_arrays_to_disk():
    """A pass with large statistics shrinks the stores' share: arrays over it go to disk, the
    earliest stored first, and read back the same (deleted positions still applied)."""
    rng = np.random.default_rng(1)
    first = [rng.standard_normal((2, 6, 3)).astype(np.float32) for _ in range(2)]
    second = [rng.standard_normal((2, 6, 3)).astype(np.float32) for _ in range(2)]
    size = first[0].nbytes
    store = ActivationStore(2, ram_budget=4 * size)
    try:
        for batch in range(2):
            store.put("first", batch, first[batch])
            store.put("second", batch, second[batch])
        store.delete_positions("first", 1, np.array([4]))
        assert store.disk_bytes == 0 and store.ram_bytes == 4 * size
        store.limit_ram(2 * size)
        assert store.ram_bytes == 2 * size and store.disk_bytes == 2 * size
        assert np.shares_memory(store.get("second", 1), second[1])  # the later one stays
        store.limit_ram(0)
        assert store.ram_bytes == 0 and store.disk_bytes == 4 * size
        for batch in range(2):
            np.testing.assert_array_equal(store.get("first", batch), np.delete(first[batch], [4], axis=1))
            np.testing.assert_array_equal(store.get("second", batch), second[batch])
        store.put("third", 0, first[0])  # the new budget holds for what comes next
        assert store.ram_bytes == 0
    finally:
        store.close()


def test_a_pass_with_small_statistics_keeps_more_activations_in_memory():
    """The plan sizes stored activations for its largest layer; a pass with smaller statistics
    gets the room those would have taken (half of it, as the plan does), up to the cap."""
    from onnx_thinet.calibration.plan import STORE_CAP, plan_memory
    from onnx_thinet.channels.analysis import analyze

    model, _ = builders.FAMILIES["pool_flatten_gemm"]()
    groups = analyze(model).groups
    weights = 4 * sum(t.ByteSize() for t in model.graph.initializer)
    plan = plan_memory(model, groups, images=64, batch_size=8, budget=weights + (40 << 20))
    assert plan.store_ram == plan.store_ram_for(plan.statistics)
    assert plan.statistics > 0 and plan.store_ram < STORE_CAP
    assert abs(plan.store_ram_for(0) - min(plan.store_ram + plan.statistics // 2, STORE_CAP)) <= 1
    assert plan.store_ram_for(plan.budget) == 0


@pytest.mark.parametrize("declared", [[None, 2, 4, 4], [None, 5, 3, 3], None])
def test_segment_outputs_are_onnxruntimes_whatever_shape_inference_declared(declared):
    """Outputs go straight into arrays of the declared (or last batch's) shape; a shape that
    lies falls back to onnxruntime's own outputs, never to wrong values."""
    from onnx_thinet.calibration.segments import Batching, SegmentRunner

    x = np.random.default_rng(2).standard_normal((7, 2, 4, 4)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    if declared is not None:
        graph.value_info.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, declared))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    store = ActivationStore(3, ram_budget=1 << 30)
    runner = SegmentRunner(ArrayData({"x": x}), Batching(np.arange(7), 3), store, "cpu", {})
    try:
        runner.ensure(model, ["r"])
        for batch in range(3):
            np.testing.assert_array_equal(runner.get("r", batch), np.maximum(x[3 * batch : 3 * batch + 3], 0))
    finally:
        store.close()


def test_the_original_networks_runner_indexes_it_once(monkeypatch):
    """A runner told that its model never changes indexes it once for every ensure and prune,
    and indexes another model object afresh; the values are the model's either way."""
    from onnx_thinet.calibration import segments

    built = []
    index = segments.NodeIndex.__init__
    monkeypatch.setattr(segments.NodeIndex, "__init__", lambda self, m: built.append(m) or index(self, m))
    x = np.random.default_rng(3).standard_normal((5, 2, 3, 3)).astype(np.float32)

    def chain(last: str):
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(last, ["r"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 2, 3, 3])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  value_info=[helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    store = ActivationStore(2, ram_budget=1 << 30)
    runner = segments.SegmentRunner(ArrayData({"x": x}), segments.Batching(np.arange(5), 3), store, "cpu", {},
                                    fixed_model=True)
    try:
        model = chain("Neg")
        runner.ensure(model, ["r"])
        runner.ensure(model, ["y"])
        runner.prune(model)
        assert len(built) == 1
        np.testing.assert_array_equal(runner.get("y", 1), -np.maximum(x[3:], 0))
        store.clear()
        runner.ensure(chain("Sigmoid"), ["y"])
        assert len(built) == 2
        np.testing.assert_allclose(runner.get("y", 0), 1 / (1 + np.exp(-np.maximum(x[:3], 0))), rtol=1e-6)
    finally:
        store.close()


def test_kept_rows_give_the_moment_solution_when_rows_are_fewer_than_inputs():
    """A wide layer keeps its rows (n × dims), not a dims² matrix: same refit, same ridge."""
    rng = np.random.default_rng(4)
    dims, outputs, rows = 60, 7, 24
    prior = rng.standard_normal((dims, outputs))
    folds_m = (FitMoments(dims, outputs), FitMoments(dims, outputs))
    folds_s = (FitSamples(dims, outputs), FitSamples(dims, outputs))
    for k in range(2):
        p = rng.standard_normal((rows // 2, dims))
        t = p @ (prior + 0.3 * rng.standard_normal((dims, outputs))) + 0.5 + 0.1 * rng.standard_normal((rows // 2, outputs))
        folds_m[k].add(p, t)
        folds_s[k].add(p, t)
    columns = np.arange(0, dims, 2)
    ridge = choose_ridge(folds_m, columns, prior=prior)
    assert choose_ridge(folds_s, columns, prior=prior) == ridge
    for value in (ridge, 0.1):
        w_m, b_m = refit_least_squares(folds_m[0] + folds_m[1], columns, ridge=value, prior=prior)
        w_s, b_s = refit_least_squares(folds_s[0] + folds_s[1], columns, ridge=value, prior=prior)
        np.testing.assert_allclose(w_s, w_m, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(b_s, b_m, rtol=1e-6, atol=1e-8)


def test_a_budget_below_one_image_is_refused_before_any_work():
    model, _ = builders.conv_chain()
    data = ArrayData({"x": builders.calibration(model, n=16)})
    with pytest.raises(ThinetError, match="max_memory"):
        slim(model, data, SlimConfig(max_memory=10_000))


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    model, _ = builders.conv_chain()
    onnx.save(model, tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", builders.calibration(model, n=24))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("ONNX_THINET_PROGRESS", None)
    command = [sys.executable, "-m", "onnx_thinet.cli", "slim", str(tmp_path / "net.onnx"),
               "--calib", str(tmp_path / "calib.npy"), "--output", str(tmp_path / "out.onnx"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_without_a_terminal_progress_is_one_line_per_pass_and_quiet_silences_it(tmp_path):
    done = _cli(tmp_path, "--report", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    passes = json.loads((tmp_path / "r.json").read_text())["forward_passes"]
    lines = [line for line in done.stderr.splitlines() if line.startswith("pass ")]
    assert len(lines) == passes >= 2
    assert lines[0].startswith(f"pass 1/{passes}: conv1 (elapsed ") and "ETA" in lines[0]
    quiet = _cli(tmp_path, "--quiet", "--force")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_max_memory_too_small_is_one_error_line_and_no_output(tmp_path):
    done = _cli(tmp_path, "--max-memory", "20K")
    assert done.returncode == 2
    assert done.stderr.startswith("error: --max-memory") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
    assert _cli(tmp_path, "--max-memory", "lots").stderr.startswith("error: --max-memory: cannot read")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="checks the fallback of an onnxruntime without CUDA")
def test_device_cuda_without_a_cuda_onnxruntime_warns_once_and_runs_on_the_cpu(tmp_path):
    done = _cli(tmp_path, "--device", "cuda", "--quiet", "--report", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "CUDA" in line]
    assert len(warnings) == 1 and "running on the CPU" in warnings[0]
    assert json.loads((tmp_path / "r.json").read_text())["providers"] == ["CPUExecutionProvider"]


def _segment_layers(monkeypatch) -> list[tuple[int, list[str]]]:
    """Records, for every segment the engine builds, the model it is cut from (by id) and the
    Conv, Gemm and MatMul nodes it runs."""
    from onnx_thinet.calibration import segments

    segments_built: list[tuple[int, list[str]]] = []
    build = segments._segment_model

    def recorded(model, nodes, inputs, outputs):
        layers = [n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
        segments_built.append((id(model), layers))
        return build(model, nodes, inputs, outputs)

    monkeypatch.setattr(segments, "_segment_model", recorded)
    return segments_built


def test_each_conv_of_a_unet_runs_once_in_each_network(tmp_path, monkeypatch):
    """A U-Net's skip Concat is read by a decoder conv that a later pass refits: the encoder's
    pass reads it on the skip tensor alone, so neither network runs the decoder below it early,
    and the reference keeps the encoder tensors later passes read instead of recomputing them."""
    import importlib.util
    from pathlib import Path


    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.unet_fixed_batch(size=16, depth=3, levels=2, base=4)
    built = _segment_layers(monkeypatch)
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    result = slim(model, ArrayData({"image": x}), SlimConfig(keep_ratio=0.5))
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    # reading the whole Concat at the skip's pass ran the rest of the network there: 55 runs
    sizes = [len(layers) for _, layers in built]
    assert sum(sizes) <= 2 * convs, sizes
    assert result.verification.rel_error < 1.0


def test_a_concat_reader_that_a_later_pass_refits_is_read_on_the_cut_input_alone(monkeypatch):
    """Two producers feed one Concat, cut in two passes. The first pass reads the Concat's reader
    on the first producer's tensor alone (the matching columns of its weight) and rescales it;
    the second reads the whole Concat and refits it. So neither network runs the second
    producer before its own pass, each Conv runs once per network, and the planted channels
    are found with the outputs unchanged."""
    built = _segment_layers(monkeypatch)
    model, dead = builders.concat_two_producers(seed=3)
    result = slim(model, ArrayData({"x": builders.calibration(model, n=48)}), SlimConfig(keep_ratio=0.5))
    runs = [layers for _, layers in built]
    assert runs[:2] == [["a"], ["a"]], runs  # the pruned copy, then the original
    convs = [name for run in runs for name in run]
    assert all(convs.count(name) <= 2 for name in convs), runs
    for group in result.groups:
        assert set(group.kept).isdisjoint(dead[group.producer])
    assert result.verification.rel_error < 1e-4


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_each_layer_runs_once_per_network_in_every_family(family, monkeypatch):
    """Over a whole run each Conv, Gemm and MatMul runs once in the original network and once in
    the pruned copy, whatever Concats, Splits and skips lie between them (a YOLO C2f's first
    conv is read through both halves of its Split). Every group is cut, so that the readers
    of Concats are narrowed; the planted channels are the other tests' business."""
    from collections import Counter

    built = _segment_layers(monkeypatch)
    model, _ = builders.FAMILIES[family]()
    name = model.graph.input[0].name
    result = slim(model, ArrayData({name: builders.calibration(model, n=24)}), SlimConfig(keep_ratio=0.5))
    runs: dict[int, Counter] = {}
    for model_id, layers in built:
        runs.setdefault(model_id, Counter()).update(layers)
    assert len(runs) == 2 and all(max(counts.values()) == 1 for counts in runs.values()), runs
    assert result.groups and all(g.channels_after < g.channels_before for g in result.groups)


# pads on both sides, strides with dilations, and onnxruntime's own SAME padding
_CONV_WINDOW_ATTRS = [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 2, 1, 0], "strides": [2, 1], "dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
]


def _sampled_conv(attrs, per_image: int, seed: int, bias: bool = False):
    """A 5→4 channel 3x2 Conv on 3 images of 7x9, its geometry and sampled windows."""
    from onnx_thinet.calibration.windows import conv_geometry, conv_positions

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    w = rng.standard_normal((4, 5, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["y"], kernel_shape=[3, 2], **attrs)
    geometry = conv_geometry(node, x.shape, w.shape)
    return x, w, node, geometry, conv_positions(3, 4, geometry, per_image, rng)


# one window per image is gathered element by element, more pixel by pixel
@pytest.mark.parametrize("per_image", [1, 3, 200])
@pytest.mark.parametrize("attrs", _CONV_WINDOW_ATTRS)
def test_conv_windows_match_a_padded_copy(attrs, per_image):
    """`conv_patches` (no padded copy, a channel subset) against slicing a zero-padded input."""
    from onnx_thinet.calibration.windows import conv_geometry, conv_patches, conv_positions

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 2], **attrs)
    geometry = conv_geometry(node, x.shape, (4, 5, 3, 2))
    at = conv_positions(3, 4, geometry, per_image, rng)
    channels = np.array([0, 2, 3])
    got = conv_patches(x, (4, 3, 3, 2), geometry, at, channels=channels)
    (dh, dw), (ph, pw) = geometry.dilations, geometry.pads_begin
    padded = np.pad(x[:, channels], ((0, 0), (0, 0), (ph, 8), (pw, 8)))
    for s in range(len(at.row)):
        top, left = at.top[s] + ph, at.left[s] + pw
        want = padded[at.row[s], :, top : top + 3 * dh : dh, left : left + 2 * dw : dw]
        np.testing.assert_array_equal(got[s], want)
    np.testing.assert_array_equal(conv_patches(x, (4, 5, 3, 2), geometry, at)[:, channels], got)


@pytest.mark.parametrize("per_image", [1, 200])  # windows gathered element by element, and as whole pixels
@pytest.mark.parametrize("attrs", _CONV_WINDOW_ATTRS)
def test_each_channels_contribution_is_its_window_times_the_sampled_filter(attrs, per_image):
    """Selection's per-channel contributions, from either gather, are each channel's window
    times the sampled filter's weights there."""
    from onnx_thinet.calibration.windows import conv_contributions, conv_patches

    x, w, _, geometry, at = _sampled_conv(attrs, per_image, seed=8)
    windows = conv_patches(x, w.shape, geometry, at).astype(np.float64)
    want = np.einsum("sckl,sckl->sc", windows, w[at.unit].astype(np.float64))
    np.testing.assert_allclose(conv_contributions(x, w, geometry, at), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", _CONV_WINDOW_ATTRS)
def test_a_conv_output_read_at_sampled_windows_is_the_sum_of_their_contributions(attrs):
    """The reference's targets come from onnxruntime's Conv output at the sampled places: they
    must be what the windows and the weight give there (bias included)."""
    from onnx_thinet.calibration.windows import (
        conv_contributions,
        conv_output_rows,
        conv_output_samples,
        conv_patches,
    )

    x, w, node, geometry, at = _sampled_conv(attrs, 20, seed=7, bias=True)
    b = np.random.default_rng(17).standard_normal(4).astype(np.float32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sums = conv_contributions(x, w, geometry, at).sum(axis=1) + b[at.unit]
    np.testing.assert_allclose(conv_output_samples(y, geometry, at, at.unit), sums, rtol=1e-5, atol=1e-5)
    filters = np.array([3, 0, 2])
    rows = conv_patches(x, w.shape, geometry, at).reshape(len(at.row), -1) @ w[filters].reshape(3, -1).T + b[filters]
    np.testing.assert_allclose(conv_output_rows(y, geometry, at, filters), rows, rtol=1e-5, atol=1e-5)
    assert conv_output_samples(y[:, :, :-1], geometry, at, at.unit) is None  # not this conv's output


def test_a_refit_after_an_earlier_cut_of_its_input_shrinks_toward_its_own_kept_weights():
    """Two producers feed one Concat, cut in two passes: when the second pass refits the reader,
    its input has already lost the first group's channels. With a huge ridge the refit is its
    prior, which must be the reader's weight on the channels it still reads (not the original
    weight's first columns)."""
    model, _ = builders.concat_two_producers(seed=3)
    x = builders.calibration(model, n=32)
    result = slim(model, ArrayData({"x": x}), SlimConfig(keep_ratio=0.5, ridge=1e9))
    kept = {g.producer: list(g.kept) for g in result.groups}
    assert len(result.groups) == 2 and all(len(k) < c for k, c in zip(kept.values(), (6, 4)))
    columns = kept["a"] + [6 + k for k in kept["b"]]
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "head.w"))
    head = next(n for n in result.model.graph.node if n.name == "head")
    refit = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == head.input[1]))
    np.testing.assert_allclose(refit, original[:, columns], rtol=1e-4, atol=1e-5)


_NUMPY_SPY = (
    "import os, sys\n"
    "class Spy:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'numpy' and 'seen' not in globals():\n"
    "            globals()['seen'] = os.environ.get('OPENBLAS_THREAD_TIMEOUT')\n"
    "sys.meta_path.insert(0, Spy())\n"
    "import onnx_thinet\n"
    "print(seen)\n"
)


@pytest.mark.parametrize("chosen", [None, "12"])
def test_openblas_threads_do_not_spin_by_the_time_numpy_loads_unless_the_user_chose(chosen):
    """OpenBLAS reads its thread timeout once, when numpy loads it: importing the package sets
    it first (idle BLAS workers would spin on the cores onnxruntime runs on next), and leaves a
    value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if chosen:
        env["OPENBLAS_THREAD_TIMEOUT"] = chosen
    done = subprocess.run([sys.executable, "-c", _NUMPY_SPY], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == [chosen or "4"]


@pytest.mark.parametrize("odd", [[0, 0, 0, 1, 1], [1, 1, 0, 0, 0], [0, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
def test_refit_rows_reach_the_fold_of_their_image_whether_grouped_or_not(odd):
    """Rows grouped by fold go to their folds as slices, interleaved rows as masks: same moments."""
    from onnx_thinet.calibration.refit import RefitStats

    rng = np.random.default_rng(9)
    inputs, targets = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    odd = np.array(odd, dtype=bool)
    stats = RefitStats(3, 2, 3, np.zeros((3, 2)))
    stats.add(inputs, targets, odd)
    for fold, rows in zip(stats.folds, (~odd, odd)):
        assert fold.count == rows.sum()
        np.testing.assert_allclose(fold.gram, inputs[rows].T @ inputs[rows])
        np.testing.assert_allclose(fold.cross, inputs[rows].T @ targets[rows])
