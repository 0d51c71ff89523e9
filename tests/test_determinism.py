"""Same model, data, options and seed: a byte-identical output file, across processes with
different hash seeds, and with `--device auto` (CPU here) as with `--device cpu`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from typer.testing import CliRunner

from onnx_thinet.cli import app
from tests import builders

ROOT = Path(__file__).resolve().parent.parent


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _slim_in_subprocess(folder: Path, out: str, hash_seed: str, *extra: str) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=hash_seed)
    args = [sys.executable, "-m", "onnx_thinet.cli", "slim", str(folder / "net.onnx"), "--calib",
            str(folder / "calib.npy"), "--output", str(folder / out), "--seed", "3", "--quiet", *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / out


def test_same_inputs_and_seed_give_a_byte_identical_model(tmp_path):
    model, _ = builders.yolo_head()  # concat, resize, two heads: several groups and passes
    onnx.save(model, tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", builders.calibration(model, n=48))
    first = _slim_in_subprocess(tmp_path, "a.onnx", "1", "--device", "auto", "--prune-coupled")
    second = _slim_in_subprocess(tmp_path, "b.onnx", "2", "--device", "auto", "--prune-coupled")
    result = CliRunner().invoke(app, ["slim", str(tmp_path / "net.onnx"), "--calib", str(tmp_path / "calib.npy"),
                                      "--output", str(tmp_path / "c.onnx"), "--seed", "3", "--quiet",
                                      "--device", "cpu", "--prune-coupled"])
    assert result.exit_code == 0, result.output
    assert _digest(first) == _digest(second) == _digest(tmp_path / "c.onnx")
    other_seed = CliRunner().invoke(app, ["slim", str(tmp_path / "net.onnx"), "--calib", str(tmp_path / "calib.npy"),
                                          "--output", str(tmp_path / "d.onnx"), "--seed", "4", "--quiet",
                                          "--prune-coupled", "--method", "random"])
    assert other_seed.exit_code == 0, other_seed.output
    assert _digest(tmp_path / "d.onnx") != _digest(first)  # the seed is really used
