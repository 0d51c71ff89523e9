"""Hostile and broken inputs: one `error:` line, exit 2, nothing written, inputs untouched.

Models: external-data paths leaving the model's folder (refused before any read: the target is
a FIFO, so a read would hang the subprocess), absurd dims, cycles, duplicate and shadowing
names, missing initializers, non-float weights, declared shapes that lie. Calibration: pickles,
huge and truncated arrays, image folders with corrupt or non-image files.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

import onnx_thinet.io.data as data_io
from onnx_thinet.cli import app
from tests import builders

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def _invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _expect_refusal(folder: Path, model: Path, calib: Path, fragment: str) -> None:
    """The CLI refuses with one error line naming `fragment`, exit 2, and writes nothing."""
    before = _listing(folder)
    result = _invoke("slim", model, "--calib", calib, "--output", folder / "out.onnx",
                     "--report", folder / "r.json")
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
    assert _listing(folder) == before


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    model, _ = builders.conv_chain()
    np.save(tmp_path / "calib.npy", builders.calibration(model, n=16))
    return tmp_path / "calib.npy"


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _cycle(m):
    m.graph.node[0].input[0] = m.graph.node[1].output[0]


def _duplicate_output(m):
    m.graph.node[1].output[0] = m.graph.node[0].output[0]


def _duplicate_initializer(m):
    m.graph.initializer.append(m.graph.initializer[0])


def _initializer_shadows_input(m):
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 3, 5, 5), np.float32), "x"))


def _initializer_shadows_node_output(m):
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 8, 12, 12), np.float32), "relu1"))


def _missing_initializer(m):
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "conv2.w"))


def _int8_weights(m):
    w = next(t for t in m.graph.initializer if t.name == "conv2.w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.int8), "conv2.w"))


def _output_shape_lies(m):
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7


def _value_info_lies(m):
    m.graph.value_info.append(helper.make_tensor_value_info("relu1", TensorProto.FLOAT, ["N", 5, 12, 12]))


def _absurd_input_dims(m):
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 10**6


def _absurd_initializer_dims(m):
    w = next(t for t in m.graph.initializer if t.name == "conv1.w")
    w.dims[0] = 10**13


BROKEN_MODELS = {
    "cycle": (_cycle, "cycle"),
    "duplicate tensor names": (_duplicate_output, "produced twice"),
    "duplicate initializers": (_duplicate_initializer, "two initializers"),
    "initializer shadows an input": (_initializer_shadows_input, "shadows the graph input"),
    "initializer shadows a node output": (_initializer_shadows_node_output, "shadows the output"),
    "missing initializer": (_missing_initializer, "no node, graph input or initializer"),
    "non-float weights": (_int8_weights, "int8 weights"),
    "output shape lies": (_output_shape_lies, "contradict"),
    "value_info shape lies": (_value_info_lies, "contradict"),
    "absurd input dims": (_absurd_input_dims, "absurd dims"),
    "absurd initializer dims": (_absurd_initializer_dims, "absurd dims"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_broken_models_are_refused_in_one_line(tmp_path, calib, case):
    break_model, fragment = BROKEN_MODELS[case]
    model = _copy(builders.conv_chain()[0])
    break_model(model)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    _expect_refusal(tmp_path, path, calib, fragment)


def test_initializers_listed_as_inputs_by_old_exporters_are_accepted(tmp_path, calib):
    """Consistent initializer + input pairs (IR 3 exporters list every weight) are not hostile."""
    model = _copy(builders.conv_chain()[0])
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.save(model, tmp_path / "old.onnx")
    result = _invoke("slim", tmp_path / "old.onnx", "--calib", calib, "--output", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output


# --- external data -----------------------------------------------------------------------


def _external_model(folder: Path, location: str) -> Path:
    """conv_chain saved with its weights in external data, every location rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "net.onnx"
    onnx.save(builders.conv_chain()[0], path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="net.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    return path


def _fifo(path: Path) -> Path:
    """A named pipe: reading it blocks until a writer comes, so any read shows as a hang."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "onnx_thinet.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_before_any_read(tmp_path, calib, kind):
    secret = _fifo(tmp_path / "outside" / "secret.bin")
    if kind == "absolute":
        model = _external_model(tmp_path / "m", str(secret))
    elif kind == "dotdot":
        model = _external_model(tmp_path / "m", "../outside/secret.bin")
    else:
        model = _external_model(tmp_path / "m", "link.bin")
        (tmp_path / "m" / "link.bin").symlink_to(secret)
    before = _listing(tmp_path)
    done = _cli("slim", model, "--calib", calib, "--output", tmp_path / "m" / "out.onnx", timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    fragment = {"absolute": "absolute", "dotdot": "leaves the model's folder", "symlink": "outside"}[kind]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert _listing(tmp_path) == before


def test_external_data_beside_the_model_loads(tmp_path, calib):
    model = _external_model(tmp_path / "m", "net.bin")
    result = _invoke("slim", model, "--calib", calib, "--output", tmp_path / "m" / "out.onnx")
    assert result.exit_code == 0, result.output


def test_external_data_past_the_end_of_its_file_is_refused(tmp_path, calib):
    model = _external_model(tmp_path / "m", "net.bin")
    data = tmp_path / "m" / "net.bin"
    data.write_bytes(data.read_bytes()[:100])
    _expect_refusal(tmp_path, model, calib, "past the end")


# --- calibration files -------------------------------------------------------------------


@pytest.fixture()
def net(tmp_path: Path) -> Path:
    onnx.save(builders.conv_chain()[0], tmp_path / "net.onnx")
    return tmp_path / "net.onnx"


def test_pickled_npy_is_refused(tmp_path, net):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    _expect_refusal(tmp_path, net, tmp_path / "objects.npy", "pickled data")
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(np.zeros((4, 3, 12, 12), np.float32)))
    _expect_refusal(tmp_path, net, tmp_path / "raw.npy", "not a readable .npy")


def test_pickled_npz_member_is_refused_before_reading_it(tmp_path, net):
    np.savez(tmp_path / "c.npz", x=np.array([object()] * 4, dtype=object))
    _expect_refusal(tmp_path, net, tmp_path / "c.npz", "pickled")


def test_truncated_arrays_are_refused(tmp_path, net):
    x = builders.calibration(builders.conv_chain()[0], n=8)
    np.save(tmp_path / "c.npy", x)
    (tmp_path / "c.npy").write_bytes((tmp_path / "c.npy").read_bytes()[:5000])
    _expect_refusal(tmp_path, net, tmp_path / "c.npy", "truncated")
    np.savez(tmp_path / "c.npz", x=x)
    (tmp_path / "c.npz").write_bytes((tmp_path / "c.npz").read_bytes()[:5000])
    _expect_refusal(tmp_path, net, tmp_path / "c.npz", "not a readable .npz")


def test_npy_header_claiming_huge_shape_is_refused(tmp_path, net):
    """A header promising 10^12 samples on a small file: refused, never mapped or allocated."""
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**12, 3, 12, 12)})
        f.write(b"\0" * 4096)
    _expect_refusal(tmp_path, net, path, "lies about its shape")


def test_npz_needing_more_memory_than_the_machine_is_refused(tmp_path, net, monkeypatch):
    """.npz members are read whole; their declared sizes are summed before any is read."""
    np.savez(tmp_path / "c.npz", x=np.zeros((64, 3, 12, 12), np.float32))
    monkeypatch.setattr(data_io, "_memory_limit", lambda: 100_000)  # this machine's half, scaled down
    _expect_refusal(tmp_path, net, tmp_path / "c.npz", "GiB in memory")


def _image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_image_folder_skips_corrupt_and_non_image_files_with_a_count(tmp_path, net, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        _image(folder / f"img{i}.png", i)
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.jpg").write_bytes(b"not a jpeg at all")
    good = (folder / "img0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        result = _invoke("slim", net, "--calib", folder, "--output", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "skipped 2 of 14 image files" in caplog.text


def test_image_folder_with_only_corrupt_images_is_refused(tmp_path, net):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)
    _expect_refusal(tmp_path, net, folder, "none of the 2 image files can be decoded")


def test_a_model_onnxruntime_cannot_run_is_refused_in_one_line(tmp_path):
    """Conv with SAME_UPPER padding and dilation 2: valid ONNX, but onnxruntime's kernel refuses it."""
    net = builders.Net(1)
    h = net.node("Relu", [net.conv("x", "c1", 3, 8, pads=None, auto_pad="SAME_UPPER", dilations=[2, 2])], "r1")
    net.conv(h, "c2", 8, 4)
    model = net.model(["N", 3, 16, 16], "c2", ["N", 4, 16, 16])
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    _expect_refusal(tmp_path, tmp_path / "m.onnx", tmp_path / "calib.npy", "onnxruntime cannot run this model")
