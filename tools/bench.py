"""Benchmarks: solver speed on large layers, and onnxruntime latency before/after slimming.

    python tools/bench.py select                      # ThiNet greedy / OMP / LASSO / refit on big Grams
    python tools/bench.py latency ORIG.onnx SLIM.onnx # median latency ratio, same run, same machine
    python tools/bench.py memory --images 256 1024    # peak RSS of `slim` vs calibration-set size
    python tools/bench.py scale                       # VGG-16, ResNet-50 (224) and a batch-1 U-Net:
                                                      # slim time / one forward pass, peak RSS

Timings are printed, not asserted: machines here are shared and noisy, so compare ratios
measured within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_select(channels: int, samples: int, repeats: int) -> dict:
    from onnx_thinet.solve.solvers import (
        rescale_least_squares,
        select_lasso,
        select_thinet,
        select_thinet_ls,
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, channels)).astype(np.float32) * rng.uniform(0.1, 2, channels)
    start = time.perf_counter()
    gram = (x.T.astype(np.float64) @ x).astype(np.float64)
    corr = gram.sum(axis=1)
    gram_seconds = time.perf_counter() - start
    out = {"channels": channels, "samples": samples, "gram_seconds": round(gram_seconds, 4)}
    for name, fn in (
        ("thinet_greedy", lambda: select_thinet(gram, corr, float(corr.sum()), channels // 2)),
        ("thinet_ls_omp", lambda: select_thinet_ls(gram, corr, channels // 2)),
        ("lasso", lambda: select_lasso(gram, corr, channels // 2)),
        ("rescale", lambda: rescale_least_squares(gram, corr, np.arange(channels // 2))),
    ):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[f"{name}_seconds"] = round(float(np.median(times)), 4)
    return out


def bench_latency(models: list[str], batch: int, repeats: int, threads: int) -> list[dict]:
    import onnxruntime as ort

    results = []
    sessions = []
    for path in models:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [batch if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
        shape[0] = batch
        feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        sessions.append((path, session, feeds))
    for _ in range(3):  # warm up all before timing any
        for _, session, feeds in sessions:
            session.run(None, feeds)
    timings = {path: [] for path, _, _ in sessions}
    for _ in range(repeats):  # interleave so drift on a shared machine hits all models alike
        for path, session, feeds in sessions:
            start = time.perf_counter()
            session.run(None, feeds)
            timings[path].append(time.perf_counter() - start)
    base = float(np.median(timings[models[0]]))
    for path in models:
        median = float(np.median(timings[path]))
        results.append({"model": path, "batch": batch, "median_ms": round(1000 * median, 3),
                        "speedup_vs_first": round(base / median, 3)})
    return results


def bench_memory(model: str, calib: str, sizes: list[int]) -> list[dict]:
    """Peak RSS of a `slim` run as the calibration set grows (should stay flat)."""
    source = np.load(calib, mmap_mode="r")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            reps = int(np.ceil(n / len(source)))
            data = np.concatenate([source] * reps)[:n]
            path = Path(tmp) / f"calib_{n}.npy"
            np.save(path, data)
            code = (
                "import resource, numpy as np\n"
                "from onnx_thinet import slim, SlimConfig, load_model, load_calibration\n"
                f"m = load_model({model!r}); d = load_calibration({str(path)!r}, m)\n"
                "slim(m, d, SlimConfig())\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            )
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results.append({"images": n, "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1),
                            "seconds": round(time.perf_counter() - start, 2)})
    return results


# --------------------------------------------------------------------------- scale


def unet_fixed_batch(size: int = 128, depth: int = 12, levels: int = 4, base: int = 8,
                     seed: int = 0) -> "onnx.ModelProto":
    """A deep U-Net-style segmentation model as exporters write it with a fixed batch of 1.

    `levels` encoder stages of `depth` 3×3 Conv+ReLU then MaxPool, a bottleneck, and decoder
    stages (nearest Resize ×2, Concat with the skip, `depth` convs), a 1×1 head and a Reshape
    to [1, classes, H·W] with the batch written into the constant. (2·levels+1)·depth+1 convs.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, name: str, k: int = 3, relu: bool = True) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name,
                                      kernel_shape=[k, k], pads=[pad] * 4))
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    def stage(x: str, cin: int, cout: int, prefix: str) -> str:
        for i in range(depth):
            x = conv(x, cin if i == 0 else cout, cout, f"{prefix}.conv{i}")
        return x

    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up.scales"))
    x, cin, skips = "image", 3, []
    for level in range(levels):
        width = base * 2**level
        x = stage(x, cin, width, f"down{level}")
        skips.append((x, width))
        nodes.append(helper.make_node("MaxPool", [x], [f"down{level}.pool"], name=f"down{level}.pool",
                                      kernel_shape=[2, 2], strides=[2, 2]))
        x, cin = f"down{level}.pool", width
    x = stage(x, cin, base * 2**levels, "bottom")
    cin = base * 2**levels
    for level in reversed(range(levels)):
        skip, width = skips[level]
        nodes.append(helper.make_node("Resize", [x, "", "up.scales"], [f"up{level}.resize"],
                                      name=f"up{level}.resize", mode="nearest"))
        nodes.append(helper.make_node("Concat", [f"up{level}.resize", skip], [f"up{level}.cat"],
                                      name=f"up{level}.cat", axis=1))
        x = stage(f"up{level}.cat", cin + width, width, f"up{level}")
        cin = width
    classes = 4
    logits = conv(x, cin, classes, "head", k=1, relu=False)
    inits.append(numpy_helper.from_array(np.array([1, classes, size * size], np.int64), "head.shape"))
    nodes.append(helper.make_node("Reshape", [logits, "head.shape"], ["mask"], name="head.reshape"))
    graph = helper.make_graph(
        nodes, "unet_fixed_batch",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, classes, size * size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _zoo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo", Path(__file__).with_name("zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forward_seconds(model_path: Path, calib: np.ndarray, batch: int) -> float:
    """One forward pass of the calibration set through the original model (best of two)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: calib[:batch]})  # warm-up
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(calib), batch):
            session.run(None, {name: calib[i : i + batch]})
        best = min(best, time.perf_counter() - start)
    return best


def _slim_child(model_path: Path, calib_path: Path, report: Path, memory_limit: int) -> dict:
    """`onnx-thinet slim` with the defaults in a child process: wall time and peak RSS."""
    command = [sys.executable, "-m", "onnx_thinet.cli", "slim", str(model_path), "--calib", str(calib_path),
               "--output", str(report.with_suffix(".onnx")), "--report", str(report), "--force",
               "--quiet", "--device", "cpu"]
    code = ("import resource, runpy, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory_limit}, {memory_limit}))\n"
            f"sys.argv = {command[2:]!r}\n"
            "try:\n    runpy.run_module('onnx_thinet.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
            "sys.exit(code or 0)\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_KB")]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "warnings": warnings,
                "seconds": round(seconds, 1)}
    content = json.loads(report.read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(peak[0]) / 1024) if peak else None,
            "report": content}


def bench_scale(images: list[int], size: int, models: list[str], memory_limit: int) -> list[dict]:
    """Build each model, time one forward pass of the calibration set, slim it, read the profile."""
    import onnx

    zoo = _zoo()
    builders = {
        "vgg16": lambda: zoo.vgg16_tf2onnx(size=size, width=1.0),
        "resnet50": lambda: zoo.resnet50_bn_decomposed(size=size, width=1.0),
        "unet_batch1": lambda: unet_fixed_batch(),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for name in models:
            model = builders[name]()
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(path))
            del model
            loaded = onnx.load(str(path), load_external_data=False)
            batch = 1 if name == "unet_batch1" else 32
            for n in images:
                calib = zoo.calibration_for(loaded, n, seed=1).astype(np.float32)
                calib_path = Path(tmp) / f"{name}_{n}.npy"
                np.save(calib_path, calib)
                forward = _forward_seconds(path, calib, batch)
                result = _slim_child(path, calib_path, Path(tmp) / f"{name}_{n}.json", memory_limit)
                rows.append(_scale_row(name, n, forward, result))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _scale_row(name: str, images: int, forward: float, result: dict) -> dict:
    row = {"model": name, "images": images, "forward_s": round(forward, 2)}
    if "error" in result:
        return row | {"slim_s": result["seconds"], "error": result["error"], "warnings": result["warnings"]}
    report = result["report"]
    calibration = report["timings"].get("calibration", 0.0)
    return row | {
        "slim_s": result["seconds"], "ratio": round(result["seconds"] / forward, 2),
        "calibration_s": round(calibration, 1), "passes": report["forward_passes"],
        "peak_rss_mb": result["peak_rss_mb"], "flops_ratio": round(report["flops_before"] / report["flops_after"], 2),
        "output_rel_error": round(report["output_rel_error"], 4),
        "timings": report["timings"], "profile": report.get("profile", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select")
    sel.add_argument("--channels", type=int, nargs="+", default=[256, 512, 1024])
    sel.add_argument("--samples", type=int, default=100_000)
    sel.add_argument("--repeats", type=int, default=3)
    lat = sub.add_parser("latency")
    lat.add_argument("models", nargs="+")
    lat.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    lat.add_argument("--repeats", type=int, default=50)
    lat.add_argument("--threads", type=int, default=1)
    mem = sub.add_parser("memory")
    mem.add_argument("--model", default="models/fmnist_vgg.onnx")
    mem.add_argument("--calib", default="models/fmnist_calib.npy")
    mem.add_argument("--images", type=int, nargs="+", default=[256, 2048])
    scale = sub.add_parser("scale")
    scale.add_argument("--images", type=int, nargs="+", default=[64, 256])
    scale.add_argument("--size", type=int, default=224)
    scale.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "unet_batch1"])
    scale.add_argument("--memory-limit", type=int, default=8_000_000_000,
                       help="address-space limit of each slim child (bytes): a regression fails, not swaps")
    args = parser.parse_args()
    if args.command == "scale":
        bench_scale(args.images, args.size, args.models, args.memory_limit)
        return
    if args.command == "select":
        rows = [bench_select(c, args.samples, args.repeats) for c in args.channels]
    elif args.command == "latency":
        rows = [r for b in args.batch for r in bench_latency(args.models, b, args.repeats, args.threads)]
    else:
        rows = bench_memory(args.model, args.calib, args.images)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
