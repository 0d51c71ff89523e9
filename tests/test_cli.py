"""The CLI contract: flags, outputs, the JSON report, and one clear line for every bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from typer.testing import CliRunner

from onnx_thinet.cli import app
from tests import builders

runner = CliRunner()


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    model, _ = builders.pool_flatten_gemm()
    onnx.save(model, tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", builders.calibration(model, n=40))
    return tmp_path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_slim_writes_model_and_report_with_contract_keys(workdir):
    before = _digest(workdir / "net.onnx")
    result = _invoke("slim", workdir / "net.onnx", "--keep-ratio", "0.5", "--calib", workdir / "calib.npy",
                     "--output", workdir / "out.onnx", "--report", workdir / "r.json",
                     "--method", "thinet", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert _digest(workdir / "net.onnx") == before
    report = json.loads((workdir / "r.json").read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "output_rel_error",
                "groups", "coupled", "seconds", "canonicalization"):
        assert key in report
    for group in report["groups"]:
        assert {"producer", "consumers", "channels_before", "channels_after"} <= set(group)
    assert report["flops_after"] < report["flops_before"]
    assert report["output_rel_error"] < 1e-4
    slim_model = onnx.load(workdir / "out.onnx")
    onnx.checker.check_model(slim_model, full_check=True)
    x = builders.calibration(slim_model, n=3, seed=8)
    session = ort.InferenceSession(str(workdir / "out.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (3, 4)
    assert "pruned groups" in result.output and "FLOPs" in result.output


def test_default_output_sits_beside_the_input(workdir):
    result = _invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "-q")
    assert result.exit_code == 0, result.output
    assert (workdir / "net.slim.onnx").exists()


def test_npz_calibration_keyed_by_input_name(workdir):
    np.savez(workdir / "calib.npz", x=np.load(workdir / "calib.npy"))
    result = _invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npz", "-q",
                     "--output", workdir / "o.onnx")
    assert result.exit_code == 0, result.output


def test_image_folder_calibration(tmp_path):
    net = builders.Net(0)
    h = net.node("Relu", [net.conv("x", "conv1", 3, 8)], "relu1")
    net.conv(h, "conv2", 8, 4)
    onnx.save(net.model(["N", 3, 16, 16], "conv2", ["N", 4, 16, 16]), tmp_path / "m.onnx")
    images = tmp_path / "images" / "class_a"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = _invoke("slim", tmp_path / "m.onnx", "--calib", tmp_path / "images", "--preprocess",
                     "imagenet", "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["groups"][0]["channels_after"] == 4


def test_inspect_lists_groups_and_costs(workdir):
    result = _invoke("inspect", workdir / "net.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [g["producer"] for g in info["groups"]] == ["conv1", "fc1"]
    assert info["flops"] == sum(layer["flops"] for layer in info["layers"])
    assert info["skipped"][0]["producer"] == "fc2"
    text = _invoke("inspect", workdir / "net.onnx")
    assert "prunable groups" in text.output and "conv1" in text.output


def _expect_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


BAD_MODELS = {
    "missing": None,
    "truncated": lambda good: good[: len(good) // 3],
    "not onnx": lambda good: b"this is not a model at all\n" * 10,
    "empty": lambda good: b"",
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_files(workdir, case):
    path = workdir / "bad.onnx"
    if BAD_MODELS[case] is not None:
        path.write_bytes(BAD_MODELS[case]((workdir / "net.onnx").read_bytes()))
    result = _invoke("slim", path, "--calib", workdir / "calib.npy", "--output", workdir / "o.onnx")
    _expect_error(result, "bad.onnx")
    assert not (workdir / "o.onnx").exists()


def test_nothing_prunable(workdir):
    net = builders.Net(0)
    net.conv("x", "conv1", 3, 4)
    onnx.save(net.model(["N", 3, 8, 8], "conv1", ["N", 4, 8, 8]), workdir / "one.onnx")
    np.save(workdir / "c.npy", np.zeros((4, 3, 8, 8), np.float32))
    _expect_error(_invoke("slim", workdir / "one.onnx", "--calib", workdir / "c.npy"), "nothing prunable")


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((4, 3, 9, 9), np.float32), "shape"),
    (np.zeros((4, 3, 8), np.float32), "shape"),
    (np.zeros((4, 3, 8, 8), np.int64), "int64"),
    (np.zeros((0, 3, 8, 8), np.float32), "no samples"),
])
def test_calibration_that_does_not_fit(workdir, array, fragment):
    np.save(workdir / "c.npy", array)
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "c.npy"), fragment)


def test_npz_without_the_input_name(workdir):
    np.savez(workdir / "c.npz", images=np.zeros((4, 3, 8, 8), np.float32))
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "c.npz"), "'x'")


def test_unreadable_calibration_files(workdir):
    (workdir / "c.npy").write_bytes(b"garbage")
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "c.npy"), "c.npy")
    (workdir / "c.txt").write_text("1 2 3")
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "c.txt"), ".npy, .npz")
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "nope.npy"), "nope.npy")


def test_empty_and_unreadable_image_folders(workdir):
    (workdir / "empty").mkdir()
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "empty"), "no image files")
    broken = workdir / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", broken), "a.jpg")


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5"])
def test_keep_ratio_out_of_range(workdir, ratio):
    result = _invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "--keep-ratio", ratio)
    _expect_error(result, "--keep-ratio")


def test_existing_output_needs_force(workdir):
    (workdir / "o.onnx").write_bytes(b"keep me")
    args = ("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "--output", workdir / "o.onnx", "-q")
    _expect_error(_invoke(*args), "--force")
    assert (workdir / "o.onnx").read_bytes() == b"keep me"
    assert _invoke(*args, "--force").exit_code == 0
    onnx.checker.check_model(onnx.load(workdir / "o.onnx"))


def test_output_may_not_be_the_input(workdir):
    before = _digest(workdir / "net.onnx")
    result = _invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy",
                     "--output", workdir / "net.onnx", "--force")
    _expect_error(result, "input model")
    assert _digest(workdir / "net.onnx") == before


def test_unknown_method_and_device(workdir):
    base = ("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy")
    _expect_error(_invoke(*base, "--method", "magic"), "--method")
    _expect_error(_invoke(*base, "--device", "tpu"), "--device")


def test_installed_entry_point_reports_errors_without_traceback(workdir):
    """The real console script, in a subprocess: stderr has one line, exit code is non-zero."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_thinet.cli", "slim", str(workdir / "missing.onnx"),
         "--calib", str(workdir / "calib.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_eval_reports_accuracy_and_agreement(workdir):
    model = onnx.load(workdir / "net.onnx")
    x = builders.calibration(model, n=30, seed=3)
    session = ort.InferenceSession(str(workdir / "net.onnx"), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(axis=1)
    labels[:6] = (labels[:6] + 1) % 4  # 24 of 30 right
    np.savez(workdir / "labelled.npz", x=x, y=labels)
    result = _invoke("eval", workdir / "net.onnx", "--data", workdir / "labelled.npz",
                     "--reference", workdir / "net.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["accuracy"] == pytest.approx(0.8)
    assert info["top1_agreement"] == 1.0 and info["mean_abs_error"] == 0.0


def test_eval_on_a_class_folder(tmp_path):
    net = builders.Net(0)
    h = net.node("GlobalAveragePool", [net.conv("x", "conv1", 3, 2, k=1, pads=[0, 0, 0, 0])], "gap")
    net.node("Flatten", [h], "logits", axis=1)
    onnx.save(net.model(["N", 3, 8, 8], "logits", ["N", 2]), tmp_path / "m.onnx")
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    result = _invoke("eval", tmp_path / "m.onnx", "--data", tmp_path / "data", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"] == 6


def test_eval_bad_data(workdir):
    np.savez(workdir / "bad.npz", x=np.zeros((3, 3, 8, 8), np.float32))
    _expect_error(_invoke("eval", workdir / "net.onnx", "--data", workdir / "bad.npz"), "'y'")


def test_only_limits_pruning_to_named_producers(workdir):
    result = _invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "--only", "fc1",
                     "--report", workdir / "r.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "r.json").read_text())
    assert [g["producer"] for g in report["groups"]] == ["fc1"]
    _expect_error(_invoke("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "--only", "nope",
                          "--force"), "--only")


def test_inspect_shows_joint_groups_with_prune_coupled(tmp_path):
    model, _ = builders.residual_block()
    onnx.save(model, tmp_path / "res.onnx")
    plain = json.loads(_invoke("inspect", tmp_path / "res.onnx", "--json").output)
    joint = json.loads(_invoke("inspect", tmp_path / "res.onnx", "--json", "--prune-coupled").output)
    assert {c["producer"] for c in plain["coupled"]} == {"stem", "conv2"}
    assert "stem + conv2" in {g["producer"] for g in joint["groups"]} and not joint["coupled"]


@pytest.mark.torch
def test_layer_by_layer_finetune_schedule(workdir):
    pytest.importorskip("torch")
    model = onnx.load(workdir / "net.onnx")
    x = builders.calibration(model, n=64, seed=5)
    np.save(workdir / "train.npy", x)
    args = ("slim", workdir / "net.onnx", "--calib", workdir / "calib.npy", "-q", "--reconstruct", "none",
            "--method", "random", "--holdout", "0.25")
    plain = _invoke(*args, "--output", workdir / "plain.onnx", "--report", workdir / "plain.json")
    tuned = _invoke(*args, "--output", workdir / "tuned.onnx", "--report", workdir / "tuned.json",
                    "--finetune-data", workdir / "train.npy", "--finetune-steps", "40")
    assert plain.exit_code == 0 and tuned.exit_code == 0, tuned.output
    before = json.loads((workdir / "plain.json").read_text())["output_rel_error"]
    after = json.loads((workdir / "tuned.json").read_text())["output_rel_error"]
    assert after < before
    _expect_error(_invoke(*args, "--finetune-steps", "5", "--force"), "--finetune-data")


def test_library_parameter_names_become_flags_only_in_the_cli():
    from onnx_thinet import SlimConfig, ThinetError
    from onnx_thinet.cli.errors import as_flags

    with pytest.raises(ThinetError, match="keep_ratio") as caught:
        SlimConfig(keep_ratio=2.0).validate()
    assert "--" not in str(caught.value) and caught.value.params == ("keep_ratio",)
    assert as_flags(str(caught.value), caught.value.params).startswith("--keep-ratio must be")
    assert as_flags("batch_size and channel_multiple", ("batch_size", "channel_multiple")) == \
        "--batch-size and --channel-multiple"
    assert as_flags("delete it or pass resume=False", ("resume",)) == "delete it or pass --no-resume"
    assert as_flags("the method of keep_ratio_x", ("keep_ratio",)) == "the method of keep_ratio_x"


def test_internal_errors_exit_1_and_ask_for_a_report(monkeypatch):
    import typer

    from onnx_thinet.cli.errors import cli_errors
    from onnx_thinet.errors import InternalError

    probe = typer.Typer()

    @probe.command()
    @cli_errors
    def broken() -> None:
        raise InternalError("the rewritten model fails the ONNX checker (bad\nnode)")

    monkeypatch.delenv("ONNX_THINET_DEBUG", raising=False)
    result = runner.invoke(probe, [])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: the rewritten model")
    assert "please report" in lines[0] and "ONNX_THINET_DEBUG=1" in lines[0]
    monkeypatch.setenv("ONNX_THINET_DEBUG", "1")
    result = runner.invoke(probe, [])
    assert isinstance(result.exception, InternalError)  # the traceback path
