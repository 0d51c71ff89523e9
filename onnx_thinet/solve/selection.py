"""From a group's statistics to kept channels and consumer scales, for each `--method`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import reduce

import numpy as np

from onnx_thinet.calibration.collect import ConsumerStats
from onnx_thinet.channels.layout import ChannelGroup, Consumer, removed_positions
from onnx_thinet.errors import ThinetError
from onnx_thinet.solve.baselines import select_apoz, select_l1, select_lasso, select_random
from onnx_thinet.solve.solvers import (
    choose_ridge,
    reconstruction_error,
    refit_with_error,
    rescale_least_squares,
    select_thinet,
    select_thinet_ls,
)
from onnx_thinet.solve.threads import blas_threads_for

__all__ = [
    "METHODS",
    "RECONSTRUCTIONS",
    "Refit",
    "Selection",
    "choose_channels",
    "reconstruct_channels",
    "select_channels",
]

METHODS = ("thinet", "thinet-ls", "l1", "apoz", "random", "lasso")
RECONSTRUCTIONS = ("none", "scale", "full")


@dataclass(frozen=True)
class Refit:
    """A consumer's new weight on the kept inputs, as a [K_kept, F] matrix, and its bias."""

    matrix: np.ndarray
    bias: np.ndarray | None
    ridge: float = 0.0  # the relative ridge used (cross-validated unless given)


@dataclass(frozen=True)
class Selection:
    kept: np.ndarray
    scales: dict[str, np.ndarray] | None
    error_before: float  # relative output error of the consumers after slicing only
    error_after: float  # ... after reconstruction
    refits: dict[str, Refit] | None = None


def choose_channels(
    method: str,
    reconstruct: str,
    group: ChannelGroup,
    stats: Mapping[str, ConsumerStats],
    keep: int,
    filter_l1: np.ndarray | None,
    rng: np.random.Generator,
    ridge: float | None = None,
) -> Selection:
    """Pick `keep` channels with `method` (several consumers: their samples stacked), then
    reconstruct: `none` slices, `scale` fits one factor per kept channel, `full` re-fits every
    consumer weight and bias on the kept inputs."""
    kept = select_channels(method, group, stats, keep, filter_l1, rng)
    return reconstruct_channels(reconstruct, group, stats, kept, ridge)


def select_channels(method: str, group: ChannelGroup, stats: Mapping[str, ConsumerStats], keep: int,
                    filter_l1: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """The `keep` input channels `method` picks (several consumers: their samples stacked)."""
    if method not in METHODS:
        raise ThinetError(f"method must be one of {', '.join(METHODS)} (got {method!r})", params=("method",))
    total = reduce(ConsumerStats.merged, stats.values())
    with blas_threads_for(total.channels):
        return _select(method, total, keep, filter_l1, rng)


def reconstruct_channels(reconstruct: str, group: ChannelGroup, stats: Mapping[str, ConsumerStats],
                         kept: np.ndarray, ridge: float | None = None,
                         ridges_chosen: dict[int, float] | None = None,
                         rescaled: Collection[str] = ()) -> Selection:
    """Reconstruct the consumers on `kept`: `none` slices, `scale` fits one factor per kept
    channel, `full` re-fits every consumer weight and bias (needs their RefitStats), except
    the `rescaled` consumers, which it scales (a later pass refits them).

    `ridges_chosen` (updated here) maps a refit's number of unknowns to the ridge its last
    cross-validation chose: a network repeats its layer shapes, and their ridges are alike,
    so the next search of that size starts there (ResNet-50's 1,152-unknown layers chose 10
    five times in six, each after six ridges walked from the grid's middle)."""
    if reconstruct not in RECONSTRUCTIONS:
        raise ThinetError(f"reconstruct must be one of {', '.join(RECONSTRUCTIONS)}", params=("reconstruct",))
    ones = np.ones(len(kept))
    before = _stacked_error(stats, kept, {name: ones for name in stats})
    if reconstruct == "none":
        return Selection(kept, None, before, before)
    if reconstruct == "full":
        return _refit_consumers(group, stats, kept, before, ridge, {} if ridges_chosen is None else ridges_chosen,
                                frozenset(rescaled))
    scales = {name: rescale_least_squares(s.gram, s.corr, kept) for name, s in stats.items()}
    return Selection(kept, scales, before, _stacked_error(stats, kept, scales))


def _select(method: str, total: ConsumerStats, keep: int, filter_l1, rng) -> np.ndarray:
    if keep >= total.channels:
        return np.arange(total.channels)
    if method == "thinet":
        return select_thinet(total.gram, total.corr, total.target_sq, keep)
    if method == "thinet-ls":
        return select_thinet_ls(total.gram, total.corr, keep)
    if method == "l1":
        return select_l1(filter_l1, keep)
    if method == "apoz":
        return select_apoz(total.zeros / max(total.elements, 1), keep)
    if method == "lasso":
        return select_lasso(total.gram, total.corr, keep)
    return select_random(total.channels, keep, rng)


def _refit_consumers(group: ChannelGroup, stats, kept: np.ndarray, before: float,
                     ridge: float | None, ridges_chosen: dict[int, float], rescaled: frozenset[str]) -> Selection:
    refits, scales, squared, total = {}, {}, 0.0, 0.0
    for consumer in group.consumers:
        if consumer.node in rescaled:
            own = stats[consumer.node]
            scales[consumer.node] = rescale_least_squares(own.gram, own.corr, kept)
            error = reconstruction_error(own.gram, own.corr, own.target_sq, kept, scales[consumer.node])
            squared += error**2 * own.target_sq
            total += own.target_sq
            continue
        refit = stats[consumer.node].refit
        if refit is None:
            raise ValueError(f"no refit statistics for {consumer.node}")
        columns = _refit_columns(consumer, group.channels, refit, kept)
        intercept = consumer.bias_index is not None
        with blas_threads_for(len(columns)):
            if ridge is None:
                chosen = choose_ridge(refit.folds, columns, intercept, prior=refit.prior,
                                      near=ridges_chosen.get(len(columns)))
                ridges_chosen[len(columns)] = chosen
            else:
                chosen = ridge
            moments = refit.total
            matrix, bias, error = refit_with_error(moments, columns, intercept=intercept, ridge=chosen,
                                                   prior=refit.prior)
        squared += error**2 * moments.target_sq
        total += moments.target_sq
        refits[consumer.node] = Refit(matrix, bias if intercept else None, chosen)
    after = float(np.sqrt(squared / total)) if total > 0 else 0.0
    return Selection(kept, scales or None, before, after, refits)


def _refit_columns(consumer: Consumer, channels: int, refit, kept: np.ndarray) -> np.ndarray:
    """Refit inputs that survive: every window position of every input position not removed."""
    if refit.columns_kept:
        return np.arange(refit.dims)
    lost = removed_positions(consumer.weight.layout, kept, channels, refit.in_channels)
    inputs = np.setdiff1d(np.arange(refit.in_channels), lost)
    window = refit.dims // refit.in_channels
    return (inputs[:, None] * window + np.arange(window)[None, :]).ravel()


def _stacked_error(stats: Mapping[str, ConsumerStats], kept, scales) -> float:
    squared = target = 0.0
    for name, s in stats.items():
        rel = reconstruction_error(s.gram, s.corr, s.target_sq, kept, scales[name])
        squared += rel**2 * s.target_sq
        target += s.target_sq
    return float(np.sqrt(squared / target)) if target > 0 else 0.0
