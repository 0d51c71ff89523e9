"""Slim with BLAS threads sized to each layer (the default) and with every thread everywhere.

    python3 tools/blas_threads_check.py [--images 64] [--repeats 2]

Builds the 109-conv batch-1 U-Net of `tools/bench.py scale` and, when torch is installed, the
full-width ResNet-50 of `tools/zoo.py`; slims each with `--device cpu` in child processes,
alternating the two policies (`all` patches `solve.threads.PARALLEL_UNKNOWNS` to 0), and prints
one JSON line per run: wall time, where the time went, and the held-out output error (the two
policies must give the same model). Written for comparing machines with few and many cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

import bench  # noqa: E402  (tools/bench.py, found through the path above)


def _slim(model: Path, calib: Path, policy: str, out: Path) -> dict:
    patch = "import onnx_thinet.solve.threads as t; t.PARALLEL_UNKNOWNS = 0\n" if policy == "all" else ""
    report = out / f"{model.stem}_{policy}.json"
    argv = ["onnx-thinet", "slim", str(model), "--calib", str(calib), "-o", str(out / f"{model.stem}_{policy}.onnx"),
            "--report", str(report), "--force", "-q", "--device", "cpu"]
    code = f"import sys, runpy\n{patch}sys.argv = {argv!r}\nrunpy.run_module('onnx_thinet.cli', run_name='__main__')\n"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TOOLS.parent)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    content = json.loads(report.read_text())
    return {"slim_s": round(seconds, 1), "profile": content["profile"], "output_rel_error": content["output_rel_error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    zoo = bench._zoo()
    builders = {"unet_batch1": bench.unet_fixed_batch}
    try:
        import torch  # noqa: F401

        builders["resnet50"] = lambda: zoo.resnet50_bn_decomposed(size=224, width=1.0)
    except ImportError:
        print("torch is not installed: the U-Net only", file=sys.stderr)
    print(json.dumps({"cores": os.cpu_count()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="blas-threads-") as tmp:
        out = Path(tmp)
        for name, build in builders.items():
            model = build()
            path, calib = out / f"{name}.onnx", out / f"{name}_{args.images}.npy"
            onnx.save(model, str(path))
            np.save(calib, zoo.calibration_for(model, args.images, seed=1).astype(np.float32))
            for _ in range(args.repeats):
                for policy in ("all", "sized"):
                    print(json.dumps({"model": name, "policy": policy} | _slim(path, calib, policy, out)), flush=True)


if __name__ == "__main__":
    main()
