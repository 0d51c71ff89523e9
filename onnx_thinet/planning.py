"""From a budget (`--target-flops/params`) to per-layer keep counts on a real graph.

The numbers come from the graph and one calibration pass over the unpruned model: each
group's ThiNet error curve (label-free sensitivity) and a multilinear cost model of its FLOPs
or parameters; `solve.budget.allocate` does the arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import onnx

from onnx_thinet.calibration.collect import ConsumerStats, channel_statistics
from onnx_thinet.calibration.segments import Batching, SegmentRunner, fixed_batch
from onnx_thinet.calibration.store import ActivationStore
from onnx_thinet.channels.analysis import analyze
from onnx_thinet.channels.layout import ChannelGroup
from onnx_thinet.check.metrics import count_params, layer_costs
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.io.graph import infer_shapes
from onnx_thinet.rewrite.surgery import apply_selection
from onnx_thinet.solve.budget import (
    Allocation,
    CostModel,
    allocate,
    greedy_error_curve,
    least_squares_curve,
)
from onnx_thinet.solve.solvers import keep_count

__all__ = ["TARGETS", "Plan", "cost_model", "error_curves", "plan_keeps", "structure_for"]

logger = logging.getLogger(__name__)

TARGETS = ("flops", "params")
MIN_KEEP_RATIO = 0.25  # no layer is planned below this: the curves come from one layer at a time


@dataclass(frozen=True)
class Plan:
    """Keep counts per producer for a budget, and how the allocation got there."""

    target: str  # "flops" | "params"
    fraction: float  # asked cost as a fraction of the original
    keeps: tuple[tuple[str, int], ...]
    allocation: Allocation
    producers: tuple[str, ...]

    def layers(self) -> list[dict]:
        return [
            {"producer": name, "channels": lp.channels, "keep": lp.keep,
             "keep_ratio": round(lp.keep / lp.channels, 4), "planned_error": round(lp.error, 5),
             "error_at_half": round(lp.error_at_half, 5), "cost_share": round(lp.cost_share, 4),
             "why": lp.why}
            for name, lp in zip(self.producers, self.allocation.layers)
        ]


def cost_model(model: onnx.ModelProto, groups: Sequence[ChannelGroup], shapes: dict | None,
               kind: str) -> CostModel:
    """FLOPs or params of `model` as a multilinear function of each group's keep ratio.

    A node's cost scales with the ratio of the group it produces (its filters), the group(s)
    it reads (its input channels: a share per group when it reads a concatenation of several),
    and the group whose channels it carries (a depthwise Conv on the path).
    """
    touches: dict[str, list[tuple[int, float]]] = {}
    produces: dict[str, set[int]] = {}
    for g, group in enumerate(groups):
        for node in {*group.producers, group.producer} | {s.node for s in group.slices}:
            produces.setdefault(node, set()).add(g)
        for consumer in group.consumers:
            touches.setdefault(consumer.node, []).append((g, float(group.channels)))
    fixed, coefficients, members = 0.0, [], []
    costs = layer_costs(model, shapes)
    for cost in costs:
        value = float((cost.flops or 0) if kind == "flops" else cost.params)
        own = tuple(sorted(produces.get(cost.node, set())))
        reads = touches.get(cost.node, [])
        if not own and not reads:
            fixed += value
            continue
        width = sum(c for _, c in reads)
        for g, channels in reads or [(None, 1.0)]:
            share = channels / width if reads else 1.0
            coefficients.append(value * share)
            members.append(tuple(sorted({*own, *([g] if g is not None else [])})))
    if kind == "params":
        fixed += count_params(model) - sum(c.params for c in costs)
    return CostModel(fixed, tuple(coefficients), tuple(members))


def error_curves(model: onnx.ModelProto, groups: Sequence[ChannelGroup], data: CalibrationData,
                 indices: np.ndarray, batch_size: int, device: str, seed: int,
                 impacts: Sequence[dict[float, float]] | None = None) -> list[np.ndarray]:
    """Each group's predicted output error at every keep count, from the unpruned model.

    One calibration pass gives every group's ThiNet removal order and its readers' error after
    the least-squares rescale at every size. Those errors are in each layer's own units;
    `impacts[g]` ({keep ratio: the model's output error measured with group g alone pruned to
    that ratio}) converts curve g into one currency: relative error of the network's outputs.
    """
    batching = Batching(indices, batch_size, run_size=fixed_batch(model))
    store = ActivationStore(batching.count, 1 << 30)
    try:
        runner = SegmentRunner(data, batching, store, device, {})
        stats = channel_statistics(model, list(groups), runner, seed=seed)
    finally:
        store.close()
    curves = []
    for g, group in enumerate(groups):
        total = reduce(ConsumerStats.merged, stats[group.producer].values())
        order, _ = greedy_error_curve(total.gram, total.corr, total.target_sq)
        layer = least_squares_curve(total.gram, total.corr, total.target_sq, order)
        curves.append(layer * _output_factor(layer, group.channels, impacts[g] if impacts else {}))
        logger.info("%s: layer error at half %.4f, planned output error %.4f", group.producer,
                    layer[keep_count(group.channels, 0.5)], curves[-1][keep_count(group.channels, 0.5)])
    return curves


def _output_factor(layer: np.ndarray, channels: int, impacts: dict[float, float]) -> np.ndarray:
    """Output error per unit of layer error at every size, interpolated between the probed sizes."""
    points = sorted((keep_count(channels, ratio), error / layer[keep_count(channels, ratio)])
                    for ratio, error in impacts.items() if layer[keep_count(channels, ratio)] > 1e-12)
    if not points:
        return np.ones(channels + 1)
    sizes, factors = zip(*points)
    return np.interp(np.arange(channels + 1), sizes, factors)


def plan_keeps(model: onnx.ModelProto, groups: Sequence[ChannelGroup], curves: list[np.ndarray],
               shapes: dict | None, target: str, fraction: float, multiple: int = 1) -> Plan:
    """Allocate keep counts so that the plan's `target` cost is `fraction` of the original's."""
    costs = cost_model(model, groups, shapes, target)
    allocation = allocate(curves, costs, fraction, multiple=multiple, min_ratio=MIN_KEEP_RATIO)
    producers = tuple(g.producer for g in groups)
    keeps = tuple((name, lp.keep) for name, lp in zip(producers, allocation.layers))
    logger.info("plan for %s %.3f: planned %.3f", target, fraction, allocation.cost_fraction)
    return Plan(target, fraction, keeps, allocation, producers)


def structure_for(model: onnx.ModelProto, keeps: dict[str, int], prune_coupled: bool = False) -> onnx.ModelProto:
    """`model` cut to the planned widths without calibration (first k channels): the slim
    model's exact shapes, for measuring a plan's latency before paying for calibration."""
    from onnx_thinet.slim import schedule_waves

    current = onnx.ModelProto()
    current.CopyFrom(model)
    planned = [g for g in analyze(current, prune_coupled=prune_coupled).groups
               if keeps.get(g.producer, g.channels) < g.channels]
    for wave in schedule_waves(current, tuple(planned)):
        fresh = {g.producer: g for g in analyze(current, prune_coupled=prune_coupled).groups}
        for group in (fresh[g.producer] for g in wave):
            apply_selection(current, group, np.arange(keeps[group.producer]))
        current = infer_shapes(current, in_place=True)
    return current
