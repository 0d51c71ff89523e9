"""Benchmarks: solver speed on large layers, and onnxruntime latency before/after slimming.

    python tools/bench.py select                      # ThiNet greedy / OMP / LASSO / refit on big Grams
    python tools/bench.py latency ORIG.onnx SLIM.onnx # median latency ratio, same run, same machine
    python tools/bench.py memory --images 256 1024    # peak RSS of `slim` vs calibration-set size
    python tools/bench.py budgets --test T.npz        # reference models: uniform 0.5 vs --target-flops, guard
    python tools/bench.py targets --size 224          # full VGG-16: bench at keep 0.5, --target-latency 0.5
    python tools/bench.py structure --size 224        # full VGG-16 vs its keep-0.5 shapes: latency only
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
import onnx


def bench_select(channels: int, samples: int, repeats: int) -> dict:
    from onnx_thinet.solve.baselines import select_lasso
    from onnx_thinet.solve.solvers import rescale_least_squares, select_thinet, select_thinet_ls

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


def bench_latency(models: list[str], batch: int, rounds: int, threads: int | None) -> list[dict]:
    """Each model against the first with `onnx-thinet bench`'s code: one process and one session per
    model, spinning off, alternating rounds (two sessions in one process understate the gain)."""
    from onnx_thinet.check.bench import compare_latency

    results = []
    for path in models[1:]:
        c = compare_latency(models[0], path, batch=batch, threads=threads, rounds=rounds)
        if not results:
            results.append({"model": models[0], "batch": batch, "median_ms": c.first.median_ms,
                            "p90_ms": c.first.p90_ms, "speedup_vs_first": 1.0})
        results.append({"model": path, "batch": batch, "median_ms": c.second.median_ms,
                        "p90_ms": c.second.p90_ms, "speedup_vs_first": c.latency_gain})
    return results


REFERENCE = ("vgg", "resnet", "mobilenet")


def _cli(*args: str) -> None:
    """Run the CLI as a user would (this checkout's code), failing loudly."""
    import os

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    extra = ["--force", "-q"] if args[0] == "slim" else ["--force"]
    subprocess.run([sys.executable, "-m", "onnx_thinet.cli", *args, *extra], check=True, env=env)


def _accuracy(model: str, data: str, reference: str | None = None) -> dict:
    from onnx_thinet.check.evaluate import evaluate, load_labelled
    from onnx_thinet.io.graph import load_model

    candidate = load_model(model)
    dataset, labels = load_labelled(data, candidate)
    result = evaluate(candidate, dataset, labels, load_model(reference) if reference else None)
    return {"accuracy": result.accuracy, "agreement": result.top1_agreement}


def bench_budgets(out: Path, calib: str, test: str, agreement: float) -> list[dict]:
    """Reference models: uniform keep 0.5 vs --target-flops at the same FLOPs, and --min-agreement."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in REFERENCE:
        model = f"models/fmnist_{name}.onnx"
        uniform, budget, guarded = (out / f"{name}.{tag}.onnx" for tag in ("uniform", "flops", "guard"))
        _cli("slim", model, "--calib", calib, "--keep-ratio", "0.5", "-o", str(uniform), "--report", f"{uniform}.json")
        first = json.loads(Path(f"{uniform}.json").read_text())
        fraction = first["flops_after"] / first["flops_before"]
        _cli("slim", model, "--calib", calib, "--target-flops", f"{fraction:.6f}", "-o", str(budget),
             "--report", f"{budget}.json")
        _cli("slim", model, "--calib", calib, "--target-flops", "0.1", "--min-agreement", str(agreement),
             "-o", str(guarded), "--report", f"{guarded}.json")
        second = json.loads(Path(f"{budget}.json").read_text())
        third = json.loads(Path(f"{guarded}.json").read_text())
        rows.append({
            "model": name, "original": _accuracy(model, test)["accuracy"],
            "uniform_flops": round(fraction, 4), "uniform": _accuracy(str(uniform), test, model),
            "budget_flops": round(second["flops_after"] / second["flops_before"], 4),
            "budget": _accuracy(str(budget), test, model),
            "guard_flops": round(third["flops_after"] / third["flops_before"], 4),
            "guard_holdout_agreement": third["guard"]["achieved_agreement"], "guard": _accuracy(str(guarded), test, model),
        })
    return rows


def bench_structure(out: Path, size: int, threads: int | None, batches: tuple[int, ...]) -> list[dict]:
    """Full-width VGG-16 against its keep-0.5 structure (every group cut to half, no calibration).

    The cut graph has exactly the slim model's shapes, so its latency is the slim model's; this
    measures the speed side of keep 0.5 without paying for calibration.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo

    from onnx_thinet.channels.analysis import analyze
    from onnx_thinet.check.bench import bench_models
    from onnx_thinet.io.canonical import canonicalize
    from onnx_thinet.io.graph import save_model_atomic
    from onnx_thinet.planning import structure_for
    from onnx_thinet.solve.solvers import keep_count

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = canonicalize(zoo.vgg16_tf2onnx(size=size))
    keeps = {g.producer: keep_count(g.channels, 0.5) for g in analyze(model).groups}
    original, half = out / f"vgg16_{size}.onnx", out / f"vgg16_{size}.keep50_structure.onnx"
    save_model_atomic(model, original)
    save_model_atomic(structure_for(model, keeps), half)
    built = round(time.perf_counter() - start, 1)
    report = bench_models(original, half, batches, threads, "cpu")
    return [{"build_seconds": built, "groups": len(keeps), **{k: report[k] for k in ("flops_gain", "params_gain")},
             "batches": report["batches"], "threads": threads}]


def bench_targets(out: Path, size: int, images: int, reconstruct: str, threads: int | None) -> list[dict]:
    """Full-width VGG-16 at `size`: `bench` gain at keep 0.5, and where --target-latency 0.5 lands."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zoo

    out.mkdir(parents=True, exist_ok=True)
    model, calib = out / f"vgg16_{size}.onnx", out / f"vgg16_{size}_calib.npy"
    if not model.exists():
        onnx_model = zoo.vgg16_tf2onnx(size=size)
        from onnx_thinet.io.graph import save_model_atomic

        save_model_atomic(onnx_model, model)
        np.save(calib, zoo.smooth_images(images, size, layout="NHWC"))
    common = ["--calib", str(calib), "--reconstruct", reconstruct] + (["--threads", str(threads)] if threads else [])
    rows = []
    half = out / "vgg16.keep50.onnx"
    start = time.perf_counter()
    _cli("slim", str(model), "--keep-ratio", "0.5", "-o", str(half), *common)
    seconds = time.perf_counter() - start
    _cli("bench", str(model), str(half), "--report", f"{half}.bench.json", *(["--threads", str(threads)] if threads else []))
    bench = json.loads(Path(f"{half}.bench.json").read_text())["batches"][0]
    rows.append({"run": "keep 0.5", "slim_seconds": round(seconds, 1), "latency_gain": bench["latency_gain"],
                 "flops_gain": bench["flops_gain"], "original_ms": bench["original"]["median_ms"],
                 "slim_ms": bench["slim"]["median_ms"]})
    timed = out / "vgg16.latency50.onnx"
    _cli("slim", str(model), "--target-latency", "0.5", "-o", str(timed), "--report", f"{timed}.json", *common)
    _cli("bench", str(model), str(timed), "--report", f"{timed}.bench.json", *(["--threads", str(threads)] if threads else []))
    bench = json.loads(Path(f"{timed}.bench.json").read_text())["batches"][0]
    planned = json.loads(Path(f"{timed}.json").read_text())["budget"]["latency"]
    rows.append({"run": "target-latency 0.5", "measured_fraction": round(1 / bench["latency_gain"], 4),
                 "within_10_percent": abs(1 / bench["latency_gain"] / 0.5 - 1) <= 0.1,
                 "planned_measured_fraction": planned["measured_fraction"], "flops_gain": bench["flops_gain"]})
    return rows


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
                "import numpy as np\n"
                "from onnx_thinet import slim, SlimConfig, load_model, load_calibration\n"
                f"m = load_model({model!r}); d = load_calibration({str(path)!r}, m)\n"
                "slim(m, d, SlimConfig())\n"
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
            )
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results.append({"images": n, "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1),
                            "seconds": round(time.perf_counter() - start, 2)})
    return results


# --------------------------------------------------------------------------- scale


def unet_fixed_batch(size: int = 128, depth: int = 12, levels: int = 4, base: int = 8,
                     seed: int = 0) -> onnx.ModelProto:
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
            # VmHWM, not ru_maxrss: the latter keeps the parent's size from before the exec
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "print('PEAK_KB', hwm[0], flush=True)\n"
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
    lat.add_argument("--rounds", type=int, default=12)
    lat.add_argument("--threads", type=int, default=None)
    bud = sub.add_parser("budgets", help="reference models: uniform vs --target-flops, and --min-agreement")
    bud.add_argument("--out", type=Path, default=Path("/tmp/budgets"))
    bud.add_argument("--calib", default="models/fmnist_calib.npy")
    bud.add_argument("--test", default="models/fmnist_test_1k.npz", help=".npz with x, y (tools/fmnist.py exports the full test set)")
    bud.add_argument("--min-agreement", type=float, default=0.95)
    tgt = sub.add_parser("targets", help="full-width VGG-16: bench at keep 0.5, --target-latency 0.5")
    tgt.add_argument("--out", type=Path, default=Path("/tmp/vgg16_targets"))
    tgt.add_argument("--size", type=int, default=224)
    tgt.add_argument("--images", type=int, default=64)
    tgt.add_argument("--reconstruct", default="full")
    tgt.add_argument("--threads", type=int, default=None)
    st = sub.add_parser("structure", help="full-width VGG-16 vs its keep-0.5 structure: latency only")
    st.add_argument("--out", type=Path, default=Path("/tmp/vgg16_structure"))
    st.add_argument("--size", type=int, default=224)
    st.add_argument("--threads", type=int, default=None)
    st.add_argument("--batch", type=int, nargs="+", default=[1])
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
        rows = [r for b in args.batch for r in bench_latency(args.models, b, args.rounds, args.threads)]
    elif args.command == "budgets":
        rows = bench_budgets(args.out, args.calib, args.test, args.min_agreement)
    elif args.command == "structure":
        rows = bench_structure(args.out, args.size, args.threads, tuple(args.batch))
    elif args.command == "targets":
        rows = bench_targets(args.out, args.size, args.images, args.reconstruct, args.threads)
    else:
        rows = bench_memory(args.model, args.calib, args.images)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
