"""The pass loop of a slimming run: calibrate, select, refit and cut, one wave of groups at a time."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx

from onnx_thinet.calibration.collect import channel_statistics, reference_tensors
from onnx_thinet.calibration.heap import release_heap_over, reused_heap
from onnx_thinet.calibration.narrowing import narrow_readers
from onnx_thinet.calibration.plan import MemoryPlan, largest_statistics
from onnx_thinet.calibration.refit import refit_statistics
from onnx_thinet.calibration.runtime import ONNXRUNTIME_ERRORS
from onnx_thinet.calibration.segments import (
    Batching,
    NodeIndex,
    SegmentRunner,
    downstream_nodes,
    fixed_batch,
)
from onnx_thinet.calibration.store import ActivationStore
from onnx_thinet.channels.analysis import analyze
from onnx_thinet.channels.layout import ChannelGroup, Segment, channel_indicator, removed_positions
from onnx_thinet.errors import InternalError, ThinetError, one_line
from onnx_thinet.io.data import CalibrationData
from onnx_thinet.io.graph import infer_shapes
from onnx_thinet.rewrite.surgery import apply_selection, initializer_array, initializer_dims
from onnx_thinet.slim_types import GroupResult, PassInfo, PassProgress, Progress, SlimConfig
from onnx_thinet.solve.selection import Selection, reconstruct_channels, select_channels
from onnx_thinet.solve.solvers import keep_count

__all__ = ["prune_in_passes", "schedule_waves"]


def schedule_waves(model: onnx.ModelProto, groups: tuple[ChannelGroup, ...]) -> list[list[ChannelGroup]]:
    """Batch groups into calibration passes in topological order.

    A group joins the current pass unless its consumers read a tensor that an earlier group of
    the pass will change (anything downstream of that group's consumers, which are rescaled),
    or share a consumer with it (two groups feeding one Concat).
    """
    index = NodeIndex(model)
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
        nodes, tensors = downstream_nodes(index, sorted(readers))
        changed |= nodes | tensors
    if current:
        waves.append(current)
    return waves


def prune_in_passes(
    canonical: onnx.ModelProto,
    data: CalibrationData,
    train: np.ndarray,
    config: SlimConfig,
    plan: MemoryPlan,
    waves: list[list[ChannelGroup]],
    progress: Progress | None,
    pass_progress: PassProgress | None,
) -> tuple[onnx.ModelProto, list[GroupResult], dict[str, float]]:
    """Prune `waves` of `canonical` in order; returns the pruned copy, its groups and where time went."""
    profile: dict[str, float] = {}
    with reused_heap():
        engine = _Engine(canonical, data, train, config, plan, profile)
        try:
            current, results = _prune_waves(engine, waves, config, progress, pass_progress)
        finally:
            engine.close()
    return current, results, profile


class _Engine:
    """The pruned copy and the original, each run segment by segment over stored activations."""

    def __init__(self, canonical, data, train, config: SlimConfig, plan: MemoryPlan, profile):
        self.batching = Batching(train, plan.batch_size, run_size=fixed_batch(canonical))
        self.store = ActivationStore(self.batching.count, plan.store_ram // 2)
        self.reference_model = canonical
        self.current = SegmentRunner(data, self.batching, self.store, config.device, profile)
        # the reference's tensors share names with the pruned copy's: a store of their own
        self.ref_store = ActivationStore(self.batching.count, plan.store_ram // 2)
        self.reference = (SegmentRunner(data, self.batching, self.ref_store, config.device, profile,
                                        fixed_model=True) if config.correct else None)
        self.profile = profile
        self.plan, self.images, self.keep_ratio = plan, len(train), config.keep_ratio
        self.heap_limit = self._heap_limit(plan.statistics)
        self.ridges_chosen: dict[int, float] = {}  # where each size's ridge search starts

    def fit_pass(self, wave: list[ChannelGroup]) -> None:
        """Share memory for a pass by its own statistics, not the largest layer's: VGG-16's conv
        passes wrote 10 s of stored activations to disk (38 MB in memory) to leave room for the
        FC layer's 1.3 GB. Stored arrays over the pass's share go to disk now."""
        statistics, _ = largest_statistics(self.reference_model, wave, self.images, self.keep_ratio)
        ram = self.plan.store_ram_for(statistics) // 2
        self.store.limit_ram(ram)
        self.ref_store.limit_ram(ram)
        self.heap_limit = self._heap_limit(statistics)

    def _heap_limit(self, statistics: int) -> int:
        """Freed memory is kept for reuse while `statistics` and a batch of activations still
        fit above it."""
        return self.plan.budget - statistics - self.plan.activations_per_image * self.plan.batch_size

    def trim_heap(self) -> None:
        release_heap_over(self.heap_limit)

    def close(self) -> None:
        self.store.close()
        self.ref_store.close()

def _prune_waves(engine: _Engine, waves, config: SlimConfig, progress, pass_progress):
    current = onnx.ModelProto()
    current.CopyFrom(engine.reference_model)  # the pruned copy: the one extra copy of the weights
    rng = np.random.default_rng(config.seed)
    total = len(waves) * len(engine.batching.indices)
    done = 0
    results: list[GroupResult] = []
    kept_outputs: dict[str, np.ndarray] = {}  # producer → original filters it still has
    start = time.perf_counter()
    teacher_cache = _teacher_cache() if config.finetune_steps else None  # dropped when slim returns

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for pass_index, planned in enumerate(waves):
        engine.fit_pass(planned)
        engine.trim_heap()
        # Re-read the groups on the model as pruned so far: offsets into Concats and shape
        # constants shift when a neighbouring group has been cut.
        clock = time.perf_counter()
        own = [p for g in planned for p in g.producers or (g.producer,)]
        fresh = {g.producer: g for g in analyze(current, config.prune_coupled, own).groups}
        _add_time(engine.profile, "analysis", clock)
        missing = [g.producer for g in planned if g.producer not in fresh]
        if missing:
            raise InternalError(f"{', '.join(missing)} no longer prunable after earlier cuts")
        wave = [fresh[g.producer] for g in planned]
        later = [g for later_wave in waves[pass_index + 1:] for g in later_wave]
        read_later = {c.node for g in later if _keep(config, g) < g.channels for c in g.consumers}
        try:
            applied = _prune_wave(engine, current, wave, config, rng, kept_outputs, advance, results,
                                  read_later)
        except ONNXRUNTIME_ERRORS as exc:
            if pass_index:
                raise
            # nothing is pruned yet: onnxruntime cannot run the input model itself
            raise ThinetError("onnxruntime cannot run this model on the calibration data, and slimming "
                              f"runs it to calibrate: {one_line(exc)}") from None
        clock = time.perf_counter()
        current = infer_shapes(current, in_place=True)
        _forget_changed(engine, current, applied, _touched(later),
                        reference_tensors(engine.reference_model, [c for g in later for c in g.consumers]))
        _add_time(engine.profile, "rewrite", clock)
        if config.finetune_steps:
            current = _finetune_between_passes(current, engine.reference_model, config, pass_index,
                                               teacher_cache)
            engine.store.clear()
        if pass_progress is not None:
            elapsed = time.perf_counter() - start
            pass_progress(PassInfo(pass_index + 1, len(waves), tuple(g.producer for g in wave), elapsed,
                                   elapsed / (pass_index + 1) * (len(waves) - pass_index - 1)))
    return current, results


def _keep(config: SlimConfig, group: ChannelGroup) -> int:
    """How many of the group's channels stay: its `keep_counts` entry, else the rounded ratio."""
    return dict(config.keep_counts or ()).get(group.producer) or keep_count(
        group.channels, config.keep_ratio, max(config.channel_multiple, config.round_to))


def _prune_wave(engine: _Engine, current, wave, config: SlimConfig, rng, kept_outputs, advance, results,
                read_later: set[str]):
    """Statistics, selection, reconstruction and surgery of one pass; returns what was cut.

    Readers that also read groups later passes cut (`read_later`) are read on this group's
    channels alone where they can be (`narrow_readers`), and rescaled now: with `--reconstruct
    full` the later pass refits them."""
    reference = engine.reference_model if engine.reference is not None else None
    clock = time.perf_counter()
    narrowed = {g.producer: narrow_readers(current, reference, g, read_later) for g in wave}
    _add_time(engine.profile, "analysis", clock)
    clock = time.perf_counter()
    inner = sum(engine.profile.get(k, 0.0) for k in ("onnxruntime", "io"))
    stats = channel_statistics(current, [narrowed[g.producer][0] for g in wave], engine.current,
                               engine.reference, reference,
                               per_image=config.samples_per_image, seed=int(rng.integers(2**31)),
                               kept_outputs=kept_outputs, progress=advance, zero_counts=config.method == "apoz")
    inner = sum(engine.profile.get(k, 0.0) for k in ("onnxruntime", "io")) - inner
    _add_time(engine.profile, "statistics", clock + inner)
    applied = []
    for group in wave:
        clock = time.perf_counter()
        keep = _keep(config, group)
        l1 = _filter_l1(current, group) if config.method == "l1" else None  # reads the producer weights
        kept = (select_channels(config.method, group, stats[group.producer], keep, l1, rng)
                if keep < group.channels else np.arange(group.channels))
        _add_time(engine.profile, "selection", clock)
        clock = time.perf_counter()
        engine.trim_heap()
        narrow, rescaled = narrowed[group.producer]
        refitted = replace(group, consumers=tuple(c for c in group.consumers if c.node not in rescaled))
        if config.reconstruct == "full":
            seed = int(rng.integers(2**31))  # drawn as before, whether or not a reader is left
            if refitted.consumers:
                refit_statistics(current, refitted, kept, stats[group.producer], engine.current,
                                 engine.reference, reference, seed=seed, kept_outputs=kept_outputs)
        _add_time(engine.profile, "refit statistics", clock)
        clock = time.perf_counter()
        selection = reconstruct_channels(config.reconstruct, group, stats[group.producer], kept,
                                         config.ridge, engine.ridges_chosen, rescaled)
        _add_time(engine.profile, "refit solve", clock)
        filters = _kept_filters(current, group, selection.kept)  # read before the cut
        engine.trim_heap()
        if len(selection.kept) < group.channels:
            deletions = _consumer_input_deletions(engine, narrow, selection.kept)
            apply_selection(current, group, selection.kept, selection.scales, selection.refits)
            kept_outputs.update({p: filters[1] for p in group.producers})
            applied.append((group, deletions))
        results.append(_group_result(group, selection, stats[group.producer], filters))
    return applied


def _consumer_input_deletions(engine: _Engine, group: ChannelGroup, kept) -> dict[str, tuple[int, np.ndarray]]:
    """Positions of the removed channels in each stored consumer input (they alone change)."""
    deletions = {}
    for consumer in group.consumers:
        if consumer.input not in engine.store:
            continue
        axis = 1 if consumer.kind.windowed else -1
        length = engine.store.axis_length(consumer.input, axis)
        deletions[consumer.input] = (axis, removed_positions(consumer.weight.layout, kept, group.channels, length))
    return deletions


def _touched(groups) -> set[str]:
    """Nodes that pruning `groups` rewrites: producers, sliced nodes and consumers."""
    nodes: set[str] = set()
    for group in groups:
        nodes |= set(group.producers) | {group.producer} | {s.node for s in group.slices}
        nodes |= {a.node for a in group.attr_updates} | {f.node for f in group.shape_fixes}
        nodes |= {c.node for c in group.consumers}
    return nodes


def _forget_changed(engine: _Engine, current, applied, future: set[str], reference_needs: set[str]) -> None:
    """Drop stored tensors that the cuts changed; consumer inputs lose the removed positions.
    The reference keeps what later passes will read from it (`reference_needs`) computable."""
    changed = _touched(group for group, _ in applied)
    consumers = {c.node for group, _ in applied for c in group.consumers}
    deletions: dict[str, tuple[int, np.ndarray]] = {}
    seen: set[str] = set()
    for _, group_deletions in applied:
        for name, value in group_deletions.items():
            if name in seen:  # two groups reach one tensor: recompute it
                deletions.pop(name, None)
            else:
                deletions[name] = value
            seen.add(name)
    engine.current.invalidate(current, changed, deletions, exact=consumers, future=future)
    if engine.reference is not None:  # unchanged, but later passes read behind today's cut
        engine.reference.prune(engine.reference_model, future, reference_needs)


def _add_time(profile: dict[str, float], key: str, clock: float) -> None:
    profile[key] = profile.get(key, 0.0) + time.perf_counter() - clock


def _kept_filters(model: onnx.ModelProto, group: ChannelGroup, kept: np.ndarray) -> tuple[int, np.ndarray]:
    """The producer's filter count and the filters a selection keeps. A channel of the group is
    several filters when a grouped conv reader cuts by whole groups, or one filter of every
    group of a grouped conv producer; a window of a joint group stays in group channels."""
    item = next(s for s in group.slices if s.node == group.producers[0] and s.input_index == 1)
    layout = item.layout
    if layout.segments != (Segment(0, 0, layout.total),):
        return group.channels, np.asarray(kept)
    node = next(n for n in model.graph.node if n.name == item.node)
    length = int(initializer_dims(model, node.input[1])[item.axis])
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
    return infer_shapes(tuned, in_place=True)


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
