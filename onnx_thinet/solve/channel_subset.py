"""Choosing which input channels of a layer to keep, from the statistics of its readers, and
ThiNet's per-channel rescale of the kept ones (no ONNX in here).

The statistics are those of `solvers.py`: the Gram matrix G = XᵀX of the per-channel
contributions, the correlation b = Xᵀy and ‖y‖².
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

__all__ = ["keep_count", "reconstruction_error", "rescale_least_squares", "select_thinet", "select_thinet_ls"]


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
