"""A model over 2 GB (protobuf's limit) slims with external data in and out.

The bulk is one 2.16 GB initializer read by a Gather of one element (a trivially computed
branch), so the test costs memory but little arithmetic or disk (the input's data file is
sparse). It reads 2 GB, so it runs only with ONNX_THINET_LARGE_TESTS=1 (and enough free disk
and memory); run it alone (onnxruntime reserves address space: under a 14 GB `prlimit --as` its
session fails to allocate; 22 GB passes, 2 min on 2 cores):

    ONNX_THINET_LARGE_TESTS=1 prlimit --as=22000000000 python3 -m pytest -q tests/test_large_model.py

The loader checks the file by path, shape inference runs on a weightless copy and onnxruntime
sessions take the weights in memory, so nothing serializes the 2 GB; the optimizers that must
serialize (onnx-simplifier, onnxruntime's optimizer writing its result) are skipped, and say so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_thinet.cli import app
from tests import builders

BIG_ELEMENTS = 540_000_000  # 2.16 GB of float32
NEEDED_DISK = 2 * 4 * BIG_ELEMENTS  # the output's data file (the input's is sparse), and slack
NEEDED_MEMORY = 4 * 4 * BIG_ELEMENTS


def _free_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


def _large_model(folder: Path) -> Path:
    """conv_chain + Gather(big, [0]) added to its output, `big` an external tensor in a sparse
    file (zeros but its first element), so building it costs neither memory nor disk."""
    model, _ = builders.conv_chain()
    graph = model.graph
    out = graph.output[0].name
    graph.node[-1].output[0] = "features"
    data = folder / "large.onnx.data"
    with open(data, "wb") as f:
        f.write(np.float32(0.5).tobytes())
        f.truncate(4 * BIG_ELEMENTS)
    big = graph.initializer.add()
    big.name, big.data_type, big.data_location = "big", TensorProto.FLOAT, TensorProto.EXTERNAL
    big.dims.append(BIG_ELEMENTS)
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(4 * BIG_ELEMENTS))):
        big.external_data.add(key=key, value=value)
    # the index is computed from the data (always 0), so no optimizer can fold `big` away
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    graph.node.extend([
        helper.make_node("ReduceMax", ["features"], ["peak"], name="peak", keepdims=0),
        helper.make_node("Mul", ["peak", "zero"], ["nothing"], name="nothing"),
        helper.make_node("Cast", ["nothing"], ["first"], name="first", to=TensorProto.INT64),
        helper.make_node("Gather", ["big", "first"], ["offset"], name="gather", axis=0),
        helper.make_node("Add", ["features", "offset"], [out], name="add_offset"),
    ])
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.skipif(os.environ.get("ONNX_THINET_LARGE_TESTS") != "1",
                    reason="reads a 2 GB model: set ONNX_THINET_LARGE_TESTS=1 to run it")
@pytest.mark.skipif(shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free < NEEDED_DISK,
                    reason=f"needs {NEEDED_DISK / 2**30:.0f} GiB of free disk for a >2 GB model")
@pytest.mark.skipif(_free_memory() < NEEDED_MEMORY,
                    reason=f"needs {NEEDED_MEMORY / 2**30:.0f} GiB of available memory for a >2 GB model")
def test_model_over_2gb_slims_with_external_data_in_and_out(tmp_path):
    model_path = _large_model(tmp_path)
    x = builders.calibration(builders.conv_chain()[0], n=32)
    np.save(tmp_path / "calib.npy", x)
    out = tmp_path / "large.slim.onnx"
    result = CliRunner().invoke(app, ["slim", str(model_path), "--calib", str(tmp_path / "calib.npy"),
                                      "--output", str(out), "--quiet", "--max-memory", "12G"])
    assert result.exit_code == 0, result.output
    assert out.with_name(out.name + ".data").stat().st_size > 2 * 10**9
    assert out.stat().st_size < 10**6  # the graph itself; weights live in the .data file
    slim_model = onnx.load(out, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in slim_model.graph.initializer
               if t.name == "big")
    onnx.checker.check_model(str(out), full_check=True)
