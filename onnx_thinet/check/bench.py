"""Latency of two models measured in isolation, and their FLOPs and params beside it.

Each model runs in its own process with one onnxruntime session whose intra-op threads do not
spin: two sessions in one process (or spinning threads of an idle one) slow each other, which
understated a x3.9 gain as x2.5. The parent process alternates rounds between the two workers,
switching which goes first, so drift of a shared machine hits both alike.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from onnx_thinet.errors import ThinetError

__all__ = ["LatencyComparison", "Timing", "bench_models", "compare_latency"]

ROUNDS = 12
ROUND_SECONDS = 0.25  # each round runs about this long per model (at least one run)
WARMUP = 3


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    throughput: float  # samples per second at the median latency
    runs: int


@dataclass(frozen=True)
class LatencyComparison:
    batch: int
    first: Timing
    second: Timing
    latency_gain: float  # first's median latency / second's
    throughput_gain: float


def _session(path: str, threads: int | None, device: str):
    import onnxruntime as ort

    from onnx_thinet.calibration.runtime import providers_for

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or 0
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=providers_for(device))


def _feeds(session, batch: int) -> dict[str, np.ndarray]:
    """Seeded random inputs; the batch axis takes `batch`, every other axis must be fixed."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        shape = list(inp.shape)
        if shape and not (isinstance(shape[0], int) and shape[0] > 0):
            shape[0] = batch
        elif shape and shape[0] != batch:
            raise ThinetError(f"input {inp.name!r} has a fixed batch of {shape[0]}; bench it with --batch {shape[0]}")
        if any(not (isinstance(d, int) and d > 0) for d in shape):
            raise ThinetError(f"input {inp.name!r} has dynamic dims {inp.shape} beyond the batch: bench needs fixed sizes")
        dtype = types.get(inp.type, np.float32)
        feeds[inp.name] = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating)
                           else rng.integers(0, 2, size=shape)).astype(dtype)
    return feeds


def _worker(path: str, batch: int, threads: int | None, device: str, conn) -> None:
    """One model, one session: warm up, then run as many timed calls as each request asks."""
    try:
        session = _session(path, threads, device)
        feeds = _feeds(session, batch)
        for _ in range(WARMUP):
            session.run(None, feeds)
    except Exception as exc:  # reported to the parent as one line
        conn.send(("error", f"{Path(path).name}: {exc}"))
        return
    conn.send(("ready", None))
    while (count := conn.recv()) is not None:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        conn.send(("times", times))


class _Worker:
    def __init__(self, path: str, batch: int, threads: int | None, device: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(str(path), batch, threads, device, child), daemon=True)
        self.process.start()
        child.close()
        self.times: list[float] = []

    def expect(self, kind: str):
        if not self.conn.poll(600):
            raise ThinetError("bench: a model took over 10 minutes to answer")
        got, value = self.conn.recv()
        if got == "error":
            raise ThinetError(f"bench: {value}")
        return value

    def run(self, count: int) -> None:
        self.conn.send(count)
        self.times.extend(self.expect("times"))

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()


def _timing(times: list[float], batch: int) -> Timing:
    median = float(np.median(times))
    return Timing(round(1000 * median, 4), round(1000 * float(np.percentile(times, 90)), 4),
                  round(batch / median, 2), len(times))


def compare_latency(first: str | Path, second: str | Path, batch: int = 1, threads: int | None = None,
                    device: str = "cpu", rounds: int = ROUNDS) -> LatencyComparison:
    """Median and p90 latency of two model files, each in its own process, in alternating rounds."""
    workers = [_Worker(str(first), batch, threads, device), _Worker(str(second), batch, threads, device)]
    try:
        for w in workers:
            w.expect("ready")
        for w in workers:  # one timed call each sizes the rounds
            w.run(1)
        counts = [max(1, min(200, int(ROUND_SECONDS / max(w.times[0], 1e-6)))) for w in workers]
        for w in workers:
            w.times.clear()
        for r in range(rounds):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                workers[k].run(counts[k])
        a, b = (_timing(w.times, batch) for w in workers)
    finally:
        for w in workers:
            w.close()
    return LatencyComparison(batch, a, b, round(a.median_ms / b.median_ms, 4), round(b.throughput / a.throughput, 4))


def bench_models(original: str | Path, slim: str | Path, batches: tuple[int, ...] = (1,),
                 threads: int | None = None, device: str = "cpu", rounds: int = ROUNDS) -> dict:
    """The `bench` report: per batch size, latency and throughput of both, gains beside FLOPs gain."""
    from onnx_thinet.check.metrics import count_params, total_flops
    from onnx_thinet.io.graph import load_model

    models = [load_model(original), load_model(slim)]
    flops = [total_flops(m) for m in models]
    params = [count_params(m) for m in models]
    flops_gain = round(flops[0] / max(flops[1], 1), 4)
    rows = []
    for batch in batches:
        c = compare_latency(original, slim, batch, threads, device, rounds)
        rows.append({"batch": batch, "original": asdict(c.first), "slim": asdict(c.second),
                     "latency_gain": c.latency_gain, "throughput_gain": c.throughput_gain,
                     "flops_gain": flops_gain})
    return {
        "original": str(original), "slim": str(slim), "device": device, "threads": threads,
        "rounds": rounds, "isolation": "one process and one session per model, spinning off, alternating rounds",
        "flops_per_sample": {"original": flops[0], "slim": flops[1]},
        "params": {"original": params[0], "slim": params[1]},
        "flops_gain": flops_gain, "params_gain": round(params[0] / max(params[1], 1), 4),
        "batches": rows,
    }
