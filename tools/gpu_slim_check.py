"""How much faster `slim` runs with `--device cuda`: VGG-16 (and ResNet-50) at 224, CPU vs CUDA.

Self-contained, for a machine with an NVIDIA GPU and onnxruntime-gpu installed:

    pip install onnxruntime-gpu==1.31.1      # replaces the CPU wheel's provider list
    python tools/gpu_slim_check.py           # ~5 minutes; --models vgg16 resnet50, --images 64

Builds the models with tools/zoo.py when torch is installed (else a torch-free VGG-16 of the
same shape), times one forward pass of the calibration set on each device, slims with
`--device cpu` and `--device cuda` in child processes, and prints one JSON line per run with
the wall time, the execution providers the run really used (from the report) and where the
time went. Exit 1 when the CUDA run did not use CUDAExecutionProvider.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _zoo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vgg16_plain(size: int = 224, seed: int = 0):
    """VGG-16 (13 3×3 convs, FC 4096-4096-1000) with He-initialised weights, NCHW, no torch."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x, cin = [], [], "input", 3

    def param(name, shape, fan_in):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name))
        return name

    for i, v in enumerate((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                           512, 512, 512, "M")):
        if v == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], name=f"pool{i}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
            continue
        w, b = param(f"conv{i}.w", (v, cin, 3, 3), cin * 9), param(f"conv{i}.b", (v,), 1e4)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", pads=[1] * 4,
                                      kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x, cin = f"relu{i}", v
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    x, width = "flat", cin * (size // 32) ** 2
    for j, out in enumerate((4096, 4096, 1000)):
        w, b = param(f"fc{j}.w", (out, width), width), param(f"fc{j}.b", (out,), 1e4)
        nodes.append(helper.make_node("Gemm", [x, w, b], [f"fc{j}"], name=f"fc{j}", transB=1))
        x, width = f"fc{j}", out
        if j < 2:
            nodes.append(helper.make_node("Relu", [x], [f"fc{j}.relu"], name=f"fc{j}.relu"))
            x = f"fc{j}.relu"
    graph = helper.make_graph(nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1000])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(name: str, size: int):
    try:
        import torch  # noqa: F401
    except ImportError:
        if name != "vgg16":
            return None
        return vgg16_plain(size)
    zoo = _zoo()
    return zoo.vgg16_tf2onnx(size=size) if name == "vgg16" else zoo.resnet50_bn_decomposed(size=size)


def calibration(model, images: int) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    shape = [images, *dims[1:]]
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def forward_seconds(path: Path, calib: np.ndarray, provider: str) -> tuple[float, list[str]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: calib[:32]})
    start = time.perf_counter()
    for i in range(0, len(calib), 32):
        session.run(None, {name: calib[i : i + 32]})
    return time.perf_counter() - start, session.get_providers()


def slim_seconds(path: Path, calib_path: Path, device: str, out: Path, timeout: float) -> dict:
    report = out.with_suffix(f".{device}.json")
    command = [sys.executable, "-m", "onnx_thinet.cli", "slim", str(path), "--calib", str(calib_path),
               "--output", str(out.with_suffix(f".{device}.onnx")), "--report", str(report),
               "--force", "--device", device]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # the progress lines say how far it got
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return {"device": device, "error": f"not finished in {timeout:.0f} s", "last_lines": tail}
    seconds = time.perf_counter() - start
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line or "error" in line]
    if done.returncode:
        return {"device": device, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    content = json.loads(report.read_text())
    return {"device": device, "slim_s": round(seconds, 1), "providers": content.get("providers"),
            "profile": content.get("profile"), "output_rel_error": round(content["output_rel_error"], 4),
            "warnings": warnings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per slim run")
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"], help="slim on these, in order")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort

    print(json.dumps({"onnxruntime": ort.__version__, "available": ort.get_available_providers()}), flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-slim-") as tmp:
        for name in args.models:
            model = build(name, args.size)
            if model is None:
                print(json.dumps({"model": name, "skipped": "needs torch to build"}), flush=True)
                continue
            path, calib_path = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.npy"
            onnx.save(model, str(path))
            calib = calibration(model, args.images)
            np.save(calib_path, calib)
            del model
            for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
                seconds, used = forward_seconds(path, calib, provider)
                print(json.dumps({"model": name, "forward": provider, "seconds": round(seconds, 2),
                                  "providers": used}), flush=True)
            for device in args.devices:
                row = slim_seconds(path, calib_path, device, Path(tmp) / name, args.timeout)
                print(json.dumps({"model": name, "images": args.images} | row), flush=True)
                if device == "cuda" and "CUDAExecutionProvider" not in (row.get("providers") or []):
                    ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
