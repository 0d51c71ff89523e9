"""finetune_graph: fine-tuning that keeps the graph and only changes initializer values.

The pruning pipeline finds layers by node and initializer name, so the tuned model must
be the student's own graph with new weights. Every export layout (Gemm transB / alpha /
beta, MatMul, PRelu, depthwise and transposed convs, BatchNorm) is checked by a round
trip with no training that must give back the exact bytes, and by training runs whose
written-back graph must agree with the trained module (checked inside finetune_graph).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnx_thinet.errors import InternalError, ThinetError  # noqa: E402
from onnx_thinet.pytorch import finetune_graph as ft  # noqa: E402
from onnx_thinet.pytorch.export import InitSource, export_torch_model  # noqa: E402
from onnx_thinet.pytorch.finetune import finetune_graph  # noqa: E402

pytestmark = pytest.mark.torch

C, K, HW = 8, 5, 8


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(nodes, inits, out_dims, batch: int | str = "N", out="y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, HW, HW])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, *out_dims])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)  # value_info, as the pipeline has it
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(name: str, x: str, out: str, bias: bool = True, **attrs) -> onnx.NodeProto:
    ins = [x, f"{name}.w"] + ([f"{name}.b"] if bias else [])
    return helper.make_node("Conv", ins, [out], name=name, **attrs)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """conv -> BN -> Relu -> conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB=1)."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv1.w": _w(rng, C, 3, 3, 3),
        "conv1.b": 0.1 * rng.standard_normal(C),
        "bn1.scale": 1 + 0.1 * rng.standard_normal(C),
        "bn1.bias": 0.1 * rng.standard_normal(C),
        "bn1.mean": 0.1 * rng.standard_normal(C),
        "bn1.var": 1 + 0.2 * rng.random(C),
        "conv2.w": _w(rng, C, C, 3, 3),
        "conv2.b": 0.1 * rng.standard_normal(C),
        "fc.w": _w(rng, K, C),
        "fc.b": 0.1 * rng.standard_normal(K),
    }
    nodes = [
        _conv("conv1", "x", "c1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"],
            ["b1"],
            name="bn1",
        ),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        _conv("conv2", "r1", "c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [K])


def matmul_add(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """conv -> Relu -> pool -> Flatten -> MatMul(W [in, out]) -> Add(bias)."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv1.w": _w(rng, C, 3, 3, 3),
        "conv1.b": 0.1 * rng.standard_normal(C),
        "fc.w": _w(rng, C, K),
        "fc.b": 0.1 * rng.standard_normal(K),
    }
    nodes = [
        _conv("conv1", "x", "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc.w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc.b"], ["y"], name="fc_bias"),
    ]
    return _model(nodes, inits, [K], batch=batch)


def depthwise(seed: int = 0) -> onnx.ModelProto:
    """conv -> Relu -> depthwise conv -> PRelu(C,1,1) -> pool -> Gemm(transB=0, alpha, beta)."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv1.w": _w(rng, C, 3, 3, 3),
        "conv1.b": 0.1 * rng.standard_normal(C),
        "dw.w": _w(rng, C, 1, 3, 3),
        "dw.b": 0.1 * rng.standard_normal(C),
        "prelu.slope": 0.25 + 0.05 * rng.standard_normal((C, 1, 1)),
        "fc.w": _w(rng, C, K),
        "fc.c": 0.1 * rng.standard_normal((1, K)),
    }
    nodes = [
        _conv("conv1", "x", "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        _conv("dw", "r1", "d", pads=[1, 1, 1, 1], group=C),
        helper.make_node("PRelu", ["d", "prelu.slope"], ["p"], name="prelu"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.c"], ["y"], name="fc", alpha=2.0, beta=0.5),
    ]
    return _model(nodes, inits, [K])


def odd_layouts(seed: int = 0) -> onnx.ModelProto:
    """ConvTranspose, scalar PRelu, a weight shared by two convs, a weight also read by a
    constant-folded node, and a Gemm with a scalar C: the last three cannot be written
    back one-to-one and must stay frozen."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv1.w": _w(rng, C, 3, 3, 3),
        "prelu.slope": [0.2],
        "up.w": _w(rng, C, 4, 2, 2),
        "up.b": 0.1 * rng.standard_normal(4),
        "shared.w": _w(rng, 4, 4, 1, 1),
        "folded.w": _w(rng, 4, 4, 1, 1),
        "half": [0.5],
        "fc.w": _w(rng, K, 4),
        "fc.c": [0.1],
    }
    nodes = [
        _conv("conv1", "x", "c1", bias=False, pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "prelu.slope"], ["p"], name="prelu"),
        helper.make_node("ConvTranspose", ["p", "up.w", "up.b"], ["u"], name="up", strides=[2, 2]),
        helper.make_node("Conv", ["u", "shared.w"], ["s1"], name="shared_a"),
        helper.make_node("Relu", ["s1"], ["s1r"], name="relu_a"),
        helper.make_node("Conv", ["s1r", "shared.w"], ["s2"], name="shared_b"),
        helper.make_node("Conv", ["s2", "folded.w"], ["f1"], name="direct"),
        helper.make_node("Mul", ["folded.w", "half"], ["folded.w_half"], name="fold_me"),
        helper.make_node("Conv", ["f1", "folded.w_half"], ["f2"], name="via_fold"),
        helper.make_node("GlobalAveragePool", ["f2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.c"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [K])


BUILDERS = {"cnn": cnn, "matmul": matmul_add, "depthwise": depthwise, "odd": odd_layouts}


def noisy(model: onnx.ModelProto, seed: int = 1, rel: float = 0.5) -> onnx.ModelProto:
    """The student: the teacher with noise on every weight (BN statistics kept)."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name.endswith((".mean", ".var")):
            continue
        a = numpy_helper.to_array(t)
        a = a + rng.standard_normal(a.shape) * (rel * float(a.std()) + 0.05)
        t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
    return out


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def assert_same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert [n.SerializeToString() for n in a.graph.node] == [
        n.SerializeToString() for n in b.graph.node
    ]
    assert [(t.name, tuple(t.dims), t.data_type) for t in a.graph.initializer] == [
        (t.name, tuple(t.dims), t.data_type) for t in b.graph.initializer
    ]
    for what in ("input", "output", "value_info"):
        assert [v.SerializeToString() for v in getattr(a.graph, what)] == [
            v.SerializeToString() for v in getattr(b.graph, what)
        ], what
    assert list(a.opset_import) == list(b.opset_import)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ftg")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((128, 3, HW, HW)).astype(np.float32)
    paths = {"x": d / "x.npz", "xy": d / "xy.npz", "npy": d / "x.npy", "bad": d / "bad.npy"}
    np.savez(paths["x"], x=x)
    np.savez(paths["xy"], x=x, y=rng.integers(0, K, len(x)))
    np.save(paths["npy"], x)
    np.save(paths["bad"], x[:, :, :6, :6])
    return paths


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((128, 3, HW, HW)).astype(np.float32)


# ---------------------------------------------------------------- training moves weights


def test_cnn_distills_toward_teacher_in_place(data, heldout) -> None:
    teacher = cnn()
    student = noisy(teacher)
    before = arrays(student)
    snapshot = student.SerializeToString()
    tuned = finetune_graph(student, teacher, data["x"], 30, lr=1e-3)
    assert student.SerializeToString() == snapshot  # the input is left alone
    assert_same_graph(student, tuned)
    after = arrays(tuned)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert {"conv1.w", "conv2.w", "fc.w", "bn1.scale"} <= set(changed)
    for k in ("bn1.mean", "bn1.var"):  # BN statistics are frozen by default
        assert before[k].tobytes() == after[k].tobytes()
    ref = run(teacher, heldout)
    err_before = float(np.mean((run(student, heldout) - ref) ** 2))
    err_after = float(np.mean((run(tuned, heldout) - ref) ** 2))
    assert err_after < 0.8 * err_before


def test_labels_and_npy_data(data, heldout) -> None:
    teacher = matmul_add()
    student = noisy(teacher)
    for path in (data["xy"], data["npy"]):
        tuned = finetune_graph(student, teacher, path, 10, lr=1e-3, batch_size=32)
        assert_same_graph(student, tuned)
        assert not np.array_equal(arrays(tuned)["fc.w"], arrays(student)["fc.w"])


@pytest.mark.parametrize("kind", ["matmul", "depthwise", "odd"])
def test_training_writes_back_every_layout(kind, data) -> None:
    """Written-back weights must reproduce the trained module (finetune_graph checks it
    against onnxruntime and raises otherwise); unmappable tensors stay as they were."""
    teacher = BUILDERS[kind]()
    student = noisy(teacher)
    tuned = finetune_graph(student, teacher, data["x"], 8, lr=1e-2, seed=1)
    assert_same_graph(student, tuned)
    before, after = arrays(student), arrays(tuned)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    frozen = {"shared.w", "folded.w", "half", "fc.c"} if kind == "odd" else set()
    assert changed == set(before) - frozen


def test_bn_statistics_train_when_not_frozen(data) -> None:
    teacher = cnn()
    tuned = finetune_graph(noisy(teacher), teacher, data["x"], 5, lr=1e-3, freeze_bn=False)
    assert not np.array_equal(arrays(tuned)["bn1.mean"], arrays(teacher)["bn1.mean"])


def test_static_batch_model(data) -> None:
    """A fixed batch dim (here 2) is run in chunks by onnxruntime; training uses 64."""
    teacher = matmul_add(batch=2)
    student = noisy(teacher)
    tuned = finetune_graph(student, teacher, data["x"], 5, lr=1e-3)
    assert_same_graph(student, tuned)


# ---------------------------------------------------------------- exact layout round trip


EXPECTED_SOURCES = {
    "cnn": {
        "fc.w": InitSource("fc.w", False, 1.0),
        "bn1.mean": InitSource("bn1.mean"),
        "bn1.var": InitSource("bn1.var"),
    },
    "matmul": {"fc.w": InitSource("fc.w", True, 1.0), "fc.b": InitSource("fc.b")},
    "depthwise": {
        "fc.w": InitSource("fc.w", True, 2.0),
        "fc.c": InitSource("fc.c", False, 0.5),
        "prelu.slope": InitSource("prelu.slope"),
        "dw.w": InitSource("dw.w"),
    },
    "odd": {"up.w": InitSource("up.w"), "prelu.slope": InitSource("prelu.slope")},
}
UNMAPPED = {"odd": {"shared.w", "folded.w", "half", "fc.c"}}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_layout_round_trip_is_bit_identical(kind, data, tmp_path) -> None:
    """No training (steps=0, or lr=0): every mapped tensor goes through the export layout
    and its inverse and must come back with the very same bytes."""
    student = noisy(BUILDERS[kind]())
    mapping = export_torch_model(student, tmp_path, verify=False).initializers
    by_init = {s.initializer: s for s in mapping.values()}
    for name, source in EXPECTED_SOURCES[kind].items():
        assert by_init[name] == source
    unmapped = {t.name for t in student.graph.initializer} - set(by_init)
    assert unmapped == UNMAPPED.get(kind, set())
    text = (tmp_path / "model.py").read_text()
    assert "ONNX_INITIALIZERS = {" in text
    teacher = BUILDERS[kind]()
    for kw in ({"steps": 0}, {"steps": 3, "lr": 0.0}):
        steps = kw.pop("steps")
        tuned = finetune_graph(student, teacher, data["x"], steps, **kw)
        assert tuned.SerializeToString() == student.SerializeToString()


def test_inverse_layout_of_changed_values() -> None:
    """The inverse of each layout, on values that did change."""
    value = np.arange(6, dtype=np.float32).reshape(3, 2)  # module layout [out, in]
    got = ft._to_initializer(value, InitSource("w", True, 2.0), (2, 3), np.float32)
    np.testing.assert_array_equal(got, value.T / 2)
    slope = ft._to_initializer(np.ones(4, np.float32), InitSource("s"), (4, 1, 1), np.float16)
    assert slope.shape == (4, 1, 1) and slope.dtype == np.float16
    with pytest.raises(InternalError, match="values"):
        ft._to_initializer(np.ones(4, np.float32), InitSource("s"), (5,), np.float32)


# ---------------------------------------------------------------- checks and errors


def test_structure_change_is_refused(data, monkeypatch) -> None:
    teacher = cnn()

    def widen(tensor, arr):  # a bogus write-back that changes a shape
        tensor.CopyFrom(numpy_helper.from_array(np.concatenate([arr, arr]), tensor.name))

    monkeypatch.setattr(ft, "_set_initializer", widen)
    with pytest.raises(InternalError, match="initializer names, shapes"):
        finetune_graph(noisy(teacher), teacher, data["x"], 2, lr=1e-3)


def test_worse_loss_keeps_the_weights(data, monkeypatch, caplog) -> None:
    teacher = cnn()
    student = noisy(teacher)
    losses = iter([1.0, 2.0])
    monkeypatch.setattr(ft, "probe_loss", lambda *a, **k: next(losses))
    with caplog.at_level(logging.WARNING, logger="onnx_thinet.pytorch.finetune_graph"):
        tuned = finetune_graph(student, teacher, data["x"], 3, lr=1e-3)
    assert tuned.SerializeToString() == student.SerializeToString()
    assert "raised the probe loss" in caplog.text


def test_bad_arguments(data, tmp_path) -> None:
    teacher = cnn()
    student = noisy(teacher)
    with pytest.raises(ThinetError, match="steps"):
        finetune_graph(student, teacher, data["x"], -1)
    with pytest.raises(ThinetError, match="learning rate"):
        finetune_graph(student, teacher, data["x"], 1, lr=-1.0)
    with pytest.raises(ThinetError, match="expects"):
        finetune_graph(student, teacher, data["bad"], 1)
    with pytest.raises(ThinetError, match="not found"):
        finetune_graph(student, teacher, tmp_path / "nope.npz", 1)
    with pytest.raises(ThinetError, match="ModelProto"):
        finetune_graph("student.onnx", teacher, data["x"], 1)


def test_teacher_outputs_are_cached_between_calls(data) -> None:
    teacher = cnn()
    student = noisy(teacher)
    cache = ft.TeacherCache()  # owned by the caller (slim makes one per run)
    finetune_graph(student, teacher, data["x"], 2, lr=1e-3, cache=cache)
    cached = cache.outputs
    calls = []
    real = cached.teacher
    cached.teacher = lambda xb: calls.append(len(xb)) or real(xb)
    finetune_graph(student, teacher, data["x"], 2, lr=1e-3, cache=cache)
    assert cache.outputs is cached
    assert calls == []  # every sample (all 128 are in the probe) was computed once already
