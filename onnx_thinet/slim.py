"""The slimming pipeline: canonicalize, analyse, calibrate layer by layer, rewrite, verify.

The options and results live in `onnx_thinet.slim_types`, the pass loop in
`onnx_thinet.slim_passes`; this module runs them in order and stays the public entry point.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from onnx_thinet.calibration.plan import MemoryPlan, machine_memory, plan_memory
from onnx_thinet.calibration.runtime import session_providers
from onnx_thinet.calibration.segments import fixed_batch
from onnx_thinet.channels.analysis import Analysis, analyze, quantization_refusal
from onnx_thinet.channels.layout import ChannelGroup
from onnx_thinet.check.metrics import count_params, total_flops
from onnx_thinet.check.verify import OutputComparison, check_model, compare_outputs, output_warnings
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.canonical import CanonicalStep, canonicalize_steps
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.io.graph import infer_shapes, preserve_interface
from onnx_thinet.slim_passes import prune_in_passes, schedule_waves
from onnx_thinet.slim_types import (
    GroupResult,
    PassInfo,
    PassProgress,
    Progress,
    SlimConfig,
    SlimResult,
)

__all__ = [
    "GroupResult",
    "PassInfo",
    "SlimConfig",
    "SlimResult",
    "schedule_waves",
    "slim",
    "split_holdout",
]

logger = logging.getLogger(__name__)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 and set aside `fraction` (at least one image when n ≥ 2) for verification.

    With a single image there is nothing to hold out; it then serves both purposes.
    """
    order = np.random.default_rng(seed).permutation(n)
    held = 0 if n < 2 or fraction <= 0 else max(1, int(round(n * fraction)))
    if held == 0:
        return np.sort(order), np.sort(order)
    return np.sort(order[held:]), np.sort(order[:held])


def slim(
    model: onnx.ModelProto,
    data: CalibrationData,
    config: SlimConfig | None = None,
    progress: Progress | None = None,
    pass_progress: PassProgress | None = None,
) -> SlimResult:
    """Prune every provably safe channel group of `model` to `config.keep_ratio` with ThiNet.

    Groups are pruned in topological order, each from statistics of the network as already
    pruned; the result is checked with the full ONNX checker and compared with `model` on the
    held-out part of `data`. Raises ThinetError when nothing can be pruned or the run cannot
    fit in `config.max_memory`.
    """
    config = config or SlimConfig()
    config.validate()
    if config.searches():
        from onnx_thinet.budgeted import slim_budgeted

        return slim_budgeted(model, data, config, progress)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    canonical, canonical_steps, analysis = _canonical_analysis(model, config)
    timings["analysis"] = time.perf_counter() - clock
    if not analysis.groups:
        raise ThinetError(_nothing_prunable(analysis))
    groups = _chosen_groups(analysis, config.only)
    train, held = split_holdout(len(data), config.holdout, config.seed)
    plan = _memory_plan(canonical, groups, len(train), config)
    providers = tuple(session_providers(config.device))
    waves = schedule_waves(canonical, groups)
    clock = time.perf_counter()
    current, results, profile = prune_in_passes(canonical, data, train, config, plan, waves, progress,
                                                pass_progress)
    timings["calibration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    shapes = dict(config.input_shapes) if config.input_shapes else _sample_shapes(data)
    params_before, flops_before = count_params(canonical), total_flops(canonical, shapes)
    batch = fixed_batch(canonical) or plan.batch_size
    del canonical  # a copy of the weights that verification does not need
    current, comparison = _verified(model, current, results, data, held, batch, config)
    timings["verification"] = time.perf_counter() - clock
    return SlimResult(
        model=current,
        analysis=analysis,
        groups=results,
        verification=comparison,
        params_before=params_before,
        params_after=count_params(current),
        flops_before=flops_before,
        flops_after=total_flops(current, shapes),
        flops_input_shapes=shapes,
        forward_passes=len(waves),
        timings=timings,
        config=config,
        warnings=output_warnings(comparison, _worst_layer(results)),
        profile=profile,
        memory=plan,
        providers=providers,
        canonicalization=canonical_steps,
    )


def _canonical_analysis(model: onnx.ModelProto, config: SlimConfig
                        ) -> tuple[onnx.ModelProto, tuple[CanonicalStep, ...], Analysis]:
    """Refuse quantized graphs, then canonicalize `model` and find its channel groups."""
    refusal = quantization_refusal(model)
    if refusal is not None:
        raise ThinetError(refusal)
    canonical, canonical_steps = canonicalize_steps(model, simplify=config.simplify)
    return canonical, canonical_steps, analyze(canonical, prune_coupled=config.prune_coupled)


def _verified(model: onnx.ModelProto, current: onnx.ModelProto, results: list[GroupResult],
              data: CalibrationData, held: np.ndarray, batch: int, config: SlimConfig
              ) -> tuple[onnx.ModelProto, OutputComparison]:
    """The pruned copy with the original's interface and provenance, checked and compared on `held`."""
    current = _finalize(current, model)
    stamp_provenance(current, config, results)
    check_model(current)
    comparison = compare_outputs(model, current, data, held, batch, config.device)
    return current, comparison


def _memory_plan(canonical, groups, images: int, config: SlimConfig) -> MemoryPlan:
    budget = config.max_memory if config.max_memory is not None else machine_memory()
    return plan_memory(canonical, groups, images, config.batch_size, budget,
                       fixed_batch=fixed_batch(canonical), keep_ratio=config.keep_ratio)


def _chosen_groups(analysis: Analysis, only: tuple[str, ...] | None) -> tuple[ChannelGroup, ...]:
    if not only:
        return analysis.groups
    names = {name for g in analysis.groups for name in (g.producer, *g.producers)}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ThinetError(f"only: {', '.join(unknown)} is not a prunable producer "
                          f"(prunable: {', '.join(sorted(names))})", params=("only",))
    return tuple(g for g in analysis.groups if {g.producer, *g.producers} & set(only))


def _finalize(slimmed: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Give the slim model the original's interface: input/output types with their dynamic dims."""
    inputs = {vi.name: vi for vi in original.graph.input}
    outputs = {vi.name: vi for vi in original.graph.output}
    for vi in slimmed.graph.input:
        if vi.name in inputs:
            vi.CopyFrom(inputs[vi.name])
    for vi in slimmed.graph.output:
        if vi.name in outputs:
            vi.CopyFrom(outputs[vi.name])
    del slimmed.metadata_props[:]
    slimmed.metadata_props.extend(original.metadata_props)
    return preserve_interface(original, infer_shapes(slimmed, in_place=True))


def _worst_layer(results: list[GroupResult]) -> str | None:
    pruned = [g for g in results if g.channels_after < g.channels_before]
    if not pruned:
        return None
    worst = max(pruned, key=lambda g: g.error_after)
    return f"{worst.producer}, {worst.error_after:.3f} at {worst.channels_after}/{worst.channels_before} channels"


def stamp_provenance(model: onnx.ModelProto, config: SlimConfig, results: list[GroupResult]) -> None:
    """Record in `metadata_props` what made this model: tool version, method, budget, keep counts."""
    import json

    from onnx_thinet import __version__

    budget = {k: getattr(config, k) for k in ("keep_ratio", "target_flops", "target_params", "target_latency",
                                              "min_agreement", "max_error", "round_to", "channel_multiple")
              if getattr(config, k) is not None}
    entries = {
        "onnx_thinet.version": __version__,
        "onnx_thinet.method": f"{config.method} (reconstruct {config.reconstruct})",
        "onnx_thinet.budget": json.dumps(budget, sort_keys=True),
        "onnx_thinet.keep_counts": json.dumps({g.producer: [g.channels_after, g.channels_before] for g in results}),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _sample_shapes(data: CalibrationData) -> dict[str, tuple[int, ...]]:
    first = data.batch(np.arange(1))
    return {name: (1,) + tuple(array.shape[1:]) for name, array in first.items()}


def _nothing_prunable(analysis: Analysis) -> str:
    tied = [c for c in analysis.coupled if "graph input" in c.reason]
    reasons = [f"{c.producer} (tied to the model's interface: {c.reason})" for c in tied]
    reasons += [f"{c.producer} (coupled: {c.reason})" for c in analysis.coupled if c not in tied]
    reasons += [f"{s.producer} ({s.reason})" for s in analysis.skipped]
    detail = "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")
    return "nothing prunable in this model" + (f": {detail}" if detail else " (no Conv, Gemm or MatMul producers)")
