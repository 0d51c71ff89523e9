"""Benchmarks: solver speed on large layers, and onnxruntime latency before/after slimming.

    python tools/bench.py select                      # ThiNet greedy / OMP / LASSO / refit on big Grams
    python tools/bench.py latency ORIG.onnx SLIM.onnx # median latency ratio, same run, same machine
    python tools/bench.py memory --images 256 1024    # peak RSS of `slim` vs calibration-set size

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
    args = parser.parse_args()
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
