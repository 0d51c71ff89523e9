"""Per-layer keep counts from a global budget, on plain arrays (no ONNX in here).

Each prunable group has an error curve e_g(k): the relative reconstruction error of its
readers when only k channels are kept. ThiNet's greedy removal yields that curve at every size
in one run (`greedy_error_curve`). The cost of a plan (FLOPs or parameters) is multilinear in
the keep ratios r_g = k_g / C_g: a Conv between two pruned groups costs f · r_in · r_out.
`allocate` removes channels where they buy the most cost per unit of squared error until the
plan fits the budget, so layers that hurt little give more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

__all__ = ["Allocation", "CostModel", "LayerPlan", "allocate", "allowed_keeps", "greedy_error_curve",
           "least_squares_curve"]


def greedy_error_curve(gram: np.ndarray, corr: np.ndarray, target_sq: float) -> tuple[np.ndarray, np.ndarray]:
    """ThiNet's greedy removal run to the end: (removal order, relative error with k kept).

    `errors[k]` for k = 0..C is ‖y − Σ_S x_c‖ / ‖y‖ for the set S of the k channels removed
    last; the channels kept at size k are `order[C - k:]`, exactly what `select_thinet` keeps.
    """
    gram = np.asarray(gram, dtype=np.float64)
    corr = np.asarray(corr, dtype=np.float64)
    n = gram.shape[0]
    kept = np.ones(n, dtype=bool)
    row_sums = gram.sum(axis=1)
    diag = np.diag(gram)
    value = float(target_sq - 2.0 * corr.sum() + row_sums.sum())  # ‖y − Σ_all x_c‖²
    values = np.empty(n + 1)
    values[n] = value
    order = np.empty(n, dtype=np.int64)
    for step in range(n):
        delta = 2.0 * corr - 2.0 * row_sums + diag
        delta[~kept] = np.inf
        c = int(np.argmin(delta))
        kept[c] = False
        row_sums -= gram[:, c]
        value += float(delta[c])
        order[step] = c
        values[n - step - 1] = value
    scale = float(target_sq) if target_sq > 0 else 1.0
    return order, np.sqrt(np.maximum(values, 0.0) / scale)


def least_squares_curve(gram: np.ndarray, corr: np.ndarray, target_sq: float, order: np.ndarray) -> np.ndarray:
    """Relative error after ThiNet's least-squares rescale for the nested kept sets of `order`.

    `errors[k]` = min_w ‖y − X_S w‖ / ‖y‖ with S = order[C − k:], for k = 0..C; the Cholesky
    factor of G_SS grows one channel at a time, so the whole curve costs one factorization.
    """
    gram = np.asarray(gram, dtype=np.float64)
    corr = np.asarray(corr, dtype=np.float64)
    n = gram.shape[0]
    jitter = 1e-10 * max(float(np.trace(gram)) / max(n, 1), 1e-30)
    factor = np.zeros((n, n))
    z = np.zeros(n)
    explained = np.zeros(n + 1)
    chosen: list[int] = []
    for k, c in enumerate(order[::-1]):
        row = linalg.solve_triangular(factor[:k, :k], gram[chosen, c], lower=True) if k else np.zeros(0)
        pivot = np.sqrt(max(gram[c, c] + jitter - float(row @ row), jitter))
        factor[k, :k], factor[k, k] = row, pivot
        z[k] = (corr[c] - float(row @ z[:k])) / pivot
        explained[k + 1] = explained[k] + z[k] ** 2
        chosen.append(int(c))
    scale = float(target_sq) if target_sq > 0 else 1.0
    return np.sqrt(np.maximum(float(target_sq) - explained, 0.0) / scale)


@dataclass(frozen=True)
class CostModel:
    """cost(r) = fixed + Σ_t coefficient_t · Π_{g ∈ groups_t} r_g, with r_g the keep ratio of group g."""

    fixed: float
    coefficients: tuple[float, ...]
    groups: tuple[tuple[int, ...], ...]

    def cost(self, ratios: np.ndarray) -> float:
        ratios = np.asarray(ratios, dtype=np.float64)
        return self.fixed + sum(c * float(np.prod(ratios[list(g)])) for c, g in zip(self.coefficients, self.groups))

    def full(self) -> float:
        return self.fixed + float(sum(self.coefficients))

    def slope(self, ratios: np.ndarray, group: int) -> float:
        """∂cost/∂r_group (the cost is linear in each ratio, so this is exact for one group's step)."""
        ratios = np.asarray(ratios, dtype=np.float64)
        total = 0.0
        for c, g in zip(self.coefficients, self.groups):
            if group in g:
                total += c * float(np.prod([ratios[h] for h in g if h != group]))
        return total


@dataclass(frozen=True)
class LayerPlan:
    keep: int
    channels: int
    error: float  # planned relative reconstruction error at this size (slice only)
    error_at_half: float
    cost_share: float  # this group's part of the original cost (all terms that touch it)
    next_price: float  # squared error per unit of cost fraction of its next cut (inf: at the floor)
    why: str


@dataclass(frozen=True)
class Allocation:
    layers: tuple[LayerPlan, ...]
    cost_fraction: float  # planned cost / original cost
    reached: bool  # whether the plan fits the budget
    price: float  # squared error per unit of cost fraction of the last cut taken


def allowed_keeps(channels: int, multiple: int = 1, floor: int = 1) -> np.ndarray:
    """Keep counts a group may take, ascending: multiples of `multiple` from `floor` up, and all."""
    multiple = max(1, multiple)
    start = max(multiple, -(-max(floor, 1) // multiple) * multiple)
    sizes = list(range(start, channels, multiple))
    return np.asarray(sorted(set(sizes) | {channels}), dtype=np.int64)


def allocate(
    curves: list[np.ndarray],
    costs: CostModel,
    target: float,
    multiple: int = 1,
    min_ratio: float = 0.05,
) -> Allocation:
    """Cut channels greedily, cheapest squared error per unit of cost first, until cost ≤ target.

    `curves[g]` is group g's error at k = 0..C kept; `target` is a fraction of the full cost.
    Curves are made non-increasing in k first (more channels never planned to hurt). Stops
    when the target is met or every group is at its floor (`reached` is then False).
    """
    curves = [np.minimum.accumulate(np.asarray(c, dtype=np.float64)) for c in curves]
    channels = [len(c) - 1 for c in curves]
    sizes = [allowed_keeps(c, multiple, int(np.ceil(min_ratio * c))) for c in channels]
    position = [len(s) - 1 for s in sizes]  # index into sizes: start from every channel kept
    full = costs.full()
    ratios = np.ones(len(curves))
    price = 0.0
    while costs.cost(ratios) > target * full + 1e-9 * full:
        best, best_price = -1, np.inf
        for g in range(len(curves)):
            step = _step_price(curves[g], sizes[g], position[g], costs, ratios, g, full)
            if step < best_price:
                best, best_price = g, step
        if best < 0:
            break
        position[best] -= 1
        ratios[best] = sizes[best][position[best]] / channels[best]
        price = max(price, best_price)
    layers = tuple(_layer_plan(curves[g], sizes[g], position[g], costs, ratios, g, full, price)
                   for g in range(len(curves)))
    fraction = costs.cost(ratios) / full if full > 0 else 1.0
    return Allocation(layers, fraction, fraction <= target + 1e-9, price)


def _step_price(curve, sizes, position, costs: CostModel, ratios, group: int, full: float) -> float:
    """Added squared error per unit of cost fraction saved by the group's next cut."""
    if position == 0:
        return np.inf
    now, after = sizes[position], sizes[position - 1]
    saved = costs.slope(ratios, group) * (now - after) / (len(curve) - 1) / full
    if saved <= 0:
        return np.inf
    return float(curve[after] ** 2 - curve[now] ** 2) / saved


def _layer_plan(curve, sizes, position, costs, ratios, group, full, price) -> LayerPlan:
    channels = len(curve) - 1
    keep = int(sizes[position])
    share = costs.slope(np.ones(len(ratios)), group) / full if full > 0 else 0.0
    next_price = _step_price(curve, sizes, position, costs, ratios, group, full)
    error, half = float(curve[keep]), float(curve[max(1, channels // 2)])
    if keep == channels:
        why = (f"kept whole: its first cut would add {next_price:.3g} squared output error per unit of "
               f"cost saved, more than the cuts taken elsewhere (up to {price:.3g})")
    elif position == 0:
        why = f"cut to the floor: error {error:.3f} even there, cheap for the {share:.0%} of the cost it touches"
    else:
        sensitivity = "low" if half < 0.05 else "moderate" if half < 0.15 else "high"
        why = (f"{sensitivity} sensitivity (error {half:.3f} at half width), touches {share:.0%} of the cost; "
               f"cut while cheaper than elsewhere: its next cut would add {next_price:.3g} squared error per "
               f"unit of cost saved (the budget was met at {price:.3g})")
    return LayerPlan(keep, channels, error, half, share, next_price, why)
