"""Budgeted slimming: plan keep counts for a FLOPs/params/latency target, and the accuracy guard.

A budget is one number, so every run is a point on one axis: `strength` s ∈ [0, 1] where 0 is
the budget as asked and 1 is no pruning. The guard (`--min-agreement`, `--max-error`) bisects
s until the held-out check holds, so the result prunes as far as the budget allows without
crossing it. `--target-latency` first finds, by measuring planned structures, the FLOPs
fraction whose latency is the asked fraction of the original's.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_thinet.channels.analysis import analyze
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.canonical import canonicalize
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.planning import Plan, error_curves, plan_keeps, structure_for
from onnx_thinet.solve.solvers import keep_count

__all__ = ["GUARD_STEPS", "bench_device", "slim_budgeted", "validate_budget"]

logger = logging.getLogger(__name__)

GUARD_STEPS = 5  # bisection steps of the guard: the strength is found to 1/32 of the budget
PLAN_IMAGES = 128  # calibration images behind the error curves
PROBES = (0.25, 0.5)  # keep ratios at which each group alone is pruned to measure output error
LATENCY_TRIES = 4
LATENCY_TOLERANCE = 0.05


def validate_budget(config) -> None:
    """The budget flags' ranges, and the combinations that make sense."""
    targets = [(n, v) for n, v in (("target_flops", config.target_flops), ("target_params", config.target_params),
                                   ("target_latency", config.target_latency)) if v is not None]
    if len(targets) > 1:
        names = tuple(n for n, _ in targets)
        raise ThinetError(f"give one budget, not {' and '.join(names)}", params=names)
    for name, value in targets:
        if not 0.0 < value <= 1.0:
            raise ThinetError(f"{name} must be in (0, 1], a fraction of the original (got {value})", params=(name,))
    if config.min_agreement is not None and not 0.0 <= config.min_agreement <= 1.0:
        raise ThinetError(f"min_agreement must be in [0, 1] (got {config.min_agreement})", params=("min_agreement",))
    if config.max_error is not None and config.max_error < 0:
        raise ThinetError(f"max_error must be non-negative (got {config.max_error})", params=("max_error",))
    if config.round_to < 1:
        raise ThinetError("round_to must be at least 1", params=("round_to",))
    if config.threads is not None and config.threads < 1:
        raise ThinetError("threads must be at least 1", params=("threads",))
    guarded = config.min_agreement is not None or config.max_error is not None
    if (targets or guarded) and (config.finetune_steps or config.holdout <= 0):
        raise ThinetError("budgets and guards need holdout > 0 and no finetune_steps",
                          params=("holdout", "finetune_steps"))


@dataclass
class _Budget:
    """Maps a strength to keep counts: a planned cost fraction, or a uniform keep ratio."""

    canonical: onnx.ModelProto
    groups: tuple
    curves: list | None
    shapes: dict
    target: str | None  # "flops" | "params" | None (uniform --keep-ratio)
    fraction: float  # the asked cost fraction, or the keep ratio
    multiple: int

    def plan(self, strength: float) -> tuple[dict[str, int], Plan | None]:
        value = self.fraction + strength * (1.0 - self.fraction)
        if self.target is None:
            return {g.producer: keep_count(g.channels, value, self.multiple) for g in self.groups}, None
        plan = plan_keeps(self.canonical, self.groups, self.curves, self.shapes, self.target, value, self.multiple)
        return dict(plan.keeps), plan


def slim_budgeted(model: onnx.ModelProto, data: CalibrationData, config, progress=None):
    """`slim` for a budget and/or a guard: plan, run, check, and relax while the guard fails."""
    from onnx_thinet.slim import _chosen_groups, slim, split_holdout

    clock = time.perf_counter()
    canonical = canonicalize(model, simplify=config.simplify)
    analysis = analyze(canonical, prune_coupled=config.prune_coupled)
    if not analysis.groups:
        return slim(model, data, dataclasses.replace(config, keep_counts=()))  # raises: nothing prunable
    groups = _chosen_groups(analysis, config.only)
    train, _ = split_holdout(len(data), config.holdout, config.seed)
    budget = _make_budget(model, canonical, groups, data, train, config)
    planning = time.perf_counter() - clock
    latency = None
    if config.target_latency is not None:
        budget, latency = _latency_search(model, budget, config)

    def run(strength: float):
        keeps, plan = budget.plan(strength)
        result = slim(model, data, dataclasses.replace(config, keep_counts=tuple(keeps.items())), progress)
        result.budget = _budget_report(budget, plan, result, strength, latency)
        result.timings["planning"] = planning
        return result

    guarded = config.min_agreement is not None or config.max_error is not None
    return _guard_search(run, config) if guarded else run(0.0)


def _make_budget(model, canonical, groups, data, train, config) -> _Budget:
    from onnx_thinet.slim import _sample_shapes

    multiple = max(config.round_to, config.channel_multiple)
    target = ("flops" if config.target_flops is not None or config.target_latency is not None
              else "params" if config.target_params is not None else None)
    if target is None:
        return _Budget(canonical, groups, None, {}, None, config.keep_ratio, multiple)
    images = train[np.random.default_rng(config.seed).permutation(len(train))[:PLAN_IMAGES]]
    impacts = _probe_impacts(model, data, groups, config)
    curves = error_curves(canonical, groups, data, np.sort(images), config.batch_size, config.device, config.seed,
                          impacts)
    fraction = config.target_params if target == "params" else config.target_flops or config.target_latency
    return _Budget(canonical, groups, curves, _sample_shapes(data), target, fraction, multiple)


def _probe_impacts(model, data, groups, config) -> list[dict[float, float]]:
    """Held-out output error of the real pipeline with each group alone pruned to each PROBES ratio.

    This is what turns each layer's reconstruction-error curve into output error, with the
    reconstruction and error correction the final run will use (label-free sensitivity).
    """
    from onnx_thinet.slim import slim

    probe = dataclasses.replace(config, keep_ratio=0.5, keep_counts=(), target_flops=None, target_params=None,
                                target_latency=None, min_agreement=None, max_error=None)
    impacts = []
    for group in groups:
        impacts.append({ratio: slim(model, data, dataclasses.replace(probe, keep_ratio=ratio, only=(group.producer,)))
                        .verification.rel_error for ratio in PROBES})
    return impacts


def _guard_passes(result, config) -> bool:
    v = result.verification
    if config.min_agreement is not None:
        if v.top1_agreement is None:
            raise ThinetError("min_agreement needs a classifier output (N x classes) to compare top-1 "
                              "answers; this model has none: use max_error", params=("min_agreement", "max_error"))
        if v.top1_agreement < config.min_agreement:
            return False
    return config.max_error is None or v.rel_error <= config.max_error


def _guard_search(run, config):
    """Bisect the strength: the least relaxed run whose held-out check holds (s = 1: no pruning)."""
    tries = []

    def attempt(strength: float):
        result = run(strength)
        passed = _guard_passes(result, config)
        v = result.verification
        tries.append({"strength": round(strength, 5), "flops_fraction": round(result.flops_after / result.flops_before, 4),
                      "top1_agreement": v.top1_agreement, "rel_error": v.rel_error, "passed": passed})
        return result, passed

    best, passed = attempt(0.0)
    low, high = 0.0, 1.0
    if not passed:
        best = None
        for _ in range(GUARD_STEPS):
            mid = (low + high) / 2
            result, ok = attempt(mid)
            if ok:
                high, best = mid, result
            else:
                low = mid
        if best is None:
            best, _ = attempt(1.0)
    best.guard = _guard_report(best, config, tries, reached=passed)
    return best


def _guard_report(result, config, tries, reached: bool) -> dict:
    v = result.verification
    if reached:
        stopped = "the budget: the guard held there"
    elif result.flops_after >= result.flops_before:
        stopped = "nothing: every pruned run crossed the guard, the model is left whole"
    else:
        stopped = (f"{result.flops_after / result.flops_before:.1%} of the FLOPs: pruning further "
                   f"crossed the guard (budget asked {tries[0]['flops_fraction']:.1%})")
    return {"min_agreement": config.min_agreement, "max_error": config.max_error,
            "achieved_agreement": v.top1_agreement, "achieved_error": v.rel_error,
            "holdout_samples": v.samples, "budget_reached": reached, "stopped_at": stopped, "tries": tries}


def _budget_report(budget: _Budget, plan: Plan | None, result, strength: float, latency: dict | None) -> dict:
    report = {
        "target": budget.target or "keep_ratio",
        "asked": budget.fraction,
        "strength": round(strength, 5),
        "flops_fraction": round(result.flops_after / result.flops_before, 4),
        "params_fraction": round(result.params_after / result.params_before, 4),
    }
    if plan is not None:
        report |= {"planned_fraction": round(plan.allocation.cost_fraction, 4),
                   "reached": plan.allocation.reached, "layers": plan.layers()}
    if latency is not None:
        report["latency"] = latency
    return report


def _latency_search(model: onnx.ModelProto, budget: _Budget, config) -> tuple[_Budget, dict]:
    """Find the FLOPs fraction whose planned structure measures `target_latency` of the original.

    Each try cuts the graph to the plan's widths (no calibration: same shapes as the slim model)
    and times it against the original with `check.bench` (separate processes, alternating).
    """
    from onnx_thinet.check.bench import compare_latency

    asked = config.target_latency
    fraction, tries = asked, []
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "original.onnx"
        onnx.save(budget.canonical, original)
        for attempt in range(LATENCY_TRIES):
            trial = dataclasses.replace(budget, fraction=fraction)
            keeps, _ = trial.plan(0.0)
            candidate = Path(tmp) / f"plan{attempt}.onnx"
            onnx.save(structure_for(budget.canonical, keeps, config.prune_coupled), candidate)
            timing = compare_latency(original, candidate, batch=1, threads=config.threads,
                                     device=bench_device(config.device))
            measured = 1.0 / timing.latency_gain
            tries.append({"flops_fraction": round(fraction, 4), "latency_fraction": round(measured, 4),
                          "original_ms": timing.first.median_ms, "plan_ms": timing.second.median_ms})
            if abs(measured / asked - 1.0) <= LATENCY_TOLERANCE:
                break
            fraction = float(np.clip(fraction * asked / measured, 0.01, 1.0))
    best = min(tries, key=lambda t: abs(t["latency_fraction"] / asked - 1.0))
    report = {"asked": asked, "flops_fraction": best["flops_fraction"], "measured_fraction": best["latency_fraction"],
              "within_10_percent": abs(best["latency_fraction"] / asked - 1.0) <= 0.1, "tries": tries}
    return dataclasses.replace(budget, fraction=best["flops_fraction"]), report


def bench_device(device: str) -> str:
    """The `bench` device for a slim `--device` (auto: CUDA when onnxruntime has it)."""
    from onnx_thinet.calibration.runtime import providers_for

    return "cuda" if providers_for(device)[0] == "CUDAExecutionProvider" else "cpu"
