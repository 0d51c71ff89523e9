"""Channel selection and least-squares reconstruction on plain arrays (no ONNX in here).

All ThiNet-style solvers work on sufficient statistics of the sampled problem
    y ≈ Σ_c w_c x_c      (one row per sampled consumer output)
namely the Gram matrix G = XᵀX, the correlation b = Xᵀy and ‖y‖². For plain ThiNet the target
is the unpruned output, so b = G·1 and ‖y‖² = 1ᵀG1; error-correcting statistics pass other b.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

__all__ = [
    "keep_count",
    "reconstruction_error",
    "refit_error",
    "refit_least_squares",
    "rescale_least_squares",
    "select_apoz",
    "select_l1",
    "select_random",
    "select_thinet",
    "select_thinet_ls",
]


def keep_count(channels: int, keep_ratio: float, multiple: int = 1) -> int:
    """Channels kept for a ratio: at least one, rounded up to `multiple` (fast kernels), at most all."""
    k = max(1, int(round(channels * keep_ratio)))
    if multiple > 1:
        k = -(-k // multiple) * multiple
    return min(channels, k)


def select_thinet(gram: np.ndarray, corr: np.ndarray, target_sq: float, keep: int) -> np.ndarray:
    """ThiNet's greedy: drop, one at a time, the channel whose removal hurts ‖y − Σ_S x_c‖² least.

    With b = G·1 this is exactly the paper's rule (grow the removed set T keeping ‖Σ_T x_c‖²
    smallest). O(C²) on the Gram matrix instead of a pass over all samples per candidate.
    """
    gram = np.asarray(gram, dtype=np.float64)
    corr = np.asarray(corr, dtype=np.float64)
    n = gram.shape[0]
    kept = np.ones(n, dtype=bool)
    row_sums = gram.sum(axis=1)  # Σ_{j∈S} G_cj for the current kept set S
    diag = np.diag(gram)
    for _ in range(n - keep):
        # value(S∖{c}) − value(S) = 2 b_c − 2 Σ_{j∈S} G_cj + G_cc
        delta = 2.0 * corr - 2.0 * row_sums + diag
        delta[~kept] = np.inf
        c = int(np.argmin(delta))
        kept[c] = False
        row_sums -= gram[:, c]
    return np.flatnonzero(kept)


def select_thinet_ls(gram: np.ndarray, corr: np.ndarray, keep: int, ridge: float = 1e-9) -> np.ndarray:
    """Forward selection with refit (orthogonal matching pursuit) on the Gram matrix.

    Each step adds the channel most correlated with the current residual, then re-solves
    least squares on the selected set through an incrementally grown Cholesky factor.
    """
    gram = np.asarray(gram, dtype=np.float64)
    corr = np.asarray(corr, dtype=np.float64)
    n = gram.shape[0]
    jitter = ridge * max(float(np.trace(gram)) / max(n, 1), 1e-30)
    chosen: list[int] = []
    factor = np.zeros((0, 0))
    weights = np.zeros(0)
    available = np.ones(n, dtype=bool)
    diag = np.diag(gram) + jitter
    for _ in range(keep):
        residual_corr = corr - gram[:, chosen] @ weights if chosen else corr.copy()
        score = residual_corr**2 / diag
        score[~available] = -np.inf
        c = int(np.argmax(score))
        factor = _cholesky_append(factor, gram[np.ix_(chosen, [c])].ravel(), diag[c])
        chosen.append(c)
        available[c] = False
        rhs = corr[chosen]
        weights = linalg.cho_solve((factor, True), rhs)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _cholesky_append(factor: np.ndarray, cross: np.ndarray, diag: float) -> np.ndarray:
    """Lower Cholesky factor of [[A, v], [vᵀ, d]] from the factor of A."""
    k = factor.shape[0]
    grown = np.zeros((k + 1, k + 1))
    grown[:k, :k] = factor
    if k:
        row = linalg.solve_triangular(factor, cross, lower=True)
        grown[k, :k] = row
        rest = diag - float(row @ row)
    else:
        rest = diag
    grown[k, k] = np.sqrt(max(rest, diag * 1e-12, 1e-300))
    return grown


def rescale_least_squares(
    gram: np.ndarray, corr: np.ndarray, kept: np.ndarray, ridge: float = 1e-10
) -> np.ndarray:
    """ŵ = argmin ‖y − X_S w‖² in float64; a tiny ridge keeps rank-deficient sets solvable."""
    kept = np.asarray(kept, dtype=np.int64)
    sub = np.asarray(gram, dtype=np.float64)[np.ix_(kept, kept)]
    rhs = np.asarray(corr, dtype=np.float64)[kept]
    scale = max(float(np.trace(sub)) / max(len(kept), 1), 1e-30)
    try:
        return linalg.solve(sub + ridge * scale * np.eye(len(kept)), rhs, assume_a="pos")
    except (linalg.LinAlgError, ValueError):
        return linalg.lstsq(sub, rhs)[0]


def reconstruction_error(
    gram: np.ndarray, corr: np.ndarray, target_sq: float, kept: np.ndarray, weights: np.ndarray
) -> float:
    """Relative error ‖y − X_S w‖ / ‖y‖ from the statistics alone."""
    kept = np.asarray(kept, dtype=np.int64)
    sub = np.asarray(gram, dtype=np.float64)[np.ix_(kept, kept)]
    w = np.asarray(weights, dtype=np.float64)
    sq = target_sq - 2.0 * float(corr[kept] @ w) + float(w @ sub @ w)
    return float(np.sqrt(max(sq, 0.0) / target_sq)) if target_sq > 0 else 0.0


def _augmented(gram, cross, input_sum, target_sum, count, columns, intercept: bool):
    a = np.asarray(gram, dtype=np.float64)[np.ix_(columns, columns)]
    b = np.asarray(cross, dtype=np.float64)[columns]
    if not intercept:
        return a, b
    s = np.asarray(input_sum, dtype=np.float64)[columns]
    a = np.block([[a, s[:, None]], [s[None, :], np.array([[float(count)]])]])
    b = np.vstack([b, np.asarray(target_sum, dtype=np.float64)[None, :]])
    return a, b


def refit_least_squares(
    gram: np.ndarray,
    cross: np.ndarray,
    input_sum: np.ndarray,
    target_sum: np.ndarray,
    count: int,
    columns: np.ndarray,
    intercept: bool = True,
    ridge: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-fit a whole layer on the kept inputs: argmin ‖T − P_cols W − 1 bᵀ‖², all outputs at once.

    Returns W (len(columns), F) and b (F,) (zeros without `intercept`). The bias absorbs the
    mean shift that removing channels leaves behind. A ridge relative to the mean diagonal
    keeps the solve well-posed when samples are few or inputs collinear.
    """
    a, b = _augmented(gram, cross, input_sum, target_sum, count, columns, intercept)
    scale = max(float(np.trace(a)) / max(len(a), 1), 1e-30)
    try:
        solution = linalg.solve(a + ridge * scale * np.eye(len(a)), b, assume_a="pos")
    except (linalg.LinAlgError, ValueError):
        solution = linalg.lstsq(a, b)[0]
    if intercept:
        return solution[:-1], solution[-1]
    return solution, np.zeros(b.shape[1])


def refit_error(
    gram, cross, input_sum, target_sum, count, target_sq: float, columns, weights, bias
) -> float:
    """Relative error ‖T − P W − 1 bᵀ‖ / ‖T‖ of a refit, from the statistics alone."""
    a, b = _augmented(gram, cross, input_sum, target_sum, count, columns, True)
    theta = np.vstack([weights, np.asarray(bias)[None, :]])
    sq = target_sq - 2.0 * float(np.sum(theta * b)) + float(np.sum(theta * (a @ theta)))
    return float(np.sqrt(max(sq, 0.0) / target_sq)) if target_sq > 0 else 0.0


def select_l1(filter_l1: np.ndarray, keep: int) -> np.ndarray:
    """Li et al. 2016: keep the filters with the largest sum of absolute weights."""
    return np.sort(np.argsort(-np.asarray(filter_l1), kind="stable")[:keep])


def select_apoz(zero_fraction: np.ndarray, keep: int) -> np.ndarray:
    """Hu et al. 2016: keep the channels whose activations are zero least often."""
    return np.sort(np.argsort(np.asarray(zero_fraction), kind="stable")[:keep])


def select_random(channels: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(channels, size=keep, replace=False))
