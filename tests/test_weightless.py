"""Shape inference, sessions and index lookups that never serialize or decode whole weights.

Each must give exactly what the weight-carrying path gives: the same inferred model, the same
session outputs, the same constants.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_thinet.calibration.runtime import make_session
from onnx_thinet.io.canonical import canonicalize
from onnx_thinet.io.graph import GraphIndex
from onnx_thinet.io.probe import outputs_differ, probe, reference_after
from onnx_thinet.io.weightless import (
    LARGE_WEIGHT_ELEMENTS,
    infer_shapes,
    is_session_array,
    weight_stub,
    weightless_copy,
)
from tests import builders

MODELS = Path(__file__).resolve().parent.parent / "models"


def _shape_arithmetic_model(seed: int = 0) -> onnx.ModelProto:
    """Conv (large weight) -> Resize (float scales) -> Reshape to an initializer's shape, and
    Reshape to [batch, -1] built by Shape -> Gather -> Unsqueeze -> Concat -> MatMul (large weight)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((48, 3, 3, 3)).astype(np.float32)  # 1296 elements: stripped
    w2 = rng.standard_normal((48 * 8 * 8, 10)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales"),
        numpy_helper.from_array(np.array([0, 48, 64], np.int64), "target"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["r"], name="resize", mode="nearest"),
        helper.make_node("Reshape", ["r", "target"], ["grid"], name="reshape_const"),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "rest"], ["flat_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"], name="reshape_dynamic"),
        helper.make_node("MatMul", ["flat", "w2"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "b2"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "shape_arithmetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("grid", TensorProto.FLOAT, None)],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _reference_models() -> list[tuple[str, onnx.ModelProto]]:
    models = [("shape_arithmetic", _shape_arithmetic_model())]
    for build in (builders.conv_chain, builders.conv_bn_relu, builders.pool_flatten_gemm,
                  builders.residual_block, builders.tf2onnx_nhwc, builders.c2f_split, builders.yolo_head):
        models.append((build.__name__, build()[0]))
    models.append(("fmnist_vgg", onnx.load(str(MODELS / "fmnist_vgg.onnx"))))
    return models


@pytest.mark.parametrize("name,model", _reference_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_shape_inference_without_weights_equals_full_inference(name, model):
    expected = onnx.shape_inference.infer_shapes(model, data_prop=True).SerializeToString()
    before = model.SerializeToString()
    assert infer_shapes(model).SerializeToString() == expected
    assert model.SerializeToString() == before  # a copy unless asked for in place
    assert infer_shapes(model, in_place=True) is model
    assert model.SerializeToString() == expected


def test_shape_arithmetic_is_inferred_through_stripped_weights():
    inferred = infer_shapes(_shape_arithmetic_model())
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    assert shapes["r"] == [2, 48, 8, 8]  # Resize read its float scales
    assert shapes["grid"] == [2, 48, 64]  # Reshape read its initializer
    assert shapes["batch1"] == [1] and shapes["flat"] == [2, 3072]  # data propagation: Shape -> Gather -> Concat
    assert shapes["y"] == [2, 10]


def test_weightless_copy_drops_only_large_float_data():
    model = _shape_arithmetic_model()
    light = weightless_copy(model)
    tensors = {t.name: t for t in light.graph.initializer}
    for original in model.graph.initializer:
        copy = tensors[original.name]
        assert (copy.data_type, list(copy.dims)) == (original.data_type, list(original.dims))
        large = original.data_type == TensorProto.FLOAT and np.prod(original.dims) > LARGE_WEIGHT_ELEMENTS
        assert (copy.raw_data == b"") == large, original.name
    assert light.ByteSize() < 4 * (1296 + 3072 * 10) / 10
    assert [n.SerializeToString() for n in light.graph.node] == [n.SerializeToString() for n in model.graph.node]


def test_session_on_in_memory_weights_matches_a_session_from_bytes():
    model = _shape_arithmetic_model()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    options = ort.SessionOptions()  # as make_session's: prepacked weights sum in another order
    options.add_session_config_entry("session.disable_prepacking", "1")
    expected = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})
    session = make_session(model)
    gc.collect()  # the session keeps its weights alive on its own
    # no arena: an output kept in the activation store must not pin the session's memory
    assert not session.get_session_options().enable_cpu_mem_arena
    for got, want in zip(session.run(None, {"x": x}), expected):
        np.testing.assert_array_equal(got, want)


def test_session_on_weight_stubs_takes_their_values_beside_the_model():
    """A segment cut from a bigger model carries its large weights as stubs (name, type, dims)
    and hands the arrays over: the session computes what the weight-carrying model does."""
    model = _shape_arithmetic_model()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if is_session_array(t)}
    assert set(arrays) == {"w1", "w2"}
    stubbed = onnx.ModelProto()
    stubbed.CopyFrom(model)
    for k, tensor in enumerate(stubbed.graph.initializer):
        if tensor.name in arrays:
            stubbed.graph.initializer[k].CopyFrom(weight_stub(tensor))
    assert stubbed.ByteSize() < 1000
    for got, want in zip(make_session(stubbed, arrays=arrays).run(None, {"x": x}),
                         make_session(model).run(None, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_session_keeps_bfloat16_weights_in_the_graph():
    """numpy has no bfloat16 that onnxruntime takes as an OrtValue: such weights stay serialized."""
    import ml_dtypes

    w = np.random.default_rng(4).standard_normal(2048).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "wf"], ["y"])],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2048])],
        [numpy_helper.from_array(w.astype(ml_dtypes.bfloat16), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.ones(2048, np.float32)
    np.testing.assert_array_equal(make_session(model).run(None, {"x": x})[0],
                                  x + w.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_graph_index_decodes_a_constant_once_and_read_only():
    model = _shape_arithmetic_model()
    index = GraphIndex.build(model)
    weight = index.const("w2")
    assert weight is index.const("w2")
    assert not weight.flags.writeable
    np.testing.assert_array_equal(weight, numpy_helper.to_array(model.graph.initializer[1]))
    assert index.const_shape("w2").shape == (3072, 10) and index.const_shape("w2").ndim == 2
    assert index.const("c") is None and index.const_shape("c") is None


def test_graph_index_reads_shapes_when_looked_up():
    """Shapes come from value_info on first lookup; an entry without a shape does not hide an
    earlier one with it, and unknown tensors read as None."""
    model = _shape_arithmetic_model()
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 48, 16, 16]))
    model.graph.output.append(helper.make_value_info("c", onnx.TypeProto()))  # no shape
    index = GraphIndex.build(model)
    assert index.shapes.get("x") == (2, 3, 16, 16) and index.rank("x") == 4
    assert index.dim("c", 1) == 48 and "c" in index.shapes
    assert index.shapes.get("nowhere") is None and "nowhere" not in index.shapes and index.rank("nowhere") is None
    index.shapes["nowhere"] = (5,)  # callers may record shapes they computed
    assert index.dim("nowhere", 0) == 5


def test_probe_rejects_a_changed_model_and_reuses_an_accepted_run():
    model = canonicalize(_shape_arithmetic_model(), simplify=False)
    reference = probe(model)
    assert reference.error is None
    same = onnx.ModelProto.FromString(model.SerializeToString())
    reason, run = outputs_differ(reference, same)
    assert reason is None and reference_after(same, run) is run
    changed = onnx.ModelProto.FromString(model.SerializeToString())
    bias = next(t for t in changed.graph.initializer if t.name == "b2")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1, "b2"))
    assert outputs_differ(reference, changed)[0] == "changed the outputs"
    broken = onnx.ModelProto.FromString(model.SerializeToString())
    broken.graph.node[0].op_type = "NoSuchOp"
    assert outputs_differ(reference, broken)[0].startswith("could not compare outputs:")
    assert outputs_differ(probe(broken), model)[0].startswith("could not compare outputs:")
