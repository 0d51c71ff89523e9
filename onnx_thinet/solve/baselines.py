"""Baseline channel selections the paper compares ThiNet with (no ONNX in here): LASSO on the
contributions (He et al. 2017), filter weight norms (Li et al. 2016), zero activations (Hu et
al. 2016) and chance."""

from __future__ import annotations

import numpy as np

__all__ = ["select_apoz", "select_l1", "select_lasso", "select_random"]


def select_lasso(gram: np.ndarray, corr: np.ndarray, keep: int, steps: int = 30) -> np.ndarray:
    """He et al. 2017: LASSO on the channel contributions, its penalty raised until at most
    `keep` coefficients are nonzero.

    Solved on the Gram matrix with columns scaled to unit norm, by coordinate descent; the
    penalty is bisected in log space with warm starts. When no penalty gives exactly `keep`,
    the survivors are completed by coefficient size from the densest solution with more.
    """
    g = np.asarray(gram, dtype=np.float64)
    b = np.asarray(corr, dtype=np.float64)
    diag = np.diag(g).copy()
    live = diag > 1e-12 * max(float(diag.max(initial=0.0)), 1e-300)
    scale = np.where(live, np.sqrt(np.where(live, diag, 1.0)), 1.0)
    g = g / scale[:, None] / scale[None, :]
    b = np.where(live, b / scale, 0.0)
    high = float(np.abs(b).max(initial=0.0))
    if high <= 0.0:
        return np.arange(keep)
    sparse = np.zeros(len(b))  # solution at `high`: nothing survives
    low = high * 1e-6
    dense = _lasso_descent(g, b, low, np.zeros(len(b)), live)
    if np.count_nonzero(dense) > keep:
        for _ in range(steps):
            mid = float(np.sqrt(low * high))
            beta = _lasso_descent(g, b, mid, dense.copy(), live)
            if np.count_nonzero(beta) > keep:
                low, dense = mid, beta
            else:
                high, sparse = mid, beta
                if np.count_nonzero(beta) == keep:
                    break
    else:
        sparse = dense
    chosen = list(np.flatnonzero(sparse))
    for c in np.argsort(-np.abs(dense), kind="stable"):
        if len(chosen) >= keep:
            break
        if c not in chosen:
            chosen.append(int(c))
    return np.sort(np.asarray(chosen[:keep], dtype=np.int64))


def _lasso_descent(g: np.ndarray, b: np.ndarray, penalty: float, beta: np.ndarray,
                   live: np.ndarray, sweeps: int = 200, tol: float = 1e-7) -> np.ndarray:
    """Coordinate descent on ½βᵀGβ − bᵀβ + penalty·‖β‖₁ (unit diagonal on `live` channels)."""
    residual = b - g @ beta
    order = np.flatnonzero(live)
    for _ in range(sweeps):
        largest = 0.0
        for j in order:
            rho = residual[j] + beta[j]
            new = np.sign(rho) * max(abs(rho) - penalty, 0.0)
            change = new - beta[j]
            if change != 0.0:
                residual -= g[:, j] * change
                beta[j] = new
                largest = max(largest, abs(change))
        if largest < tol:
            break
    return beta


def select_l1(filter_l1: np.ndarray, keep: int) -> np.ndarray:
    """Li et al. 2016: keep the filters with the largest sum of absolute weights."""
    return np.sort(np.argsort(-np.asarray(filter_l1), kind="stable")[:keep])


def select_apoz(zero_fraction: np.ndarray, keep: int) -> np.ndarray:
    """Hu et al. 2016: keep the channels whose activations are zero least often."""
    return np.sort(np.argsort(np.asarray(zero_fraction), kind="stable")[:keep])


def select_random(channels: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(channels, size=keep, replace=False))
