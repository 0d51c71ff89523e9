"""What a slimming run takes and gives: its options, per-group results and the JSON report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import onnx

from onnx_thinet.calibration.plan import MemoryPlan
from onnx_thinet.channels.analysis import Analysis
from onnx_thinet.check.verify import OutputComparison
from onnx_thinet.errors import ThinetError
from onnx_thinet.io.canonical import CanonicalStep
from onnx_thinet.solve.selection import METHODS, RECONSTRUCTIONS

__all__ = [
    "GroupResult",
    "PassInfo",
    "PassProgress",
    "Progress",
    "SlimConfig",
    "SlimResult",
]

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
