"""Time the graph-side work of `slim` on one model: everything that copies, infers or re-reads it.

    python tools/graphcost.py MODEL.onnx

Prints seconds for loading (with the checker and validation), canonicalization (onnxsim,
onnxruntime's basic optimizer and their output probes), channel analysis, one pass's shape
inference, the FLOP count, and the process's peak RSS. No calibration is run, so this is quick
even for VGG-16 at 224; compare two code versions back to back on the same machine.
"""

from __future__ import annotations

import argparse
import resource
import time


def _timed(name: str, work):
    start = time.perf_counter()
    result = work()
    print(f"{name:34s} {time.perf_counter() - start:7.2f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    args = parser.parse_args()

    from onnx_thinet.channels.analysis import analyze
    from onnx_thinet.check.metrics import total_flops
    from onnx_thinet.io.canonical import canonicalize_steps
    from onnx_thinet.io.graph import infer_shapes, load_model

    model = _timed("load_model", lambda: load_model(args.model))
    canonical, steps = _timed("canonicalize_steps", lambda: canonicalize_steps(model))
    for step in steps:
        print(f"  {step.step}: {'applied' if step.applied else 'skipped: ' + str(step.reason)}")
    analysis = _timed("analyze", lambda: analyze(canonical))
    print(f"  {len(analysis.groups)} prunable groups")
    _timed("infer_shapes (copy)", lambda: infer_shapes(canonical))
    try:  # what one pass does: in place since branch graphcost
        _timed("infer_shapes (one pass, in place)", lambda: infer_shapes(canonical, in_place=True))
    except TypeError:  # older code: every pass inferred on a serialized copy
        _timed("infer_shapes (one pass, copy)", lambda: infer_shapes(canonical))
    first = canonical.graph.input[0]
    shape = tuple(d.dim_value or 1 for d in first.type.tensor_type.shape.dim)
    _timed("total_flops", lambda: total_flops(canonical, {first.name: shape}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB, as /usr/bin/time -v reports
    print(f"peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
