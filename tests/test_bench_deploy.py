"""`bench` (isolated latency), the Triton repository, and the slim models in OpenVINO."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnx_thinet import SlimConfig, load_model, slim
from onnx_thinet.cli import app
from onnx_thinet.io.data import ArrayData
from onnx_thinet.io.graph import save_model_atomic
from tests import builders

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _saved(tmp_path, model, name):
    path = tmp_path / name
    save_model_atomic(model, path)
    return path


def _slim_pair(tmp_path):
    model, _ = builders.pool_flatten_gemm()
    result = slim(model, ArrayData({"x": builders.calibration(model)}), SlimConfig(keep_ratio=0.5))
    return _saved(tmp_path, model, "orig.onnx"), _saved(tmp_path, result.model, "slim.onnx")


def test_bench_cli_reports_latency_and_flops_gain_per_batch(tmp_path):
    original, slimmed = _slim_pair(tmp_path)
    report = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(original), str(slimmed), "--batch", "1,3", "--threads", "1",
                                 "--rounds", "2", "--report", str(report)])
    assert result.exit_code == 0, result.output
    content = json.loads(report.read_text())
    assert [row["batch"] for row in content["batches"]] == [1, 3]
    for row in content["batches"]:
        assert row["latency_gain"] > 0 and row["flops_gain"] > 1.0
        slim_timing = row["slim"]
        assert 0 < slim_timing["median_ms"] <= slim_timing["p90_ms"] and slim_timing["runs"] >= 2
        assert slim_timing["throughput"] == pytest.approx(row["batch"] / (slim_timing["median_ms"] / 1000), rel=1e-2)
        assert row["latency_gain"] == pytest.approx(row["original"]["median_ms"] / slim_timing["median_ms"], rel=1e-2)
    assert content["flops_per_sample"]["slim"] < content["flops_per_sample"]["original"]
    assert "one session per model" in " ".join(result.output.split())


@pytest.mark.parametrize("args", [["--batch", "1,x"], ["--batch", "0"], ["--device", "tpu"]])
def test_bench_cli_bad_options_are_one_line_errors(tmp_path, args):
    original, slimmed = _slim_pair(tmp_path)
    result = runner.invoke(app, ["bench", str(original), str(slimmed), *args])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_bench_refuses_a_fixed_batch_it_cannot_feed(tmp_path):
    model, _ = builders.conv_chain()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = _saved(tmp_path, model, "fixed.onnx")
    result = runner.invoke(app, ["bench", str(path), str(path), "--batch", "4", "--rounds", "1"])
    assert result.exit_code == 2 and "fixed batch of 1" in result.output


def _model_config_pb2():
    """Triton's ModelConfig schema as tritonclient ships it (loaded without its grpc client)."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse_config(folder: Path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return pb2, text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())


def test_triton_repository_matches_the_model(tmp_path):
    original, slimmed = _slim_pair(tmp_path)
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["export-triton", str(slimmed), "--repo", str(repo), "--name", "thin",
                                 "--max-batch", "16"])
    assert result.exit_code == 0, result.output
    pb2, config = _parse_config(repo / "thin")
    model = load_model(repo / "thin" / "1" / "model.onnx")
    assert config.name == "thin" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
    for entries, values in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for entry, value in zip(entries, values):
            assert pb2.DataType.Name(entry.data_type) == "TYPE_FP32"
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
            assert list(entry.dims) == dims
    x = builders.calibration(model, n=5, seed=7)
    feeds = {"x": x}
    served = ort.InferenceSession(str(repo / "thin" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(slimmed), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(served.run(None, feeds)[0], reference.run(None, feeds)[0])


def test_triton_fixed_batch_has_no_batching_and_gpu_instances(tmp_path):
    model, _ = builders.conv_chain()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = _saved(tmp_path, model, "fixed.onnx")
    repo = tmp_path / "repo"
    assert runner.invoke(app, ["export-triton", str(path), "--repo", str(repo), "--device", "gpu"]).exit_code == 0
    pb2, config = _parse_config(repo / "fixed")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 12, 12]
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    again = runner.invoke(app, ["export-triton", str(path), "--repo", str(repo)])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet"])
def test_slim_reference_models_run_in_openvino_like_in_onnxruntime(tmp_path, name):
    ov = pytest.importorskip("openvino")
    model = load_model(ROOT / "models" / f"fmnist_{name}.onnx")
    calib = np.load(ROOT / "models" / "fmnist_calib.npy")[:96]
    result = slim(model, ArrayData({"input": calib}), SlimConfig(keep_ratio=0.5, reconstruct="scale"))
    path = _saved(tmp_path, result.model, "slim.onnx")
    x = np.load(ROOT / "models" / "fmnist_test_1k.npz")["x"][:16]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    # f32 asked for: on CPUs with bfloat16 units (avx512_bf16, AMX) OpenVINO infers in bf16 by default
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({"input": x})[compiled.output(0)]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert onnx.load(str(path)).graph.node  # the file OpenVINO read is the slim model


def test_slim_bench_adds_the_measurement_to_the_report(tmp_path):
    model, _ = builders.pool_flatten_gemm()
    path, calib, report = _saved(tmp_path, model, "m.onnx"), tmp_path / "calib.npy", tmp_path / "r.json"
    np.save(calib, builders.calibration(model))
    result = runner.invoke(app, ["slim", str(path), "--calib", str(calib), "--bench", "--threads", "1",
                                 "--report", str(report)])
    assert result.exit_code == 0, result.output
    bench = json.loads(report.read_text())["bench"]
    assert bench["slim"] == str(tmp_path / "m.slim.onnx")
    (row,) = bench["batches"]
    assert row["batch"] == 1 and row["latency_gain"] > 0 and row["flops_gain"] > 1.0
