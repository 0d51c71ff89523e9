"""The slimming pipeline: canonicalize, analyse, calibrate layer by layer, rewrite, verify."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_thinet.calibration.collect import ConsumerStats, collect_statistics
from onnx_thinet.channels.analysis import Analysis, analyze, quantization_refusal
from onnx_thinet.channels.layout import ChannelGroup, Segment, channel_indicator
from onnx_thinet.check.metrics import count_params, total_flops
from onnx_thinet.check.verify import OutputComparison, check_model, compare_outputs
from onnx_thinet.errors import InternalError, ThinetError
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.io.graph import (
    CanonicalStep,
    GraphIndex,
    canonicalize_steps,
    infer_shapes,
    preserve_interface,
)
from onnx_thinet.rewrite.surgery import apply_selection, initializer_array
from onnx_thinet.solve.selection import METHODS, RECONSTRUCTIONS, Selection, choose_channels
from onnx_thinet.solve.solvers import keep_count

__all__ = ["GroupResult", "SlimConfig", "SlimResult", "schedule_waves", "slim", "split_holdout"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images in all passes)


@dataclass(frozen=True)
class SlimConfig:
    """Options of one slimming run; the CLI flags map one to one onto these fields."""

    keep_ratio: float = 0.5
    method: str = "thinet"
    reconstruct: str = "full"  # measured best on the reference models (README, docs/results.md)
    correct: bool = True
    ridge: float | None = None  # relative ridge of the full refit; None: cross-validated
    seed: int = 0
    samples_per_image: int | None = None
    batch_size: int = 32
    holdout: float = 0.1
    device: str = "auto"  # onnxruntime and torch: CUDA when available
    simplify: bool = True
    channel_multiple: int = 1
    prune_coupled: bool = False  # prune producers tied by residual Adds / gating Muls jointly
    only: tuple[str, ...] | None = None  # prune just these producers (the others are kept)
    finetune_data: str | None = None  # layer-by-layer schedule: fine-tune after each pass
    finetune_steps: int = 0
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # FLOPs at this size, not the calibration's

    def validate(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ThinetError(f"keep_ratio must be in (0, 1] (got {self.keep_ratio})", params=("keep_ratio",))
        if self.method not in METHODS:
            raise ThinetError(f"method must be one of {', '.join(METHODS)} (got {self.method!r})", params=("method",))
        if self.reconstruct not in RECONSTRUCTIONS:
            raise ThinetError(
                f"reconstruct must be one of {', '.join(RECONSTRUCTIONS)} (got {self.reconstruct!r})",
                params=("reconstruct",),
            )
        if not 0.0 <= self.holdout < 1.0:
            raise ThinetError(f"holdout must be in [0, 1) (got {self.holdout})", params=("holdout",))
        if self.ridge is not None and self.ridge < 0:
            raise ThinetError(f"ridge must be non-negative (got {self.ridge})", params=("ridge",))
        if self.batch_size < 1 or self.channel_multiple < 1:
            raise ThinetError("batch_size and channel_multiple must be at least 1",
                              params=("batch_size", "channel_multiple"))
        if self.samples_per_image is not None and self.samples_per_image < 1:
            raise ThinetError("samples_per_image must be at least 1", params=("samples_per_image",))
        if self.finetune_steps < 0 or (self.finetune_steps > 0) != (self.finetune_data is not None):
            raise ThinetError("finetune_data and finetune_steps (> 0) go together",
                              params=("finetune_data", "finetune_steps"))


@dataclass(frozen=True)
class GroupResult:
    producer: str
    consumers: tuple[str, ...]
    channels_before: int
    channels_after: int
    error_before: float  # relative reconstruction error of the consumers, slicing only
    error_after: float  # ... after rescaling
    samples: int
    kept: tuple[int, ...] = ()


@dataclass
class SlimResult:
    model: onnx.ModelProto
    analysis: Analysis
    groups: list[GroupResult]
    verification: OutputComparison
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    forward_passes: int
    timings: dict[str, float] = field(default_factory=dict)
    config: SlimConfig = field(default_factory=SlimConfig)
    flops_input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    canonicalization: tuple[CanonicalStep, ...] = ()

    def report(self) -> dict:
        """The JSON report (`--report`); its keys are a contract relied on by scripts."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_input_shapes": {k: list(v) for k, v in self.flops_input_shapes.items()},
            "output_rel_error": self.verification.rel_error,
            "output_max_abs_error": self.verification.max_abs_error,
            "top1_agreement": self.verification.top1_agreement,
            "holdout_samples": self.verification.samples,
            "groups": [
                asdict(g) | {"consumers": list(g.consumers), "kept": list(g.kept)} for g in self.groups
            ],
            "coupled": [
                {"producer": c.producer, "channels": c.channels, "node": c.node, "reason": c.reason}
                for c in self.analysis.coupled
            ],
            "skipped": [
                {"producer": s.producer, "node": s.node, "reason": s.reason} for s in self.analysis.skipped
            ],
            "forward_passes": self.forward_passes,
            "canonicalization": [asdict(step) for step in self.canonicalization],
            "seconds": round(sum(self.timings.values()), 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "config": asdict(self.config),
        }


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 and set aside `fraction` (at least one image when n ≥ 2) for verification.

    With a single image there is nothing to hold out; it then serves both purposes.
    """
    order = np.random.default_rng(seed).permutation(n)
    held = 0 if n < 2 or fraction <= 0 else max(1, int(round(n * fraction)))
    if held == 0:
        return np.sort(order), np.sort(order)
    return np.sort(order[held:]), np.sort(order[:held])


def schedule_waves(model: onnx.ModelProto, groups: tuple[ChannelGroup, ...]) -> list[list[ChannelGroup]]:
    """Batch groups into calibration passes in topological order.

    A group joins the current pass unless its consumers read a tensor that an earlier group of
    the pass will change (anything downstream of that group's consumers, which are rescaled),
    or share a consumer with it (two groups feeding one Concat).
    """
    index = GraphIndex.build(model)
    waves: list[list[ChannelGroup]] = []
    current: list[ChannelGroup] = []
    changed: set[str] = set()
    for group in groups:
        readers = {c.node for c in group.consumers}
        if current and (any(c.input in changed for c in group.consumers) or readers & changed
                        or group.producer in changed):
            waves.append(current)
            current, changed = [], set()
        current.append(group)
        changed |= _downstream(index, sorted(readers))
    if current:
        waves.append(current)
    return waves


def _downstream(index: GraphIndex, nodes: list[str]) -> set[str]:
    """Names of `nodes`, every node after them and every tensor they or those produce."""
    by_name = {n.name: n for n in index.model.graph.node}
    seen, stack = set(), list(nodes)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for out in by_name[name].output:
            seen.add(out)
            stack.extend(n.name for n, _ in index.uses.get(out, []) if n.name not in seen)
    return seen


def slim(
    model: onnx.ModelProto,
    data: CalibrationData,
    config: SlimConfig | None = None,
    progress: Progress | None = None,
) -> SlimResult:
    """Prune every provably safe channel group of `model` to `config.keep_ratio` with ThiNet.

    Groups are pruned in topological order, each from statistics of the network as already
    pruned; the result is checked with the full ONNX checker and compared with `model` on the
    held-out part of `data`. Raises ThinetError when nothing can be pruned.
    """
    config = config or SlimConfig()
    config.validate()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    refusal = quantization_refusal(model)
    if refusal is not None:
        raise ThinetError(refusal)
    canonical, canonical_steps = canonicalize_steps(model, simplify=config.simplify)
    analysis = analyze(canonical, prune_coupled=config.prune_coupled)
    timings["analysis"] = time.perf_counter() - clock
    if not analysis.groups:
        raise ThinetError(_nothing_prunable(analysis))
    groups = _chosen_groups(analysis, config.only)
    train, held = split_holdout(len(data), config.holdout, config.seed)
    waves = schedule_waves(canonical, groups)
    clock = time.perf_counter()
    current, results = _prune_waves(canonical, waves, data, train, config, progress)
    timings["calibration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    current = _finalize(current, model)
    check_model(current)
    comparison = compare_outputs(model, current, data, held, config.batch_size, config.device)
    shapes = dict(config.input_shapes) if config.input_shapes else _sample_shapes(data)
    timings["verification"] = time.perf_counter() - clock
    return SlimResult(
        model=current,
        analysis=analysis,
        groups=results,
        verification=comparison,
        params_before=count_params(canonical),
        params_after=count_params(current),
        flops_before=total_flops(canonical, shapes),
        flops_after=total_flops(current, shapes),
        flops_input_shapes=shapes,
        forward_passes=len(waves),
        timings=timings,
        config=config,
        canonicalization=canonical_steps,
    )


def _chosen_groups(analysis: Analysis, only: tuple[str, ...] | None) -> tuple[ChannelGroup, ...]:
    if not only:
        return analysis.groups
    names = {name for g in analysis.groups for name in (g.producer, *g.producers)}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ThinetError(f"only: {', '.join(unknown)} is not a prunable producer "
                          f"(prunable: {', '.join(sorted(names))})", params=("only",))
    return tuple(g for g in analysis.groups if {g.producer, *g.producers} & set(only))


def _prune_waves(canonical, waves, data, train, config: SlimConfig, progress):
    current = onnx.ModelProto.FromString(canonical.SerializeToString())
    reference = canonical if config.correct else None
    rng = np.random.default_rng(config.seed)
    total = len(waves) * len(train)
    done = 0
    results: list[GroupResult] = []
    kept_outputs: dict[str, np.ndarray] = {}  # producer → original filters it still has
    teacher_cache = _teacher_cache() if config.finetune_steps else None  # dropped when slim returns

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for pass_index, planned in enumerate(waves):
        # Re-read the groups on the model as pruned so far: offsets into Concats and shape
        # constants shift when a neighbouring group has been cut.
        fresh = {g.producer: g for g in analyze(current, prune_coupled=config.prune_coupled).groups}
        missing = [g.producer for g in planned if g.producer not in fresh]
        if missing:
            raise InternalError(f"{', '.join(missing)} no longer prunable after earlier cuts")
        wave = [fresh[g.producer] for g in planned]
        stats = collect_statistics(
            current, wave, data, train, batch_size=config.batch_size,
            per_image=config.samples_per_image, seed=int(rng.integers(2**31)),
            device=config.device, reference=reference, kept_outputs=kept_outputs,
            refit=config.reconstruct == "full", progress=advance,
        )
        for group in wave:
            selection = _select_group(current, group, stats[group.producer], config, rng)
            filters = _kept_filters(current, group, selection.kept)  # read before the cut
            if len(selection.kept) < group.channels:
                apply_selection(current, group, selection.kept, selection.scales, selection.refits)
                kept_outputs.update({p: filters[1] for p in group.producers})
            results.append(_group_result(group, selection, stats[group.producer], filters))
        current = infer_shapes(current)
        if config.finetune_steps:
            current = _finetune_between_passes(current, canonical, config, pass_index, teacher_cache)
    return current, results


def _kept_filters(model: onnx.ModelProto, group: ChannelGroup, kept: np.ndarray) -> tuple[int, np.ndarray]:
    """The producer's filter count and the filters a selection keeps. A channel of the group is
    several filters when a grouped conv reader cuts by whole groups, or one filter of every
    group of a grouped conv producer; a window of a joint group stays in group channels."""
    item = next(s for s in group.slices if s.node == group.producers[0] and s.input_index == 1)
    layout = item.layout
    if layout.segments != (Segment(0, 0, layout.total),):
        return group.channels, np.asarray(kept)
    node = next(n for n in model.graph.node if n.name == item.node)
    length = int(initializer_array(model, node.input[1]).shape[item.axis])
    return length, np.sort(layout.positions(np.asarray(kept), length)[0])


def _teacher_cache():
    """The data and teacher outputs the in-between fine-tunes share, owned by one slim run."""
    from onnx_thinet.pytorch.finetune_graph import TeacherCache

    return TeacherCache()


def _finetune_between_passes(current, teacher, config: SlimConfig, pass_index: int, cache):
    """The paper's schedule: recover briefly (distillation from the original) before the next layer.

    Each pass draws other batches (seed + pass), so the passes together see more of the data.
    """
    from onnx_thinet.pytorch.finetune_graph import finetune_graph

    tuned = finetune_graph(current, teacher, config.finetune_data, config.finetune_steps,
                           seed=config.seed + pass_index, device=config.device, cache=cache)
    return infer_shapes(tuned)


def _select_group(model, group: ChannelGroup, stats: dict[str, ConsumerStats], config, rng) -> Selection:
    keep = keep_count(group.channels, config.keep_ratio, config.channel_multiple)
    return choose_channels(config.method, config.reconstruct, group, stats, keep,
                           _filter_l1(model, group), rng, ridge=config.ridge)


def _filter_l1(model: onnx.ModelProto, group: ChannelGroup) -> np.ndarray:
    """Sum of absolute weights of each output channel over all producers' weights (Li et al.)."""
    nodes = {n.name: n for n in model.graph.node}
    total = np.zeros(group.channels)
    for item in group.slices:
        if item.node in group.producers and item.input_index == 1:
            weight = np.moveaxis(initializer_array(model, nodes[item.node].input[1]), item.axis, 0)
            per_filter = np.abs(weight).reshape(len(weight), -1).sum(axis=1)
            total += per_filter @ channel_indicator(item.layout, group.channels, len(weight))
    return total


def _group_result(group: ChannelGroup, selection: Selection, stats, filters) -> GroupResult:
    """`filters`: the producer's filter count and kept filters (see `_kept_filters`)."""
    before, kept = filters
    return GroupResult(
        producer=group.producer,
        consumers=tuple(c.node for c in group.consumers),
        channels_before=int(before),
        channels_after=int(len(kept)),
        error_before=float(selection.error_before),
        error_after=float(selection.error_after),
        samples=int(sum(s.samples for s in stats.values())),
        kept=tuple(int(i) for i in kept),
    )


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
    return preserve_interface(original, infer_shapes(slimmed))


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
