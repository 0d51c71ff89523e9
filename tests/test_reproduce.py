"""tools/reproduce.py on a tiny classifier: sweep, single-layer study, tables, plots, JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import builders

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "reproduce.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("reproduce_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labelled(model, n: int, seed: int):
    """Seeded inputs labelled by the unpruned model, a few labels flipped (accuracy < 100%)."""
    x = builders.calibration(model, n=n, seed=seed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)
    y[:3] = (y[:3] + 1) % 4
    return x, y


def test_sweep_tables_and_plots(tmp_path, capsys):
    tool = _load_tool()
    model, _ = builders.pool_flatten_gemm()  # classifier: [N,3,8,8] -> [N,4]; conv1 and fc1
    calib = builders.calibration(model, n=48, seed=1)
    x, y = _labelled(model, n=40, seed=2)
    methods, ratios = ["thinet", "l1"], [0.5, 0.75]

    baseline = tool.measure_baseline(model, x, y)
    assert baseline["accuracy"] == pytest.approx(37 / 40)
    producers = tool.prunable_producers(model)
    assert producers == ["conv1", "fc1"]
    result = tool.new_result("tiny.onnx", baseline, producers, ratios, methods)
    cache: dict = {}
    result["sweep"] = tool.run_sweep(model, calib, x, y, methods, ratios, reconstruct="full",
                                     label="tiny", cache=cache)
    result["variants"] = tool.run_variants(model, calib, x, y, methods=["thinet"], keep=0.5,
                                           label="tiny", cache=cache)
    result["single_layer"] = tool.run_single_layer(model, calib, x, y, methods, keep=0.5,
                                                   producers=producers, label="tiny")

    assert [(r["method"], r["keep_ratio"]) for r in result["sweep"]] == [
        (m, r) for m in methods for r in ratios]
    for record in result["sweep"] + result["variants"] + result["single_layer"]:
        assert record["error"] is None, record["error"]
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["flops_after"] < record["flops_before"]
        assert record["params_after"] < record["params_before"]
    assert len(result["variants"]) == 6
    assert {(r["reconstruct"], r["correct"]) for r in result["variants"]} == {
        (rec, cor) for rec in ("none", "scale", "full") for cor in (False, True)}
    assert [(r["only"], r["method"]) for r in result["single_layer"]] == [
        ([p], m) for p in producers for m in methods]
    out = capsys.readouterr().out
    assert "tiny sweep thinet keep=0.5 -> acc" in out

    args = tool.parse_args(["--methods", "thinet,l1", "--ratios", "0.5,0.75", "--variants"])
    assert args.methods == methods and args.ratios == ratios and args.correct is False
    settings = tool.build_settings(args, ["--methods", "thinet,l1"], len(calib), len(x))
    results = {"tiny": result}
    tool.write_markdown(results, settings, tmp_path / "results.md")
    tool.plot_sweep("tiny", result, tmp_path / "accuracy_vs_keep_tiny.png")
    tool.plot_single_layer("tiny", result, tmp_path / "single_layer_tiny.png")
    tool.write_json({"settings": settings, "models": results}, tmp_path / "results.json")

    for name in ("accuracy_vs_keep_tiny.png", "single_layer_tiny.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "python tools/reproduce.py --methods thinet,l1" in md
    assert "| method | keep 0.5 | keep 0.75 |" in md
    lines = md.splitlines()
    for method in methods:
        row = next(line for line in lines if line.startswith(f"| {method} | "))
        assert row.count("|") == len(ratios) + 2 and "error" not in row
    assert any(line.startswith("| FLOPs (reduction) | ") for line in lines)
    assert any(line.startswith("| params (reduction) | ") for line in lines)
    assert any(line.startswith("| tiny | thinet | 92.50 | ") for line in lines)
    assert any(line.startswith("| 0 | `conv1` | 6 → 3 | ") for line in lines)
    assert any(line.startswith("| 1 | `fc1` | 10 → 5 | ") for line in lines)
    assert "Failed runs" not in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["models"]["tiny"]["sweep"]) == 4


def test_failed_run_is_recorded_not_raised(tmp_path):
    tool = _load_tool()
    model, _ = builders.pool_flatten_gemm()
    calib = builders.calibration(model, n=16, seed=1)
    x, y = _labelled(model, n=8, seed=2)
    records = tool.run_single_layer(model, calib, x, y, ["l1"], producers=["nope"],
                                    log=lambda line: None)
    assert records[0]["accuracy"] is None and "not a prunable producer" in records[0]["error"]
    baseline = tool.measure_baseline(model, x, y)
    result = tool.new_result("tiny.onnx", baseline, ["nope"], [0.5], ["l1"])
    result["single_layer"] = records
    settings = tool.build_settings(tool.parse_args([]), [], len(calib), len(x))
    tool.write_markdown({"tiny": result}, settings, tmp_path / "results.md")
    md = (tmp_path / "results.md").read_text()
    assert "| 0 | `nope` |  | error |" in md
    assert "## Failed runs" in md and "only=nope" in md


def _tiny_fmnist_classifier():
    """[N,1,28,28] -> conv(6) -> Relu -> MaxPool 4 -> Flatten -> fc1(8) -> Relu -> fc2(10)."""
    n = builders.Net(seed=3)
    h = n.node("Relu", [n.conv("input", "conv1", 1, 6)], "relu1")
    h = n.node("MaxPool", [h], "pool", kernel_shape=[4, 4], strides=[4, 4])
    h = n.node("Flatten", [h], "flatten", axis=1)
    h = n.node("Gemm", [h, n.weight("fc1.w", (6 * 49, 8), 0.1), n.weight("fc1.b", (8,), 0.1)],
               "fc1")
    h = n.node("Relu", [h], "relu2")
    n.node("Gemm", [h, n.weight("fc2.w", (8, 10)), n.weight("fc2.b", (10,), 0.1)], "logits")
    return n.model(["N", 1, 28, 28], "logits", ["N", 10], x_name="input")


@pytest.mark.fmnist
def test_main_end_to_end_and_resume(tmp_path, capsys):
    tool = _load_tool()
    try:
        tool.load_test_set(limit=1)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import onnx

    onnx.save(_tiny_fmnist_classifier(), tmp_path / "fmnist_tiny.onnx")
    calib = np.random.default_rng(0).standard_normal((24, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "calib.npy", calib)
    out = tmp_path / "out"
    argv = ["--models", "tiny", "--model-dir", str(tmp_path), "--calib",
            str(tmp_path / "calib.npy"), "--out", str(out), "--test-limit", "64",
            "--methods", "l1,random", "--ratios", "0.5"]
    assert tool.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"results.md", "results.json", "accuracy_vs_keep_tiny.png",
                     "single_layer_tiny.png"}
    first = json.loads((out / "results.json").read_text())
    assert first["settings"]["test_images"] == 64
    assert first["command"] == "python tools/reproduce.py " + " ".join(argv)
    assert len(first["models"]["tiny"]["sweep"]) == 2
    assert len(first["models"]["tiny"]["single_layer"]) == 4  # conv1, fc1 x 2 methods
    md = (out / "results.md").read_text()

    capsys.readouterr()
    assert tool.main([*argv, "--resume"]) == 0
    assert "tiny: --resume reuses 6 run(s)" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert all(r.get("resumed") for r in again["models"]["tiny"]["sweep"])
    assert (out / "results.md").read_text() == md  # same numbers, same command, no dates
