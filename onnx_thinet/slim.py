"""The slimming pipeline: canonicalize, analyse, calibrate layer by layer, rewrite, verify."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_thinet.calibration.collect import channel_statistics, refit_statistics
from onnx_thinet.calibration.plan import MemoryPlan, machine_memory, plan_memory
from onnx_thinet.calibration.runtime import session_providers
from onnx_thinet.calibration.segments import Batching, SegmentRunner, fixed_batch
from onnx_thinet.calibration.store import ActivationStore
from onnx_thinet.channels.analysis import Analysis, analyze, quantization_refusal
from onnx_thinet.channels.layout import ChannelGroup, Segment, channel_indicator, removed_positions
from onnx_thinet.check.metrics import count_params, total_flops
from onnx_thinet.check.verify import OutputComparison, check_model, compare_outputs, output_warnings
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
from onnx_thinet.solve.selection import (
    METHODS,
    RECONSTRUCTIONS,
    Selection,
    reconstruct_channels,
    select_channels,
)
from onnx_thinet.solve.solvers import keep_count

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

Progress = Callable[[int, int], None]  # (images done, images in all passes)


@dataclass(frozen=True)
class PassInfo:
    """One finished calibration pass, for progress lines: which layers, how far, how long."""

    index: int  # 1-based
    passes: int
    producers: tuple[str, ...]
    elapsed: float  # seconds since calibration began
    eta: float  # seconds still expected, from the mean pass so far


PassProgress = Callable[[PassInfo], None]


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
    # budgets and the guard (onnx_thinet.budgeted): fractions of the original's cost / latency
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    round_to: int = 1  # planned keep counts are multiples of this (as --channel-multiple)
    min_agreement: float | None = None  # held-out top-1 agreement the result must keep
    max_error: float | None = None  # held-out relative output error the result must stay under
    threads: int | None = None  # intra-op threads when measuring latency (None: all cores)
    keep_counts: tuple[tuple[str, int], ...] | None = None  # planned per-producer keeps
    max_memory: int | None = None  # bytes; None: 80% of the memory available, at most 4 GB
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
        if self.max_memory is not None and self.max_memory <= 0:
            raise ThinetError("max_memory must be positive", params=("max_memory",))
        if self.finetune_steps < 0 or (self.finetune_steps > 0) != (self.finetune_data is not None):
            raise ThinetError("finetune_data and finetune_steps (> 0) go together",
                              params=("finetune_data", "finetune_steps"))
        from onnx_thinet.budgeted import validate_budget

        validate_budget(self)

    def searches(self) -> bool:
        """Whether a budget or a guard decides the keep counts (not yet planned)."""
        wanted = (self.target_flops, self.target_params, self.target_latency, self.min_agreement, self.max_error)
        return self.keep_counts is None and any(v is not None for v in wanted)


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
    warnings: list[str] = field(default_factory=list)
    budget: dict | None = None  # set by budgeted runs: the plan and why
    guard: dict | None = None  # set when --min-agreement / --max-error searched
    profile: dict[str, float] = field(default_factory=dict)  # where calibration time went
    memory: MemoryPlan | None = None
    providers: tuple[str, ...] = ()  # onnxruntime execution providers the calibration ran on
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
            "outputs": [asdict(o) for o in self.verification.outputs],
            "warnings": list(self.warnings),
            "budget": self.budget,
            "guard": self.guard,
            "profile": {k: round(v, 3) for k, v in self.profile.items()},
            "memory_plan": None if self.memory is None else asdict(self.memory),
            "providers": list(self.providers),
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
    plan = _memory_plan(canonical, groups, len(train), config)
    providers = tuple(session_providers(config.device))
    waves = schedule_waves(canonical, groups)
    clock = time.perf_counter()
    profile: dict[str, float] = {}
    engine = _Engine(canonical, data, train, config, plan, profile)
    try:
        current, results = _prune_waves(engine, waves, config, progress, pass_progress)
    finally:
        engine.close()
    timings["calibration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    current = _finalize(current, model)
    stamp_provenance(current, config, results)
    check_model(current)
    comparison = compare_outputs(model, current, data, held, fixed_batch(canonical) or plan.batch_size,
                                 config.device)
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
        warnings=output_warnings(comparison, _worst_layer(results)),
        profile=profile,
        memory=plan,
        providers=providers,
        canonicalization=canonical_steps,
    )


def _memory_plan(canonical, groups, images: int, config: SlimConfig) -> MemoryPlan:
    budget = config.max_memory if config.max_memory is not None else machine_memory()
    return plan_memory(canonical, groups, images, config.batch_size, budget,
                       fixed_batch=fixed_batch(canonical), keep_ratio=config.keep_ratio)


class _Engine:
    """The pruned copy and the original, each run segment by segment over stored activations."""

    def __init__(self, canonical, data, train, config: SlimConfig, plan: MemoryPlan, profile):
        self.batching = Batching(train, plan.batch_size, run_size=fixed_batch(canonical))
        self.store = ActivationStore(self.batching.count, plan.store_ram // 2)
        self.reference_model = canonical
        self.current = SegmentRunner(data, self.batching, self.store, config.device, profile)
        # the reference's tensors share names with the pruned copy's: a store of their own
        self.ref_store = ActivationStore(self.batching.count, plan.store_ram // 2)
        self.reference = (SegmentRunner(data, self.batching, self.ref_store, config.device, profile)
                          if config.correct else None)
        self.profile = profile

    def close(self) -> None:
        self.store.close()
        self.ref_store.close()


def _chosen_groups(analysis: Analysis, only: tuple[str, ...] | None) -> tuple[ChannelGroup, ...]:
    if not only:
        return analysis.groups
    names = {name for g in analysis.groups for name in (g.producer, *g.producers)}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ThinetError(f"only: {', '.join(unknown)} is not a prunable producer "
                          f"(prunable: {', '.join(sorted(names))})", params=("only",))
    return tuple(g for g in analysis.groups if {g.producer, *g.producers} & set(only))


def _prune_waves(engine: _Engine, waves, config: SlimConfig, progress, pass_progress):
    current = onnx.ModelProto.FromString(engine.reference_model.SerializeToString())
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
        # Re-read the groups on the model as pruned so far: offsets into Concats and shape
        # constants shift when a neighbouring group has been cut.
        clock = time.perf_counter()
        fresh = {g.producer: g for g in analyze(current, prune_coupled=config.prune_coupled).groups}
        _add_time(engine.profile, "analysis", clock)
        missing = [g.producer for g in planned if g.producer not in fresh]
        if missing:
            raise InternalError(f"{', '.join(missing)} no longer prunable after earlier cuts")
        wave = [fresh[g.producer] for g in planned]
        applied = _prune_wave(engine, current, wave, config, rng, kept_outputs, advance, results)
        clock = time.perf_counter()
        current = infer_shapes(current)
        _forget_changed(engine, current, applied, _touched(g for later in waves[pass_index + 1:] for g in later))
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


def _prune_wave(engine: _Engine, current, wave, config: SlimConfig, rng, kept_outputs, advance, results):
    """Statistics, selection, reconstruction and surgery of one pass; returns what was cut."""
    reference = engine.reference_model if engine.reference is not None else None
    clock = time.perf_counter()
    inner = sum(engine.profile.get(k, 0.0) for k in ("onnxruntime", "io"))
    stats = channel_statistics(current, wave, engine.current, engine.reference, reference,
                               per_image=config.samples_per_image, seed=int(rng.integers(2**31)),
                               kept_outputs=kept_outputs, progress=advance)
    inner = sum(engine.profile.get(k, 0.0) for k in ("onnxruntime", "io")) - inner
    _add_time(engine.profile, "statistics", clock + inner)
    applied = []
    for group in wave:
        clock = time.perf_counter()
        keep = dict(config.keep_counts or ()).get(group.producer) or keep_count(
            group.channels, config.keep_ratio, max(config.channel_multiple, config.round_to))
        kept = (select_channels(config.method, group, stats[group.producer], keep,
                                _filter_l1(current, group), rng)
                if keep < group.channels else np.arange(group.channels))
        _add_time(engine.profile, "selection", clock)
        clock = time.perf_counter()
        if config.reconstruct == "full":
            refit_statistics(current, group, kept, stats[group.producer], engine.current, engine.reference,
                             reference, seed=int(rng.integers(2**31)), kept_outputs=kept_outputs)
        _add_time(engine.profile, "refit statistics", clock)
        clock = time.perf_counter()
        selection = reconstruct_channels(config.reconstruct, group, stats[group.producer], kept,
                                         config.ridge)
        _add_time(engine.profile, "refit solve", clock)
        filters = _kept_filters(current, group, selection.kept)  # read before the cut
        if len(selection.kept) < group.channels:
            deletions = _consumer_input_deletions(engine, group, selection.kept)
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


def _forget_changed(engine: _Engine, current, applied, future: set[str]) -> None:
    """Drop stored tensors that the cuts changed; consumer inputs lose the removed positions."""
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
    if engine.reference is not None:
        engine.reference.prune(engine.reference_model)


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
