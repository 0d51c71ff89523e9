"""The io layer on its own: checked loads, atomic saves, external data, opset, inputs, feeds.

Each function is tested through its public name on tiny models built in code; the
failure cases assert that nothing is left behind and nothing is changed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet.check.measure import ErrorSums, max_relative_error, relative_error
from onnx_thinet.errors import ThinetError
from onnx_thinet.io import graph as io_graph
from onnx_thinet.io.canonical import canonicalize_steps
from onnx_thinet.io.data import read_npz
from onnx_thinet.io.feeds import SYMBOLIC_DIM, dummy_feeds, dummy_shape
from onnx_thinet.io.files import atomic_write
from onnx_thinet.io.graph import (
    DEFAULT_OPSET,
    graph_inputs,
    load_model,
    opset_version,
    save_model_atomic,
)
from tests import builders


def _scaled(dims=("N", 3, 4, 4), opsets=(("", 17),)) -> onnx.ModelProto:
    """y = x * w, with w an initializer that an old exporter also lists as a graph input."""
    w = numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims)),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 3, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))], [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old contents")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half a mod")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.onnx", half_then_fail)
    assert not (tmp_path / "new.onnx").exists() and _leftovers(tmp_path) == []


def test_a_failed_save_leaves_what_was_there(tmp_path):
    (tmp_path / "m.onnx").mkdir()  # the rename onto a directory fails after the bytes are written
    (tmp_path / "m.onnx" / "keep").write_text("x")
    with pytest.raises(OSError):
        save_model_atomic(_scaled(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx" / "keep").read_text() == "x" and _leftovers(tmp_path) == []


def test_save_then_load_round_trips_and_leaves_no_temp_files(tmp_path):
    model = _scaled()
    size = save_model_atomic(model, tmp_path / "sub" / "m.onnx")
    assert size == (tmp_path / "sub" / "m.onnx").stat().st_size
    back = load_model(tmp_path / "sub" / "m.onnx")
    assert back.SerializeToString() == model.SerializeToString()
    assert _leftovers(tmp_path / "sub") == []


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    model, _ = builders.conv_chain()
    monkeypatch.setattr(io_graph, "_EXTERNAL_DATA_THRESHOLD", 1000)  # as if over 2 GB
    before = model.SerializeToString()
    size = save_model_atomic(model, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and size == (tmp_path / "big.onnx").stat().st_size + data.stat().st_size
    assert model.SerializeToString() == before  # the argument is not modified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    raw = onnx.load(tmp_path / "big.onnx", load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    back = load_model(tmp_path / "big.onnx")
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_load_refuses_what_the_checker_refuses(tmp_path):
    model = _scaled()
    model.graph.node[0].op_type = "NoSuchOp"  # no schema (a tensor nothing produces: test_hostile.py)
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ThinetError, match="checker rejects"):
        load_model(tmp_path / "bad.onnx")
    with pytest.raises(ThinetError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ThinetError, match="is a directory"):
        load_model(tmp_path)


def test_load_checks_large_weights_without_handing_their_bytes_to_the_checker(tmp_path):
    """The checker sees large weights as empty files; one with two value fields is still refused,
    as the checker itself refuses it, and the loaded weights are the file's."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 512, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 2, 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "ok.onnx")
    loaded = load_model(tmp_path / "ok.onnx")
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), numpy_helper.to_array(weight))
    model.graph.initializer[0].float_data.extend([1.0] * 4)  # raw_data and float_data both set
    onnx.save(model, tmp_path / "two.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="one and only one value field"):
        onnx.checker.check_model(str(tmp_path / "two.onnx"))
    with pytest.raises(ThinetError, match="checker rejects.*one and only one value field"):
        load_model(tmp_path / "two.onnx")


def test_opset_reader_has_one_default():
    assert opset_version(_scaled(opsets=(("", 11),))) == 11
    assert opset_version(_scaled(opsets=(("ai.onnx", 13), ("com.microsoft", 1)))) == 13
    assert opset_version(_scaled(opsets=(("com.microsoft", 1),))) == DEFAULT_OPSET == 1


def test_graph_inputs_are_the_fed_ones_not_initializers():
    assert [i.name for i in graph_inputs(_scaled())] == ["x"]


def test_dummy_feeds_follow_one_rule_for_symbolic_dims():
    model = _scaled(dims=("N", 3, "H", 5))
    feeds = dummy_feeds(model, batch=2, seed=0)
    assert list(feeds) == ["x"]
    assert feeds["x"].shape == (2, 3, SYMBOLIC_DIM, 5) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], dummy_feeds(model, batch=2, seed=0)["x"])
    unknown = _scaled(dims=(None, 3, None, 5))
    assert dummy_shape(graph_inputs(unknown)[0], batch=3) == (3, 3, SYMBOLIC_DIM, 5)
    static = _scaled(dims=(4, 3, 8, 8))
    assert dummy_feeds(static, batch=2)["x"].shape == (4, 3, 8, 8)


def test_dummy_feeds_for_integer_and_shapeless_inputs():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["y"], name="id")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 7])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 7])],
    )
    ids = dummy_feeds(helper.make_model(graph), batch=3)["ids"]
    assert ids.shape == (3, 7) and ids.dtype == np.int64 and set(np.unique(ids)) <= {0, 1}
    graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ThinetError, match="'ids' has no shape"):
        dummy_feeds(helper.make_model(graph))


def test_npz_reader_names_missing_arrays_and_refuses_pickles(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    assert list(read_npz(tmp_path / "a.npz", required=("x",))) == ["x"]
    with pytest.raises(ThinetError, match="no array 'y'"):
        read_npz(tmp_path / "a.npz", required=("x", "y"))
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ThinetError, match="p.npz"):
        read_npz(tmp_path / "p.npz")


def test_relative_error_definitions():
    ref = np.array([3.0, 4.0])
    assert relative_error(ref, ref + [0.0, 0.5]) == pytest.approx(0.5 / 5.0)
    assert max_relative_error(ref, ref + [0.0, 0.5]) == pytest.approx(0.5 / 4.0)
    assert relative_error(ref, np.zeros(3)) == math.inf
    sums = ErrorSums()
    sums.add(np.array([3.0]), np.array([3.0]))
    sums.add(np.array([4.0]), np.array([4.5]))  # streamed in batches: same as all at once
    assert sums.rel_error == pytest.approx(0.1) and sums.mean_abs_error == pytest.approx(0.25)


def test_canonicalization_reports_every_optional_step():
    model, _ = builders.conv_bn_relu()
    _, off = canonicalize_steps(model, simplify=False)
    assert [(s.step, s.applied, s.reason) for s in off] == [
        ("onnxsim", False, "simplify=False"), ("onnxruntime", False, "simplify=False")]
    before = model.SerializeToString()
    _, steps = canonicalize_steps(model)
    assert model.SerializeToString() == before
    assert [s.step for s in steps] == ["onnxsim", "onnxruntime"]
    assert all(s.applied == (s.reason is None) for s in steps)


def test_a_step_that_changes_the_outputs_is_skipped_and_the_other_kept(monkeypatch):
    """The steps are checked together first; when their result differs, each on its own."""
    from onnx_thinet.io import canonical

    model, _ = builders.conv_bn_relu()
    simplify = canonical._simplify_onnxsim

    def doubling(m):  # a simplifier that gets a weight wrong
        out = simplify(m)
        t = next(t for t in out.graph.initializer if len(t.dims) == 4)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
        return out

    monkeypatch.setattr(canonical, "_simplify_onnxsim", doubling)
    canonical, steps = canonicalize_steps(model)
    assert [(s.step, s.applied, s.reason) for s in steps] == [
        ("onnxsim", False, "changed the outputs"), ("onnxruntime", True, None)]
    import onnxruntime as ort

    x = builders.calibration(model, n=4)
    feed = model.graph.input[0].name
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {feed: x})[0]
           for m in (model, canonical)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-4, atol=1e-5)


def test_a_skipped_step_is_in_the_slim_report_with_its_reason():
    """float16 on CPU: onnxruntime's optimizer wraps kernels in Casts, a step slim refuses."""
    from onnx_thinet import SlimConfig, slim
    from onnx_thinet.io.data import ArrayData

    model, dead = builders.conv_bn_relu()
    half = onnx.ModelProto.FromString(model.SerializeToString())
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for value in list(half.graph.input) + list(half.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = builders.calibration(model, n=16).astype(np.float16)
    report = slim(half, ArrayData({"x": x}), SlimConfig(only=tuple(dead))).report()
    steps = {s["step"]: s for s in report["canonicalization"]}
    assert steps["onnxsim"]["applied"] and steps["onnxsim"]["reason"] is None
    assert not steps["onnxruntime"]["applied"]
    assert "precision Casts" in steps["onnxruntime"]["reason"]


def test_simplifier_sees_large_layer_weights_as_inputs_and_gives_them_back():
    """onnx-simplifier gets the large Conv weight as a graph input (it copies what it is given
    many times over); the canonical model has it back as an initializer, interface unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_thinet.io.canonical import canonicalize_steps

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 512, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["y", "target"], ["z"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1024])],
        [weight, numpy_helper.from_array(np.array(0, np.int64), "zero"),
         numpy_helper.from_array(np.array([0], np.int64), "zero1"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    canonical, steps = canonicalize_steps(model)
    assert steps[0].step == "onnxsim" and steps[0].applied, steps
    assert [v.name for v in canonical.graph.input] == ["x"]
    kept = {t.name: t for t in canonical.graph.initializer}
    assert np.array_equal(numpy_helper.to_array(kept["w"]), numpy_helper.to_array(weight))
    assert "Shape" not in {n.op_type for n in canonical.graph.node}  # the simplifier folded it
    x = rng.standard_normal((2, 512, 4, 4)).astype(np.float32)
    import onnxruntime as ort

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    np.testing.assert_allclose(run(canonical), run(model), rtol=1e-5, atol=1e-4)


def _two_large_convs(rng):
    """x → Conv(w1) → Mul(per-channel) → Relu → Conv(w2) → Relu → Identity, both weights ≥ 1 MB."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(rng.standard_normal((64, 512, 3, 3)).astype(np.float32) * 0.02, "w1"),
             numpy_helper.from_array(rng.uniform(0.5, 2, (1, 64, 1, 1)).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal((512, 64, 3, 3)).astype(np.float32) * 0.05, "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "scale"], ["b"], name="mul"),
        helper.make_node("Relu", ["b"], ["c"], name="relu1"),
        helper.make_node("Conv", ["c", "w2"], ["d"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["e"], name="relu2"),
        helper.make_node("Identity", ["e"], ["y"], name="alias"),
    ]
    graph = helper.make_graph(nodes, "two-convs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_weights_an_optimizer_may_fold_into_are_not_lifted():
    """A Conv whose output a Mul scales keeps its weight for the optimizer; the other is lifted."""
    from onnx_thinet.io.lifting import layer_weights

    model = _two_large_convs(np.random.default_rng(0))
    assert layer_weights(model) == {"w1", "w2"}
    assert layer_weights(model, unless_read_by={"Conv": ["Mul"]}) == {"w2"}
    assert layer_weights(model, unless_read_by={"Gemm": ["Mul"]}) == {"w1", "w2"}


def test_lifted_weights_come_back_in_place_and_folds_still_happen():
    """onnxruntime's optimizer gets the Mul's Conv weight (it folds the Mul into it) and not the
    other, which the canonical model has back unchanged, as an initializer; outputs agree."""
    import onnxruntime as ort

    from onnx_thinet.io.canonical import canonicalize_steps

    rng = np.random.default_rng(1)
    model = _two_large_convs(rng)
    before = model.SerializeToString()
    canonical, steps = canonicalize_steps(model)
    assert model.SerializeToString() == before  # the input model is not touched
    assert [(s.step, s.applied) for s in steps] == [("onnxsim", True), ("onnxruntime", True)], steps
    assert [n.op_type for n in canonical.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    assert [v.name for v in canonical.graph.input] == ["x"] and canonical.graph.name == "two-convs"
    weights = {t.name: numpy_helper.to_array(t) for t in canonical.graph.initializer}
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    assert np.array_equal(weights["w2"], w2)
    assert "w1" not in weights or not np.array_equal(
        weights["w1"], numpy_helper.to_array(model.graph.initializer[0]))  # the scale went into it
    x = rng.standard_normal((2, 512, 4, 4)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (model, canonical)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_onnxruntime_step_gives_the_same_model_with_every_layer_weight_lifted(family, monkeypatch):
    """onnxruntime's optimizer on each test family with every Conv/Gemm/MatMul weight it leaves
    alone lifted (whatever its size) gives the graph and weights it gives with none lifted."""
    from onnx_thinet.io import canonical, lifting

    model = canonical._prepared(builders.FAMILIES[family]()[0])
    results = []
    for lift_all in (False, True):
        monkeypatch.setattr(lifting, "LIFTED_ELEMENTS", 1 if lift_all else 1 << 62)
        own = onnx.ModelProto()
        own.CopyFrom(model)
        results.append(canonical._optimize_ort_basic(own))
    plain, lifted = results
    assert [(n.op_type, list(n.input), list(n.output)) for n in lifted.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in plain.graph.node]
    assert [v.SerializeToString() for v in lifted.graph.input] == [v.SerializeToString() for v in plain.graph.input]
    assert {t.name: numpy_helper.to_array(t).tolist() for t in lifted.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tolist() for t in plain.graph.initializer}
    lifted_names = lifting.layer_weights(model, canonical._ORT_FOLDS_INTO_WEIGHTS, canonical._ORT_MOVES)
    assert lifted_names  # every family has a layer whose weights the step does not get
