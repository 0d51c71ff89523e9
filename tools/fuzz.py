"""Fuzz onnx-thinet with thousands of random CNN graphs and count what happens.

Each graph (tests/fuzzgraphs.py, seed = its number) is slimmed and checked as in
tests/test_fuzz.py (tests/fuzzcheck.py): full checker, onnxruntime at two batch sizes with the
original's shapes and interface, keep 1.0 identical, planted redundancy recovered, export-torch
round trip. Failing graphs are saved as OUT/seed<N>.onnx with OUT/seed<N>.txt saying why.

    python tools/fuzz.py --examples 1000 --out /tmp/fuzz       # from the repository root
    python tools/fuzz.py --examples 200 --start 5000 --no-torch

Prints running counts every 50 graphs and a JSON summary at the end (also OUT/summary.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: tests/ helpers

from tests.fuzzcheck import INVALID_KINDS, check_case  # noqa: E402
from tests.fuzzgraphs import RngChooser, build_case  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="graphs to generate")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="failing graphs go here")
    parser.add_argument("--no-torch", action="store_true", help="skip the export-torch round trip")
    return parser.parse_args()


def _summary(counts: Counter, failures: Counter, blocks: Counter, refusals: Counter, torch: Counter,
             seconds: float) -> dict:
    return {
        "graphs": counts["graphs"], "slimmed": counts["slimmed"], "groups_pruned": counts["groups"],
        "planted": counts["planted"], "failing_graphs": counts["failing"],
        "invalid_outputs": sum(failures[k] for k in INVALID_KINDS),
        "tool_errors": failures["internal-error"] + failures["crash"],
        "failures_by_kind": dict(failures), "refusals": dict(refusals), "torch": dict(torch),
        "blocks": dict(blocks), "seconds": round(seconds, 1),
    }


def main() -> int:
    args = _parse()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    counts, failures, blocks, refusals, torch = Counter(), Counter(), Counter(), Counter(), Counter()
    clock = time.perf_counter()
    for seed in range(args.start, args.start + args.examples):
        case = build_case(RngChooser(seed))
        outcome = check_case(case, torch=not args.no_torch)
        counts.update(graphs=1, slimmed=int(outcome.slimmed), groups=outcome.groups_pruned,
                      planted=int(case.planted is not None), failing=int(bool(outcome.failures)))
        blocks.update(case.blocks)
        torch[outcome.torch.split(":")[0]] += 1
        if outcome.refused:
            refusals[outcome.refused] += 1
        failures.update(kind for kind, _ in outcome.failures)
        if outcome.failures:
            onnx.save(case.model, args.out / f"seed{seed}.onnx")
            lines = [f"seed {seed} opset {case.opset} blocks {case.blocks} planted {case.planted} "
                     f"prune_coupled {case.prune_coupled}"] + [f"{k}: {d}" for k, d in outcome.failures]
            (args.out / f"seed{seed}.txt").write_text("\n".join(lines) + "\n")
            print(f"seed {seed}: " + "; ".join(f"{k}: {d.splitlines()[0][:160]}" for k, d in outcome.failures),
                  flush=True)
        if counts["graphs"] % 50 == 0:  # a run stopped early keeps its counts
            summary = _summary(counts, failures, blocks, refusals, torch, time.perf_counter() - clock)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(json.dumps(summary), flush=True)
    summary = _summary(counts, failures, blocks, refusals, torch, time.perf_counter() - clock)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 1 if summary["failing_graphs"] else 0


if __name__ == "__main__":
    sys.exit(main())
