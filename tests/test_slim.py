"""End-to-end slimming through the Python API, checked against the original model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_thinet import SlimConfig, ThinetError, analyze, canonicalize, slim
from onnx_thinet.io.data import ArrayData
from onnx_thinet.slim import schedule_waves
from tests import builders


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _slim(model, config=None, n=64):
    return slim(model, ArrayData({"x": builders.calibration(model, n=n)}), config or SlimConfig())


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_planted_redundancy_is_removed_exactly(family):
    model, dead = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=0.5, method="thinet", only=tuple(dead)))
    by_producer = {g.producer: g for g in result.groups}
    assert set(dead) <= set(by_producer)
    for producer, channels in dead.items():
        group = by_producer[producer]
        assert group.channels_after == group.channels_before - len(channels)
        assert set(group.kept).isdisjoint(channels), (producer, group.kept, channels)
        assert group.error_after < 1e-4
    x = builders.calibration(model, n=7, seed=99)
    assert _rel_error(_run(model, x), _run(result.model, x)) < 1e-4
    assert result.verification.rel_error < 1e-4
    assert result.flops_after < result.flops_before
    assert result.params_after < result.params_before


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_weight_magnitude_picks_the_wrong_channels_on_planted_models(family):
    """The oracle discriminates: l1 keeps the big-norm dead filters and the output changes.

    Only the first group is checked: once l1 has kept the dead channels, the next layer's
    filters are all zero on what remains and their norms no longer carry the plant.
    """
    model, dead = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=0.5, method="l1", reconstruct="none", only=tuple(dead)))
    first = result.groups[0]
    assert set(dead[first.producer]) == set(first.kept)
    assert result.verification.rel_error > 1e-2


@pytest.mark.parametrize("method, reconstruct", [
    ("thinet-ls", "scale"), ("thinet", "full"), ("thinet-ls", "full"), ("thinet", "none"),
    ("lasso", "full")])
@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_thinet_variants_and_lasso_are_also_exact(family, method, reconstruct):
    """Methods that read the next layer's statistics all see that the planted channels are unused."""
    model, dead = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=0.5, method=method, reconstruct=reconstruct,
                                     only=tuple(dead)))
    for producer, channels in dead.items():
        group = next(g for g in result.groups if g.producer == producer)
        assert set(group.kept).isdisjoint(channels)
    assert result.verification.rel_error < 1e-4


@pytest.mark.parametrize("family", sorted(builders.FAMILIES))
def test_keep_ratio_one_gives_an_equivalent_model(family):
    model, _ = builders.FAMILIES[family]()
    result = _slim(model, SlimConfig(keep_ratio=1.0))
    assert all(g.channels_after == g.channels_before for g in result.groups)
    x = builders.calibration(model, n=5, seed=5)
    assert _rel_error(_run(model, x), _run(result.model, x)) < 1e-5
    assert result.flops_after == result.flops_before


def test_slim_model_keeps_interface_and_dynamic_batch():
    model, _ = builders.conv_bn_relu()
    model.metadata_props.add(key="author", value="tests")
    result = _slim(model)
    slim_model = result.model
    onnx.checker.check_model(slim_model, full_check=True)
    assert [i.name for i in slim_model.graph.input] == ["x"]
    assert [o.name for o in slim_model.graph.output] == [o.name for o in model.graph.output]
    assert slim_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    props = {p.key: p.value for p in slim_model.metadata_props}
    assert props["author"] == "tests"  # the original's metadata is kept; provenance is added beside it
    assert all(key.startswith("onnx_thinet.") for key in set(props) - {"author"})
    assert slim_model.opset_import[0].version == model.opset_import[0].version
    for batch in (1, 3, 17):
        x = builders.calibration(model, n=batch, seed=batch)
        assert _run(slim_model, x).shape == _run(model, x).shape


def test_node_names_survive_without_canonicalization():
    model, _ = builders.conv_bn_relu()
    result = _slim(model, SlimConfig(simplify=False))
    assert {n.name for n in result.model.graph.node} == {n.name for n in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    # BN vectors were cut with the filters they normalize.
    assert inits["conv1.w"].shape[0] == 4 and inits["bn1.scale"].shape == (4,)
    assert inits["conv2.w"].shape[:2] == (4, 4) and inits["bn2.var"].shape == (4,)
    assert inits["conv3.w"].shape[1] == 4


def test_depthwise_group_is_sliced_with_its_channels():
    model, _ = builders.depthwise_chain()
    result = _slim(model, SlimConfig(simplify=False))
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == 4
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert inits["dw.w"].shape == (4, 1, 3, 3)


def test_residual_channels_are_coupled_and_kept():
    model, dead = builders.residual_block()
    result = _slim(model)
    assert [g.producer for g in result.groups] == ["conv1"]
    coupled = {c.producer for c in result.analysis.coupled}
    assert coupled == {"stem", "conv2"}
    report = result.report()
    assert {c["producer"] for c in report["coupled"]} == {"stem", "conv2"}
    assert all("Add" in c["reason"] for c in report["coupled"])


def test_rescaling_never_increases_a_groups_reconstruction_error():
    model, _ = builders.conv_chain(seed=4)
    model = _randomize(model, seed=4)
    result = _slim(model, SlimConfig(keep_ratio=0.5), n=96)
    assert all(g.error_after <= g.error_before + 1e-12 for g in result.groups)
    assert any(g.error_after < g.error_before * 0.99 for g in result.groups)


def test_layers_that_depend_on_each_other_get_separate_passes():
    """A chain needs a pass per layer (each sees its predecessor pruned); siblings share one."""
    chain, _ = builders.conv_chain()
    chain = canonicalize(chain, simplify=False)
    assert [[g.producer for g in w] for w in schedule_waves(chain, analyze(chain).groups)] == [
        ["conv1"], ["conv2"]]
    net = builders.Net(0)
    a = net.node("Relu", [net.conv("x", "a1", 3, 8)], "ra")
    b = net.node("Relu", [net.conv("x", "b1", 3, 8)], "rb")
    net.node("Add", [net.conv(a, "a2", 8, 4), net.conv(b, "b2", 8, 4)], "sum")
    siblings = net.model(["N", 3, 8, 8], "sum", ["N", 4, 8, 8])
    waves = schedule_waves(siblings, analyze(siblings).groups)
    assert [[g.producer for g in w] for w in waves] == [["a1", "b1"]]


def _randomize(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Undo the planting: fresh random weights of the same shapes."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for t in out.graph.initializer:
        array = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(rng.standard_normal(array.shape).astype(np.float32), t.name))
    return out


def test_correcting_statistics_are_no_worse_than_plain_on_a_deep_chain():
    model, _ = builders.conv_chain(seed=5)
    model = _randomize(model, seed=5)
    plain = _slim(model, SlimConfig(keep_ratio=0.5), n=96)
    corrected = _slim(model, SlimConfig(keep_ratio=0.5, correct=True), n=96)
    assert corrected.verification.rel_error <= plain.verification.rel_error * 1.05


def test_nothing_prunable_is_an_error():
    model, _ = builders.conv_chain()
    only_last = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = [n for n in only_last.graph.node if n.name == "conv1"]
    del only_last.graph.node[:]
    only_last.graph.node.extend(nodes)
    only_last.graph.output[0].name = "conv1"
    only_last.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    with pytest.raises(ThinetError, match="nothing prunable"):
        _slim(only_last)


def test_analysis_follows_silu_written_as_sigmoid_mul():
    net = builders.Net(0)
    h = net.conv("x", "conv1", 3, 8)
    gate = net.node("Sigmoid", [h], "sig")
    h = net.node("Mul", [h, gate], "silu")
    net.conv(h, "conv2", 8, 4)
    model = net.model(["N", 3, 8, 8], "conv2", ["N", 4, 8, 8])
    analysis = analyze(canonicalize(model, simplify=False))
    assert [g.producer for g in analysis.groups] == ["conv1"]
    result = _slim(model, SlimConfig(keep_ratio=1.0))
    assert result.verification.rel_error < 1e-6


def test_unknown_op_on_the_path_is_skipped_not_guessed_and_others_still_prune():
    net = builders.Net(0)
    a = net.node("Relu", [net.conv("x", "conv1", 3, 8)], "relu1")
    b = net.node("LRN", [net.conv(a, "conv2", 8, 8)], "lrn", size=3)
    net.conv(b, "conv3", 8, 4)
    model = net.model(["N", 3, 8, 8], "conv3", ["N", 4, 8, 8])
    analysis = analyze(canonicalize(model, simplify=False))
    assert [g.producer for g in analysis.groups] == ["conv1"]
    skipped = {s.producer: s for s in analysis.skipped}
    assert "LRN" in skipped["conv2"].reason


def _residual_stage(seed: int = 0):
    """stem → two residual blocks → head: stem, block1.conv2 and block2.conv2 are tied by Adds.

    Planted: channels 1, 4, 6 of the tied tensor are exactly zero everywhere (zero filters in
    all three producers, zero BN-free bias) and carry no weight in any reader.
    """
    n = builders.Net(seed)
    x = n.node("Relu", [n.conv("x", "stem", 3, 8)], "stem_relu")
    for b in (1, 2):
        h = n.node("Relu", [n.conv(x, f"b{b}_conv1", 8, 6)], f"b{b}_relu1")
        h = n.conv(h, f"b{b}_conv2", 6, 8)
        x = n.node("Relu", [n.node("Add", [h, x], f"b{b}_add")], f"b{b}_relu")
    n.conv(x, "head", 8, 4)
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in n.inits}
    dead = [1, 4, 6]
    for producer in ("stem", "b1_conv2", "b2_conv2"):
        arrays[f"{producer}.w"][dead] = 0.0
        arrays[f"{producer}.b"][dead] = 0.0
    for reader in ("b1_conv1", "b2_conv1", "head"):
        arrays[f"{reader}.w"][:, dead] = 0.0
    for name, array in arrays.items():
        n._replace(name, array)
    return n.model(["N", 3, 8, 8], "head", ["N", 4, 8, 8]), dead


def test_prune_coupled_cuts_residual_channels_jointly_and_exactly():
    model, dead = _residual_stage()
    plain = _slim(model, SlimConfig(keep_ratio=0.75))
    assert {c.producer for c in plain.analysis.coupled} == {"stem", "b1_conv2", "b2_conv2"}
    result = _slim(model, SlimConfig(keep_ratio=5 / 8, prune_coupled=True, only=("stem",)))
    joint = next(g for g in result.groups if "stem" in g.producer)
    assert joint.producer == "stem + b1_conv2 + b2_conv2"
    assert set(joint.kept).isdisjoint(dead) and joint.channels_after == 5
    assert set(joint.consumers) == {"b1_conv1", "b2_conv1", "head"}
    assert not result.analysis.coupled
    assert result.verification.rel_error < 1e-5
    assert result.flops_after < plain.flops_before


def test_prune_coupled_cuts_a_c2f_stream_through_its_split_exactly():
    """Only the Split window of cv1 that feeds the residual sum joins the bottleneck's conv."""
    model, dead = builders.c2f_shortcut()
    plain = analyze(canonicalize(model))
    assert {c.producer for c in plain.coupled} == {"cv1", "m_cv2"}
    result = _slim(model, SlimConfig(keep_ratio=0.5, prune_coupled=True, only=("cv1",)))
    joint = next(g for g in result.groups if "cv1" in g.producer)
    assert joint.producer == "cv1 + m_cv2"
    assert joint.channels_before == 4 and joint.channels_after == 2
    assert set(joint.kept).isdisjoint(dead)
    assert set(joint.consumers) == {"m_cv1", "cv2"}
    assert result.verification.rel_error < 1e-5
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert weights["cv1.w"].shape[0] == 6 and weights["m_cv2.w"].shape[0] == 2
    assert weights["cv2.w"].shape[1] == 4 + 2 + 2
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    assert weights[split.input[1]].tolist() == [4, 2]
    x = builders.calibration(model, n=3, seed=5)
    ref = _run(model, x)
    assert np.abs(_run(result.model, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_prune_coupled_handles_squeeze_excitation_gates():
    model, _ = builders.se_block()
    plain = analyze(canonicalize(model))
    assert "expand" in {c.producer for c in plain.coupled}
    joint = analyze(canonicalize(model), prune_coupled=True)
    assert "expand + se_expand" in {g.producer for g in joint.groups}
    result = _slim(model, SlimConfig(keep_ratio=0.5, prune_coupled=True))
    assert result.flops_after < result.flops_before
    x = builders.calibration(model, n=4, seed=3)
    assert _run(result.model, x).shape == _run(model, x).shape


@pytest.mark.parametrize("method", ["apoz", "random"])
def test_baseline_methods_give_valid_models_on_planted_families(method):
    for family in ("conv_chain", "pool_flatten_gemm", "sppf"):
        model, dead = builders.FAMILIES[family]()
        result = _slim(model, SlimConfig(keep_ratio=0.5, method=method, only=tuple(dead)))
        onnx.checker.check_model(result.model, full_check=True)
        assert all(g.channels_after == g.channels_before - len(dead[g.producer]) for g in result.groups)


def test_apoz_removes_the_channels_that_are_zero_everywhere():
    """conv1's filters 1, 4, 5 see only a negative bias: after the Relu they are always 0."""
    n = builders.Net(3)
    h = n.node("Relu", [n.conv("x", "conv1", 3, 8)], "relu1")
    n.conv(h, "conv2", 8, 4)
    n._replace("conv1.w", np.where(np.isin(np.arange(8), [1, 4, 5])[:, None, None, None], 0.0,
                                   numpy_helper.to_array(next(t for t in n.inits if t.name == "conv1.w"))))
    n._replace("conv1.b", np.where(np.isin(np.arange(8), [1, 4, 5]), -1.0, 0.1))
    model = n.model(["N", 3, 12, 12], "conv2", ["N", 4, 12, 12])
    result = _slim(model, SlimConfig(keep_ratio=0.625, method="apoz"))
    (group,) = result.groups
    assert group.kept == (0, 2, 3, 6, 7)


def test_several_graph_inputs_and_outputs():
    net = builders.Net(0)
    a = net.node("Relu", [net.conv("x1", "a", 3, 6)], "ra")
    b = net.node("Relu", [net.conv("x2", "b", 3, 4)], "rb")
    net.conv(net.node("Concat", [a, b], "cat", axis=1), "head", 10, 5)
    net.conv(a, "side", 6, 2)
    graph = onnx.helper.make_graph(
        net.nodes, "two",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 3, 8, 8]) for n in ("x1", "x2")],
        [onnx.helper.make_tensor_value_info("head", onnx.TensorProto.FLOAT, ["N", 5, 8, 8]),
         onnx.helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["N", 2, 8, 8])],
        net.inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    data = ArrayData({n: rng.standard_normal((40, 3, 8, 8)).astype(np.float32) for n in ("x1", "x2")})
    result = slim(model, data, SlimConfig(keep_ratio=1.0))
    assert result.verification.rel_error < 1e-5
    groups = {g.producer: g for g in slim(model, data, SlimConfig(keep_ratio=0.5)).groups}
    assert set(groups["a"].consumers) == {"head", "side"} and groups["a"].channels_after == 3
