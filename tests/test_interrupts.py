"""SIGINT/SIGTERM during `slim`: one line, exit 130/143, no output, no temp file; a re-run works.

The CLI runs in a subprocess that is signalled at several points after it has loaded the
model (it logs the validation at INFO). Python's own import phase, before the CLI installs
its handlers, writes nothing either.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnx_thinet.cli import app
from tests import builders

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The bundled VGG and its calibration set eight times over: a slim of several seconds, so
    every signal below lands while it runs (a tiny model finished before the signal on an idle
    machine, and so did the bundled set alone, 0.9 s after loading, on a fast one)."""
    folder = tmp_path_factory.mktemp("interrupt")
    shutil.copy(ROOT / "models" / "fmnist_vgg.onnx", folder / "net.onnx")
    np.save(folder / "calib.npy", np.concatenate([np.load(ROOT / "models" / "fmnist_calib.npy")] * 8))
    return folder


def _start(folder: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ONNX_THINET_LOG="INFO")
    return subprocess.Popen(
        [sys.executable, "-m", "onnx_thinet.cli", "slim", str(folder / "net.onnx"), "--calib",
         str(folder / "calib.npy"), "--output", str(folder / "out.onnx"), "--report", str(folder / "r.json"),
         "--quiet"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_until_running(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "validated" in line or time.monotonic() > deadline:
            return
    raise AssertionError("the CLI ended before loading the model")


@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.8)])
def test_signal_leaves_nothing_and_says_so_in_one_line(job, sig, delay):
    before = sorted(p.name for p in job.iterdir())
    proc = _start(job)
    _wait_until_running(proc)
    time.sleep(delay)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    lines = [line for line in rest.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert proc.returncode == 128 + sig, rest
    assert lines == [f"error: interrupted by {signal.Signals(sig).name}; nothing written"], rest
    assert sorted(p.name for p in job.iterdir()) == before  # no output, report or temp file


def test_rerun_after_an_interrupt_works(job):
    proc = _start(job)
    _wait_until_running(proc)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and not (job / "out.onnx").exists()
    result = CliRunner().invoke(app, ["slim", str(job / "net.onnx"), "--calib", str(job / "calib.npy"),
                                      "--output", str(job / "out.onnx"), "--quiet"])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(job / "out.onnx"), full_check=True)
    (job / "out.onnx").unlink()


def test_failed_external_data_save_leaves_no_temp_file(tmp_path, monkeypatch):
    """The >2 GB path writes weights to a temp .data file first; a failure must remove it too."""
    import onnx_thinet.io.graph as graph_io

    monkeypatch.setattr(graph_io, "_EXTERNAL_DATA_THRESHOLD", 0)  # take the >2 GB path on a tiny model
    (tmp_path / "out.onnx.data").mkdir()  # the final rename of the weights fails
    with pytest.raises(OSError):
        graph_io.save_model_atomic(builders.conv_chain()[0], tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx.data"]
