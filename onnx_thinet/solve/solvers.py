"""Least-squares reconstruction of a layer's readers on plain arrays (no ONNX in here): refits
and the cross-validation of their ridge. Channel selection and ThiNet's per-channel rescale
are in `channel_subset.py`, exported here too.

All ThiNet-style solvers work on sufficient statistics of the sampled problem
    y ≈ Σ_c w_c x_c      (one row per sampled consumer output)
namely the Gram matrix G = XᵀX, the correlation b = Xᵀy and ‖y‖². For plain ThiNet the target
is the unpruned output, so b = G·1 and ‖y‖² = 1ᵀG1; error-correcting statistics pass other b.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import linalg

from onnx_thinet.solve.channel_subset import (
    keep_count,
    reconstruction_error,
    rescale_least_squares,
    select_thinet,
    select_thinet_ls,
)
from onnx_thinet.solve.moments import FLOAT32_DIMS, FitMoments, FitSamples
from onnx_thinet.solve.threads import concurrently

__all__ = [
    "RIDGE_GRID",
    "choose_ridge",
    "descend_grid",
    "keep_count",
    "reconstruction_error",
    "refit_error",
    "refit_least_squares",
    "refit_with_error",
    "rescale_least_squares",
    "select_thinet",
    "select_thinet_ls",
]


def _dual_problem(m: FitSamples, columns: np.ndarray, intercept: bool, prior: np.ndarray | None):
    """Centred rows Pc, residual R = Tc − Pc W₀, kernel eigen-pairs, means and the mean variance."""
    p, t = m.rows(columns)
    mean_p = p.mean(axis=0) if intercept and len(p) else np.zeros(p.shape[1])
    mean_t = t.mean(axis=0) if intercept and len(t) else np.zeros(t.shape[1])
    pc, tc = p - mean_p, t - mean_t
    base = np.zeros((p.shape[1], t.shape[1])) if prior is None else _rows(prior, columns)
    residual = tc - pc @ base
    values, vectors = _eigh(pc @ pc.T)
    mean_var = max(float(np.sum(pc * pc)) / max(len(columns), 1), 1e-30)
    return pc, residual, values, vectors, mean_p, mean_t, base, mean_var


def _rows(matrix: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """matrix[columns] without a copy when the columns are all rows in order (a wide FC prior)."""
    return matrix if _everything(columns, len(matrix)) else matrix[columns]


def _block(matrix: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """matrix[rows][:, columns], read-only: the matrix itself when both take everything in order
    (refit moments hold the kept inputs alone; a fancy-indexed copy of 2,304² costs 7x a copy)."""
    if _everything(rows, matrix.shape[0]) and _everything(columns, matrix.shape[1]):
        return matrix
    if _everything(rows, matrix.shape[0]):
        return matrix[:, columns]
    return matrix[np.ix_(rows, columns)]


def _everything(index: np.ndarray, length: int) -> bool:
    return len(index) == length and np.array_equal(index, np.arange(length))


def _dual_gain(values: np.ndarray, ridge: float, mean_var: float) -> np.ndarray:
    """1/(s + λ) on the kernel's eigenvalues; directions no row sees keep W₀ (min-norm change)."""
    floor = max(float(values.max(initial=0.0)), 1e-30) * 1e-12
    shrink = values + ridge * mean_var
    return np.where(shrink > floor, 1.0 / np.maximum(shrink, floor), 0.0)


def _refit_dual(m: FitSamples, columns, intercept: bool, ridge: float, prior):
    pc, residual, values, vectors, mean_p, mean_t, base, mean_var = _dual_problem(m, columns, intercept, prior)
    coef = vectors @ (_dual_gain(values, ridge, mean_var)[:, None] * (vectors.T @ residual))
    weights = base + pc.T @ coef
    bias = mean_t - mean_p @ weights if intercept else np.zeros(m.outputs)
    return weights, bias


def _choose_ridge_dual(folds, columns, intercept: bool, prior, grid) -> float:
    """`choose_ridge` on kept rows: each fold's prediction of the other, through n×n kernels."""
    scored = scored_outputs(folds[0].outputs)  # the outputs the moment path scores
    errors = np.zeros(len(grid))
    for train, test in ((folds[0], folds[1]), (folds[1], folds[0])):
        pc, residual, values, vectors, mean_p, mean_t, base, mean_var = _dual_problem(
            train, columns, intercept, prior)
        p_test, t_test = test.rows(columns)
        q = p_test - mean_p
        fixed = q @ base[:, scored] + mean_t[scored] - t_test[:, scored]
        across = (q @ pc.T) @ vectors
        projected = vectors.T @ residual[:, scored]
        for k, ridge in enumerate(grid):
            pred = fixed + across @ (_dual_gain(values, ridge, mean_var)[:, None] * projected)
            errors[k] += float(np.sum(pred * pred))
    return float(grid[descend_grid(lambda k: errors[k], len(grid), _grid_start(folds, columns, grid, None))])


def _centered(m: FitMoments, columns: np.ndarray, intercept: bool,
              outputs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of the weights alone (of `outputs`, default all); with an intercept,
    inputs and targets are centred."""
    outputs = np.arange(m.outputs) if outputs is None else outputs
    g, c = _block(m.gram, columns, columns), _block(m.cross, columns, outputs)
    g = g.copy() if g is m.gram else g  # centred in place below
    c = c.copy() if c is m.cross else c
    if intercept and m.count:
        s = m.input_sum[columns]
        g -= np.outer(s, s / m.count)
        c -= np.outer(s, m.target_sum[outputs] / m.count)
    return g, c


def _bias(m: FitMoments, columns: np.ndarray, weights: np.ndarray, intercept: bool,
          outputs: np.ndarray | None = None) -> np.ndarray:
    if not intercept or not m.count:
        return np.zeros(weights.shape[1])
    target_sum = m.target_sum if outputs is None else m.target_sum[outputs]
    return (target_sum - m.input_sum[columns] @ weights) / m.count


def _eigh(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-pairs of a symmetric matrix by divide and conquer (1.5x LAPACK's default on 2,304²)."""
    return linalg.eigh(g, driver="evd")


def _shifted_cholesky_solve(g: np.ndarray, penalty: float, rhs: np.ndarray) -> np.ndarray:
    """(G + penalty·I)⁻¹ rhs by a Cholesky factor, in G's precision; raises LinAlgError when
    the shifted G is not positive definite.

    G is symmetric, so the transpose of its row-major copy is the same matrix in LAPACK's
    column order: factored in place, with no transposing copy (with it, 1,152² and 2,304²
    factors in float32 and float64 took 1.1x to 2.2x as long)."""
    shifted = g.copy().T
    shifted.flat[:: len(g) + 1] += penalty
    factor = linalg.cho_factor(shifted, lower=True, overwrite_a=True, check_finite=False)
    return linalg.cho_solve(factor, rhs, check_finite=False)


def _floored_solve(g: np.ndarray, rhs: np.ndarray, penalty: float) -> tuple[np.ndarray, bool]:
    """(G + penalty·I)⁻¹ rhs, with no step along directions G does not see (eigenvalue under
    1e-12 of the largest): inputs that duplicate channels make G singular, and a plain solve
    turns float rounding there into huge cancelling weights. `choose_ridge` scores this solve.
    Also returns whether it was the plain solve (a Cholesky factor of G + penalty·I)."""
    if penalty >= 1e-10 * max(float(np.trace(g)), 0.0) > 0.0:
        # every eigenvalue plus the penalty clears the floor (the largest is at most the
        # trace): the floored solve is the plain one, and a Cholesky factor is 10x an eigh
        try:
            return _shifted_cholesky_solve(g, penalty, rhs), True
        except linalg.LinAlgError:
            pass
    values, vectors = _eigh(g)
    floor = max(float(values.max(initial=0.0)), 1e-30) * 1e-12
    shrink = values + penalty
    gain = np.where(shrink > floor, 1.0 / np.maximum(shrink, floor), 0.0)
    return vectors @ (gain[:, None] * (vectors.T @ rhs)), False


def refit_least_squares(
    moments: FitMoments,
    columns: np.ndarray,
    intercept: bool = True,
    ridge: float = 0.0,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-fit a whole layer on the kept inputs, all outputs at once:

        argmin ‖T − P_cols W − 1 bᵀ‖² + λ‖W − W₀‖²,   λ = ridge × the mean input variance.

    Returns W (len(columns), F) and b (F,) (zeros without `intercept`). The bias absorbs the
    mean shift that removing channels leaves behind. `prior` (full [dims, F]; its kept rows are
    W₀) is what the fit shrinks toward: the layer's own weights, so that a fit from few samples
    stays near the unpruned layer instead of near zero.
    """
    return _refit(moments, np.asarray(columns, dtype=np.int64), intercept, ridge, prior, scored=False)[:2]


def refit_with_error(moments: FitMoments, columns: np.ndarray, intercept: bool = True, ridge: float = 0.0,
                     prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """`refit_least_squares` and the fit's `refit_error`. Where the shifted Gram was factored,
    G·W = C − λ·(W − W₀) gives the error without a product of G with W (ResNet-50: 0.5 s)."""
    return _refit(moments, np.asarray(columns, dtype=np.int64), intercept, ridge, prior, scored=True)


def _refit(moments, columns: np.ndarray, intercept: bool, ridge: float, prior, scored: bool):
    if isinstance(moments, FitSamples):
        weights, bias = _refit_dual(moments, columns, intercept, ridge, prior)
        return weights, bias, refit_error(moments, columns, weights, bias) if scored else None
    g, c = _centered(moments, columns, intercept)
    penalty = ridge * max(float(np.trace(g)) / max(len(columns), 1), 1e-30)
    base = np.zeros_like(c) if prior is None else prior[columns]
    # solve for the change from W₀: with too few samples, the least change
    step, factored = _refit_step(g, c, base, penalty)
    weights = base + step
    bias = _bias(moments, columns, weights, intercept)
    if not scored:
        return weights, bias, None
    if not factored:  # the floored directions break the identity: the product it is
        return weights, bias, refit_error(moments, columns, weights, bias)
    centred_sq = moments.target_sq
    if intercept and moments.count:
        centred_sq -= float(moments.target_sum @ moments.target_sum) / moments.count
    sq = centred_sq - float(np.sum(weights * c)) - penalty * float(np.sum(weights * step))
    return weights, bias, _relative(sq, moments.target_sq)


# A wide refit whose ridge bounds the shifted Gram's condition number by this solves in float32:
# (G + pI)'s is at most (trace + p) / p, so the step is off by at most ~1e3 float32 roundings
# (6e-5 of it), and the float64 factor and solve were ResNet-50's largest refit cost.
SINGLE_CONDITION = 1e3


def _refit_step(g: np.ndarray, c: np.ndarray, base: np.ndarray, penalty: float) -> tuple[np.ndarray, bool]:
    """`_floored_solve` of G·step = C − G·W₀, in float32 (the product too) where it is a wide,
    well-conditioned system."""
    if len(g) >= FLOAT32_DIMS and penalty > 0 and float(np.trace(g)) <= SINGLE_CONDITION * penalty:
        single = g.astype(np.float32)
        rhs = c.astype(np.float32) - single @ base.astype(np.float32)
        try:
            return _shifted_cholesky_solve(single, penalty, rhs).astype(np.float64), True
        except linalg.LinAlgError:
            pass
    return _floored_solve(g, c - g @ base, penalty)


def refit_error(moments: FitMoments, columns: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> float:
    """Relative error ‖T − P W − 1 bᵀ‖ / ‖T‖ of a refit, from the moments alone."""
    if isinstance(moments, FitSamples):
        p, t = moments.rows(np.asarray(columns, dtype=np.int64))
        diff = t - p @ weights - bias
        sq = float(np.sum(diff * diff))
    else:
        sq = _squared_error(moments, np.asarray(columns, dtype=np.int64), weights, bias)
    return _relative(sq, moments.target_sq)


def _relative(squared: float, target_sq: float) -> float:
    return float(np.sqrt(max(squared, 0.0) / target_sq)) if target_sq > 0 else 0.0


def _squared_error(m: FitMoments, columns: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return m.target_sq + _HeldOutError(m, columns, np.arange(m.outputs))(w, b)


RIDGE_GRID = (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 10.0, 1e3)


# From this size the two sides of the cross-validation solve at once, on one BLAS thread each
# (ResNet-50's 1,152-unknown folds: 0.34-0.41 s in turn on two threads, 0.20-0.23 s at once;
# below a few hundred unknowns handing a side to another thread costs about what it solves).
CONCURRENT_UNKNOWNS = 256


def _in_turn(calls):
    return [call() for call in calls]


def choose_ridge(
    folds: tuple[FitMoments, FitMoments],
    columns: np.ndarray,
    intercept: bool = True,
    prior: np.ndarray | None = None,
    grid: tuple[float, ...] = RIDGE_GRID,
    near: float | None = None,
) -> float:
    """Two-fold cross-validation of the refit's ridge on moments of disjoint images.

    An exact fit (planted redundancy) scores 0 at ridge 0 and keeps it; a fit from a few
    hundred noisy images is pulled toward `prior` as far as helps on images it did not see
    (the largest ridge is plain slicing with a bias correction). The grid is walked downhill
    (`descend_grid`) from the grid point nearest `near` (the choice for a similar layer),
    else from its middle, each ridge scored with the solve the refit itself uses.
    """
    columns = np.asarray(columns, dtype=np.int64)
    if min(f.count for f in folds) <= 1:
        return 1e-2
    if isinstance(folds[0], FitSamples):
        return _choose_ridge_dual(folds, columns, intercept, prior, grid)
    scored = scored_outputs(folds[0].outputs)
    run = concurrently if len(columns) >= CONCURRENT_UNKNOWNS else _in_turn
    sides = run([functools.partial(_HeldOutFit, train, test, columns, intercept, prior, scored)
                 for train, test in ((folds[0], folds[1]), (folds[1], folds[0]))])

    def error(k: int) -> float:
        return sum(run([functools.partial(side.error, grid[k]) for side in sides]))

    return float(grid[descend_grid(error, len(grid), _grid_start(folds, columns, grid, near))])


def _grid_start(folds, columns: np.ndarray, grid, near: float | None) -> int | None:
    """Where the walk starts: at the largest ridge when a fold has fewer rows than unknowns
    (such a fit is mostly its prior: ResNet-50's last 3x3 layers, 1,421 rows for 2,304
    unknowns, chose the largest every time, after six solves from the middle), else at the
    grid point nearest `near` (on a log scale, 0 nearest to 0), else the middle (None)."""
    if min(f.count for f in folds) < len(columns):
        return len(grid) - 1
    if near is None:
        return None
    if near <= 0:
        return int(np.argmin(grid))
    logs = np.log([g if g > 0 else np.inf for g in grid])
    return int(np.argmin(np.abs(logs - np.log(near))))


def descend_grid(error, count: int, start: int | None = None) -> int:
    """Index of a local minimum of `error` over 0..count-1, walking downhill from `start`
    (default: the middle).

    Held-out error against the ridge falls to one minimum and rises again, so the walk finds
    the grid's best point with about half of the solves, or fewer from a start near it; ties
    keep the smaller ridge.
    """
    known: dict[int, float] = {}

    def at(k: int) -> float:
        if k not in known:
            known[k] = error(k)
        return known[k]

    k = count // 2 if start is None else start
    for step in (-1, 1):
        moved = False
        while 0 <= k + step < count and (at(k + step) < at(k) or (step < 0 and at(k + step) == at(k))):
            k, moved = k + step, True
        if moved:
            break
    return k


class _HeldOutFit:
    """One cross-validation side: fit on `train` at a given ridge, score on `test`."""

    def __init__(self, train: FitMoments, test: FitMoments, columns: np.ndarray, intercept: bool,
                 prior: np.ndarray | None, scored: np.ndarray):
        self.train, self.columns, self.intercept, self.scored = train, columns, intercept, scored
        self.gram, cross = _centered(train, columns, intercept, scored)
        self.base = np.zeros_like(cross) if prior is None else _block(prior, columns, scored)
        self.rhs = cross - self.gram @ self.base
        self.mean_var = max(float(np.trace(self.gram)) / max(len(columns), 1), 1e-30)
        self.score = _HeldOutError(test, columns, scored, single=len(columns) >= FLOAT32_DIMS)

    def error(self, ridge: float) -> float:
        if len(self.gram) < FLOAT32_DIMS:
            step = _floored_solve(self.gram, self.rhs, ridge * self.mean_var)[0]  # a Cholesky or two
        else:
            step = self._single_step(ridge)
        w = self.base + step
        return self.score(w, _bias(self.train, self.columns, w, self.intercept, self.scored))

    def _single_step(self, ridge: float) -> np.ndarray:
        """The floored solve in float32 for a wide layer: a Cholesky factor per ridge (a tenth of
        an eigh on 2,304², and held-out errors closer to float64's: ResNet-50's 2,304² folds
        within 4.3e-4 at the grid's smallest ridge against 4.9e-3 for the eigh); the eigen-pairs
        where the ridge is 0 or the factor fails."""
        if ridge > 0:
            gram, rhs = self._single
            try:
                return _shifted_cholesky_solve(gram, ridge * self.mean_var, rhs).astype(np.float64)
            except linalg.LinAlgError:
                pass
        return self._eigen_step(ridge)

    @functools.cached_property
    def _single(self) -> tuple[np.ndarray, np.ndarray]:
        """The Gram and right-hand side in float32, cast once for every ridge the walk scores."""
        return self.gram.astype(np.float32), self.rhs.astype(np.float32)

    @functools.cached_property
    def _eigen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values, vectors = linalg.eigh(self._single[0], driver="evd")
        return values.astype(np.float64), vectors, vectors.T.astype(np.float64) @ self.rhs

    def _eigen_step(self, ridge: float) -> np.ndarray:
        """The floored solve from float32 eigen-pairs, decomposed once per fold: ridge 0, where
        directions the fold does not see must be left alone, or a factor that failed."""
        values, vectors, projected = self._eigen
        floor = max(float(values.max()), 1e-30) * 1e-12
        shrink = values + ridge * self.mean_var
        # directions the training fold does not see at all keep W₀ (a min-norm change)
        step = np.where((shrink > floor)[:, None], projected / np.maximum(shrink, floor)[:, None], 0.0)
        return (vectors @ step.astype(np.float32)).astype(np.float64)  # float32 pairs, float32 product


SCORED_OUTPUTS = 128


def scored_outputs(outputs: int, count: int = SCORED_OUTPUTS) -> np.ndarray:
    """Evenly spaced outputs to score the ridge grid on: one ridge serves all of a layer's
    outputs, and the mean held-out error of 128 of them ranks the grid as all of them would,
    for a fraction of the products (VGG-16's 512-filter layers: a quarter)."""
    if outputs <= count:
        return np.arange(outputs)
    return np.unique(np.linspace(0, outputs - 1, count).round().astype(np.int64))


class _HeldOutError:
    """‖T − P W − 1 bᵀ‖² on a held-out fold's moments, up to a constant (‖T‖², which does not
    depend on the fit), for the `outputs` scored; the fold's Gram is sliced once."""

    def __init__(self, m: FitMoments, columns: np.ndarray, outputs: np.ndarray, single: bool = False):
        self.gram = _block(m.gram, columns, columns)
        if single:  # a wide layer scored with float32 fits: its G·W in float32 too (half the time)
            self.gram = self.gram.astype(np.float32)
        self.cross = _block(m.cross, columns, outputs)
        self.input_sum, self.target_sum, self.count = m.input_sum[columns], m.target_sum[outputs], m.count

    def __call__(self, w: np.ndarray, b: np.ndarray) -> float:
        product = self.gram @ w.astype(self.gram.dtype, copy=False)
        return float(-2.0 * np.sum(w * self.cross) - 2.0 * float(b @ self.target_sum)
                     + np.sum(w * product) + 2.0 * float(b @ (self.input_sum @ w))
                     + self.count * float(b @ b))
