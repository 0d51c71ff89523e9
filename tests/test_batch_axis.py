"""Which segments of a fixed-batch model run whole calibration batches (`runs_per_sample`),
and that running them whole gives the same slim model as running them one image at a time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet import SlimConfig, slim
from onnx_thinet.calibration import segments
from onnx_thinet.calibration.batch_axis import runs_per_sample
from onnx_thinet.io.data import ArrayData


def _model(nodes, inits=(), rank: int = 4) -> onnx.ModelProto:
    """A graph over x [1, 4, 8, 8] whose last node writes y; shapes inferred (ranks known)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in inits])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


W = ("w", np.ones((4, 4, 3, 3), np.float32))


@pytest.mark.parametrize("nodes, inits, expected", [
    ([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4), helper.make_node("Relu", ["c"], ["r"]),
      helper.make_node("Concat", ["r", "x"], ["y"], axis=1)], [W], True),
    ([helper.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest")],
     [("s", np.array([1, 1, 2, 2], np.float32))], True),
    ([helper.make_node("Add", ["x", "b"], ["y"])], [("b", np.ones((1, 4, 1, 1), np.float32))], True),
    ([helper.make_node("Add", ["x", "b"], ["y"])], [("b", np.ones((4, 1, 1), np.float32))], True),
    # each of these reads or writes the batch: they run one model batch at a time
    ([helper.make_node("Concat", ["x", "x"], ["y"], axis=0)], [], False),
    ([helper.make_node("Reshape", ["x", "shape"], ["y"])], [("shape", np.array([1, -1], np.int64))], False),
    ([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest")],
     [("sizes", np.array([1, 4, 16, 16], np.int64))], False),
    ([helper.make_node("Add", ["x", "b"], ["y"])], [("b", np.ones((2, 4, 8, 8), np.float32))], False),
    ([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])], [], False),
    ([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)],
     [(n, np.ones(4, np.float32)) for n in "sbmv"], False),
])
def test_ops_that_never_read_the_batch_run_whole_batches(nodes, inits, expected):
    model = _model(nodes, inits)
    assert runs_per_sample(list(model.graph.node), model) is expected


def _unet():
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.unet_fixed_batch(size=16, depth=2, levels=2, base=4)


def test_a_batch_1_unet_runs_whole_batches_and_slims_as_if_one_image_at_a_time(monkeypatch):
    model = _unet()
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(np.float32)
    fed: list[int] = []
    run = ort.InferenceSession.run

    def counted(self, outputs, feeds, *args, **kwargs):
        fed.append(len(next(iter(feeds.values()))))
        return run(self, outputs, feeds, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    run_once = segments._run_once

    def counted_once(session, outputs, feeds, shapes, rows):  # outputs written into our arrays
        fed.append(rows)
        return run_once(session, outputs, feeds, shapes, rows)

    monkeypatch.setattr(segments, "_run_once", counted_once)
    whole = slim(model, ArrayData({"image": x}), SlimConfig(keep_ratio=0.5, batch_size=4))
    assert max(fed) == 4 and 1 in fed  # batches of 4 and the last of 3; the head's Reshape: 1 image
    fed.clear()
    monkeypatch.setattr(segments, "runs_per_sample", lambda nodes, model: False)
    pieces = slim(model, ArrayData({"image": x}), SlimConfig(keep_ratio=0.5, batch_size=4))
    assert set(fed) == {1}
    assert [g.kept for g in whole.groups] == [g.kept for g in pieces.groups]
    a = {t.name: numpy_helper.to_array(t) for t in whole.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in pieces.model.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5 * max(1.0, np.abs(b[name]).max()))
    dims = [d.dim_value for d in whole.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 1  # the slim model keeps its fixed batch
