"""Budgets and the guard through `slim`, on tiny models with planted redundancy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_thinet import SlimConfig, ThinetError, canonicalize, slim
from onnx_thinet.channels.analysis import analyze
from onnx_thinet.check.metrics import total_flops
from onnx_thinet.check.verify import compare_outputs, output_warnings
from onnx_thinet.io.data import ArrayData
from onnx_thinet.planning import cost_model, structure_for
from tests import builders


def _data(model, n=64, seed=1):
    return ArrayData({"x": builders.calibration(model, n=n, seed=seed)})


def _flops_of_keeps(model, keeps):
    canonical = canonicalize(model)
    return total_flops(structure_for(canonical, keeps)) / total_flops(canonical)


def test_cost_model_predicts_the_flops_of_the_cut_graph():
    model, _ = builders.pool_flatten_gemm()
    canonical = canonicalize(model)
    groups = analyze(canonical).groups
    costs = cost_model(canonical, groups, None, "flops")
    keeps = {g.producer: max(1, g.channels // 3) for g in groups}
    ratios = np.array([keeps[g.producer] / g.channels for g in groups])
    assert costs.cost(ratios) / costs.full() == pytest.approx(_flops_of_keeps(model, keeps))


def test_flops_budget_of_the_planted_channels_removes_exactly_them():
    """The budget equals the FLOPs without the dead channels: zero-error cuts go first, exactly."""
    model, dead = builders.conv_chain()
    keeps = {"conv1": 8 - len(dead["conv1"]), "conv2": 6 - len(dead["conv2"])}
    target = _flops_of_keeps(model, keeps)
    result = slim(model, _data(model), SlimConfig(target_flops=target, method="thinet"))
    by_producer = {g.producer: g for g in result.groups}
    for producer, channels in dead.items():
        assert by_producer[producer].channels_after == keeps[producer]
        assert set(by_producer[producer].kept).isdisjoint(channels)
    assert result.verification.rel_error < 1e-4
    assert result.flops_after / result.flops_before == pytest.approx(target)
    layers = {layer["producer"]: layer for layer in result.budget["layers"]}
    assert layers["conv1"]["keep"] == keeps["conv1"] and layers["conv1"]["why"]
    assert result.budget["reached"]


@pytest.mark.parametrize("target", ["target_flops", "target_params"])
def test_budget_is_met_and_reported(target):
    model, _ = builders.pool_flatten_gemm(seed=4)
    result = slim(model, _data(model), SlimConfig(**{target: 0.5}))
    fraction = result.budget["flops_fraction" if target == "target_flops" else "params_fraction"]
    assert fraction <= 0.5 + 1e-9
    assert result.budget["target"] == target.removeprefix("target_")
    report = json.loads(json.dumps(result.report()))
    assert {"producer", "keep", "keep_ratio", "why"} <= set(report["budget"]["layers"][0])


def test_round_to_applies_to_planned_keeps():
    model, _ = builders.conv_bn_relu()
    result = slim(model, _data(model), SlimConfig(target_flops=0.6, round_to=4))
    for g in result.groups:
        assert g.channels_after % 4 == 0 or g.channels_after == g.channels_before


def test_guard_relaxes_the_budget_until_agreement_holds():
    model, _ = builders.pool_flatten_gemm(seed=2)
    data = _data(model, n=200)
    loose = slim(model, data, SlimConfig(keep_ratio=0.2, method="random", reconstruct="none", holdout=0.3))
    assert loose.verification.top1_agreement < 1.0  # the budget alone changes answers
    guarded = slim(model, data, SlimConfig(keep_ratio=0.2, method="random", reconstruct="none", holdout=0.3,
                                           min_agreement=1.0))
    assert guarded.verification.top1_agreement == 1.0
    assert guarded.guard["achieved_agreement"] == 1.0 and not guarded.guard["budget_reached"]
    assert guarded.guard["tries"][0]["passed"] is False and len(guarded.guard["tries"]) > 1
    assert guarded.flops_after >= loose.flops_after
    assert "guard" in guarded.guard["stopped_at"] or "nothing" in guarded.guard["stopped_at"]


def test_max_error_guard_keeps_the_held_out_error_under_the_bound():
    model, _ = builders.conv_chain(seed=3)
    result = slim(model, _data(model, n=100), SlimConfig(target_flops=0.2, max_error=0.05, holdout=0.3))
    assert result.verification.rel_error <= 0.05
    assert result.guard["achieved_error"] == result.verification.rel_error


def test_min_agreement_without_a_classifier_output_is_a_clear_error():
    model, _ = builders.conv_chain()
    with pytest.raises(ThinetError, match="max_error"):
        slim(model, _data(model), SlimConfig(min_agreement=0.9))


@pytest.mark.parametrize("bad", [{"target_flops": 0.0}, {"target_params": 1.5}, {"round_to": 0},
                                 {"target_flops": 0.5, "target_params": 0.5}, {"max_error": -1.0}])
def test_bad_budgets_are_refused(bad):
    model, _ = builders.conv_chain()
    with pytest.raises(ThinetError):
        slim(model, _data(model), SlimConfig(**bad))


def test_provenance_is_recorded_in_metadata_props():
    model, _ = builders.conv_chain()
    result = slim(model, _data(model), SlimConfig(target_flops=0.5))
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["onnx_thinet.version"]
    assert "thinet" in props["onnx_thinet.method"]
    assert json.loads(props["onnx_thinet.budget"])["target_flops"] == 0.5
    counts = json.loads(props["onnx_thinet.keep_counts"])
    assert {g.producer: [g.channels_after, g.channels_before] for g in result.groups} == counts


def _with_dead_head(model: onnx.ModelProto, weight: str, bias_scale: float) -> onnx.ModelProto:
    """The same model whose last layer ignores its input: weights zero, bias kept."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for t in out.graph.initializer:
        if t.name == weight:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        if t.name == weight.replace(".w", ".b"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * bias_scale, t.name))
    return out


def test_collapsed_output_is_flagged_per_output():
    model, _ = builders.pool_flatten_gemm()
    data = _data(model, n=40)
    same = compare_outputs(model, model, data, np.arange(40))
    assert not any(o.collapsed or o.lost_range for o in same.outputs) and output_warnings(same) == []
    dead = compare_outputs(model, _with_dead_head(model, "fc2.w", 1.0), data, np.arange(40))
    (check,) = dead.outputs
    assert check.name == "fc2" and check.collapsed and check.spread_ratio == 0.0
    warnings = output_warnings(dead, worst_layer="conv1")
    assert any("collapsed to a constant" in w and "conv1" in w for w in warnings)


def test_lost_range_is_flagged():
    model, _ = builders.conv_chain()
    data = _data(model, n=20)
    x = data.batch(np.arange(20))["x"]
    shrunk = onnx.ModelProto.FromString(model.SerializeToString())
    for t in shrunk.graph.initializer:
        if t.name in ("conv3.w", "conv3.b"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.01, t.name))
    comparison = compare_outputs(model, shrunk, ArrayData({"x": x}), np.arange(20))
    assert comparison.outputs[0].lost_range and not comparison.outputs[0].collapsed
    assert "lost its range" in output_warnings(comparison)[0]


def _cli_slim(tmp_path, model, *args):
    from typer.testing import CliRunner

    from onnx_thinet.cli import app
    from onnx_thinet.io.graph import save_model_atomic

    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    save_model_atomic(model, path)
    np.save(calib, builders.calibration(model, n=200, seed=1))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["slim", str(path), "--calib", str(calib), "--report", str(report),
                                      "--force", *args])
    return result, report


@pytest.mark.parametrize("strict", [False, True])
def test_a_run_that_changes_answers_warns_and_fails_only_when_strict(tmp_path, strict):
    model, _ = builders.pool_flatten_gemm(seed=2)
    args = ["--keep-ratio", "0.2", "--method", "random", "--reconstruct", "none", "--holdout", "0.3"]
    result, report = _cli_slim(tmp_path, model, *args, *(["--strict"] if strict else []))
    assert result.exit_code == (3 if strict else 0), result.output
    assert "WARNING" in result.output and "below 90%" in result.output
    content = json.loads(report.read_text())
    assert any("below 90%" in w for w in content["warnings"])
    assert content["outputs"][0]["name"] == "fc2"
    assert (tmp_path / "m.slim.onnx").exists()


def test_cli_budget_and_guard_report_what_they_achieved(tmp_path):
    model, _ = builders.pool_flatten_gemm(seed=2)
    result, report = _cli_slim(tmp_path, model, "--target-flops", "0.4", "--min-agreement", "0.95",
                               "--holdout", "0.3", "--round-to", "2")
    assert result.exit_code == 0, result.output
    content = json.loads(report.read_text())
    assert content["guard"]["achieved_agreement"] >= 0.95 and content["top1_agreement"] >= 0.95
    assert "guard: agreement" in " ".join(result.output.split())
    assert content["budget"]["target"] == "flops" and content["budget"]["layers"]


def test_target_latency_measures_planned_structures_and_reports_them():
    model, _ = builders.conv_bn_relu(seed=5)
    result = slim(model, _data(model), SlimConfig(target_latency=0.6, threads=1))
    latency = result.budget["latency"]
    assert latency["asked"] == 0.6 and 1 <= len(latency["tries"]) <= 4
    assert all(t["latency_fraction"] > 0 and t["original_ms"] > 0 for t in latency["tries"])
    chosen = min(latency["tries"], key=lambda t: abs(t["latency_fraction"] / 0.6 - 1))
    assert latency["measured_fraction"] == chosen["latency_fraction"]
    assert result.budget["asked"] == pytest.approx(chosen["flops_fraction"])
    assert result.flops_after < result.flops_before
