"""Solvers on plain matrices: each is checked against a slow, obviously-correct reference."""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest

from onnx_thinet.solve import solvers
from onnx_thinet.solve.baselines import select_apoz, select_l1, select_lasso, select_random
from onnx_thinet.solve.moments import FLOAT32_DIMS, FitMoments
from onnx_thinet.solve.solvers import (
    RIDGE_GRID,
    choose_ridge,
    descend_grid,
    keep_count,
    reconstruction_error,
    refit_error,
    refit_least_squares,
    rescale_least_squares,
    select_thinet,
    select_thinet_ls,
)


def _paper_greedy(x: np.ndarray, keep: int) -> np.ndarray:
    """The paper's Algorithm 1 on raw samples: grow T keeping ‖Σ_{c∈T} x_c‖² smallest."""
    removed: list[int] = []
    channels = x.shape[1]
    while len(removed) < channels - keep:
        best, best_value = None, np.inf
        for c in range(channels):
            if c in removed:
                continue
            value = float(np.sum(x[:, removed + [c]].sum(axis=1) ** 2))
            if value < best_value:
                best, best_value = c, value
        removed.append(best)
    return np.array(sorted(set(range(channels)) - set(removed)))


def _stats(x: np.ndarray, y: np.ndarray | None = None):
    y = x.sum(axis=1) if y is None else y
    return x.T @ x, x.T @ y, float(y @ y)


@pytest.mark.parametrize("seed", range(5))
def test_thinet_greedy_matches_paper_algorithm(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 12)) * rng.uniform(0.1, 2.0, size=12)
    gram, corr, yy = _stats(x)
    for keep in (3, 6, 11):
        np.testing.assert_array_equal(select_thinet(gram, corr, yy, keep), _paper_greedy(x, keep))


def test_thinet_removes_planted_zero_channels_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 10))
    dead = [1, 4, 7, 8, 9]
    x[:, dead] = 0.0
    gram, corr, yy = _stats(x)
    kept = select_thinet(gram, corr, yy, 5)
    np.testing.assert_array_equal(kept, sorted(set(range(10)) - set(dead)))
    w = rescale_least_squares(gram, corr, kept)
    np.testing.assert_allclose(w, 1.0, atol=1e-8)
    assert reconstruction_error(gram, corr, yy, kept, w) < 1e-6


def test_rescale_matches_lstsq_and_reduces_error():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    gram, corr, yy = _stats(x)
    kept = np.array([0, 2, 3, 6])
    w = rescale_least_squares(gram, corr, kept)
    expected = np.linalg.lstsq(x[:, kept], x.sum(axis=1), rcond=None)[0]
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    ones = np.ones(len(kept))
    assert reconstruction_error(gram, corr, yy, kept, w) < reconstruction_error(gram, corr, yy, kept, ones)
    direct = np.linalg.norm(x.sum(axis=1) - x[:, kept] @ w) / np.linalg.norm(x.sum(axis=1))
    assert reconstruction_error(gram, corr, yy, kept, w) == pytest.approx(direct, rel=1e-6)


def test_rescale_survives_rank_deficiency():
    x = np.ones((50, 3))
    gram, corr, _ = _stats(x)
    w = rescale_least_squares(gram, corr, np.array([0, 1]))
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(x[:, :2] @ w, x.sum(axis=1), rtol=1e-6)


def _best_subset_error(x, y, keep):
    best = np.inf
    for subset in itertools.combinations(range(x.shape[1]), keep):
        cols = x[:, list(subset)]
        w = np.linalg.lstsq(cols, y, rcond=None)[0]
        best = min(best, float(np.sum((y - cols @ w) ** 2)))
    return best


def test_thinet_ls_recovers_sparse_support_and_is_near_best_subset():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 9))
    y = x[:, [0, 3, 5]] @ np.array([2.0, -1.0, 0.7])
    gram, corr, _ = _stats(x, y)
    np.testing.assert_array_equal(select_thinet_ls(gram, corr, 3), [0, 3, 5])
    z = rng.standard_normal((400, 8))
    target = z.sum(axis=1)
    gram, corr, _ = _stats(z, target)
    kept = select_thinet_ls(gram, corr, 4)
    w = np.linalg.lstsq(z[:, kept], target, rcond=None)[0]
    err = float(np.sum((target - z[:, kept] @ w) ** 2))
    assert err <= 1.2 * _best_subset_error(z, target, 4)


def test_lasso_finds_the_sparse_support_and_ignores_silent_channels():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 9))
    x[:, 7] = 0.0  # a channel that contributes nothing anywhere
    y = x[:, [0, 3, 5]] @ np.array([2.0, -1.0, 0.7])
    gram, corr, _ = _stats(x, y)
    np.testing.assert_array_equal(select_lasso(gram, corr, 3), [0, 3, 5])
    kept = select_lasso(gram, corr, 5)
    assert len(kept) == 5 and {0, 3, 5} <= set(kept.tolist()) and 7 not in kept


def test_lasso_returns_keep_channels_even_when_the_penalty_path_jumps():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((300, 12))
    z[:, 1] = z[:, 0]  # duplicates enter the path together
    gram, corr, _ = _stats(z, z.sum(axis=1))
    for keep in range(1, 13):
        kept = select_lasso(gram, corr, keep)
        assert len(kept) == keep == len(set(kept.tolist()))


def test_baselines_pick_by_their_criteria():
    np.testing.assert_array_equal(select_l1(np.array([3.0, 1.0, 5.0, 2.0]), 2), [0, 2])
    np.testing.assert_array_equal(select_apoz(np.array([0.9, 0.1, 0.5, 0.2]), 2), [1, 3])
    kept = select_random(10, 4, np.random.default_rng(0))
    assert len(set(kept.tolist())) == 4 and kept.max() < 10


def test_keep_count_rounding():
    assert keep_count(64, 0.5) == 32
    assert keep_count(3, 0.01) == 1
    assert keep_count(10, 1.0) == 10
    assert keep_count(60, 0.3, multiple=8) == 24
    assert keep_count(10, 0.9, multiple=8) == 10



def _moments(p, t):
    m = FitMoments(p.shape[1], t.shape[1])
    m.add(p, t)
    return m


def test_refit_matches_lstsq_with_intercept_and_reports_its_error():
    rng = np.random.default_rng(7)
    p = rng.standard_normal((600, 10))
    t = p @ rng.standard_normal((10, 3)) + np.array([0.5, -1.0, 2.0]) + 0.01 * rng.standard_normal((600, 3))
    cols = np.array([0, 1, 2, 4, 7, 9])
    moments = _moments(p, t)
    w, b = refit_least_squares(moments, cols, ridge=0.0)
    design = np.hstack([p[:, cols], np.ones((600, 1))])
    expected = np.linalg.lstsq(design, t, rcond=None)[0]
    np.testing.assert_allclose(w, expected[:-1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b, expected[-1], rtol=1e-6, atol=1e-9)
    direct = np.linalg.norm(t - p[:, cols] @ w - b) / np.linalg.norm(t)
    assert refit_error(moments, cols, w, b) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 3.0])
def test_refit_with_error_is_the_refit_and_its_direct_error(intercept, ridge):
    """The error from the solve's own equations (ridge > 0: a Cholesky factor) and the product
    with G (ridge 0 on a singular G: the floored eigen-solve) both match the residual itself."""
    from onnx_thinet.solve.solvers import refit_with_error

    rng = np.random.default_rng(11)
    p = rng.standard_normal((500, 12)) + 1.5
    p[:, 11] = p[:, 3]  # a duplicated input: G is singular
    t = p @ rng.standard_normal((12, 4)) + 0.3 * rng.standard_normal((500, 4)) + 2.0
    cols = np.array([0, 1, 3, 5, 6, 8, 11])
    prior = rng.standard_normal((12, 4))
    moments = _moments(p, t)
    w, b, error = refit_with_error(moments, cols, intercept=intercept, ridge=ridge, prior=prior)
    w_ref, b_ref = refit_least_squares(moments, cols, intercept=intercept, ridge=ridge, prior=prior)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-12)
    direct = np.linalg.norm(t - p[:, cols] @ w - b) / np.linalg.norm(t)
    assert error == pytest.approx(direct, rel=1e-7)
    assert error == pytest.approx(refit_error(moments, cols, w, b), rel=1e-7)


@pytest.mark.parametrize("ridge", [1e-2, 3.0, 1e3])
def test_a_wide_refit_solves_in_float32_only_where_its_ridge_bounds_the_error(monkeypatch, ridge):
    """Past FLOAT32_DIMS unknowns a ridge that bounds the condition number (trace ≤ 1e3 ×
    penalty) solves in float32: weights within 1e-5 (of the largest) of float64's, the same error;
    a small ridge, where float32 would not be safe, is the float64 solve itself."""
    from onnx_thinet.solve import solvers

    rng = np.random.default_rng(13)
    dims, outputs, rows = FLOAT32_DIMS + 40, 96, 4000
    p = (rng.standard_normal((rows, dims)) * rng.uniform(0.2, 3.0, dims)).astype(np.float32) + 1.0
    prior = rng.standard_normal((dims, outputs))
    t = p @ (prior + 0.1 * rng.standard_normal((dims, outputs))) + 0.5 * rng.standard_normal((rows, outputs))
    moments = _moments(p, t)
    cols = np.arange(dims)
    single = solvers.refit_with_error(moments, cols, ridge=ridge, prior=prior)
    monkeypatch.setattr(solvers, "SINGLE_CONDITION", 0.0)
    double = solvers.refit_with_error(moments, cols, ridge=ridge, prior=prior)
    if ridge * 1e3 < dims:  # trace / penalty is dims / ridge: float64 throughout
        np.testing.assert_array_equal(single[0], double[0])
    scale = np.abs(double[0]).max()
    np.testing.assert_allclose(single[0], double[0], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(single[1], double[1], rtol=1e-4, atol=1e-4 * np.abs(double[1]).max())
    assert single[2] == pytest.approx(double[2], rel=1e-4)
    direct = np.linalg.norm(t - p @ single[0] - single[1]) / np.linalg.norm(t)
    assert single[2] == pytest.approx(direct, rel=1e-4)


def test_ridge_shrinks_weights_but_not_the_intercept():
    rng = np.random.default_rng(8)
    p = rng.standard_normal((300, 5)) + 3.0
    t = p @ rng.standard_normal((5, 2)) + 10.0
    moments = _moments(p, t)
    cols = np.arange(5)
    w0, _ = refit_least_squares(moments, cols, ridge=0.0)
    w1, b1 = refit_least_squares(moments, cols, ridge=10.0)
    assert np.linalg.norm(w1) < np.linalg.norm(w0)
    np.testing.assert_allclose(b1, (t.sum(0) - p.sum(0) @ w1) / len(p))  # mean residual is zero


def test_cross_validated_ridge_keeps_exact_fits_exact_and_shrinks_noisy_ones():
    rng = np.random.default_rng(9)
    p = rng.standard_normal((400, 30))
    exact = p @ rng.standard_normal((30, 4))
    folds = (_moments(p[::2], exact[::2]), _moments(p[1::2], exact[1::2]))
    assert choose_ridge(folds, np.arange(30)) == 0.0
    few = rng.standard_normal((40, 30))  # as many unknowns as samples: a plain fit overfits
    noisy = few[:, :3] @ np.ones((3, 2)) + 2.0 * rng.standard_normal((40, 2))
    folds = (_moments(few[::2], noisy[::2]), _moments(few[1::2], noisy[1::2]))
    assert choose_ridge(folds, np.arange(30)) > 0.0


def test_cross_validated_ridge_is_the_grid_point_with_least_held_out_error():
    """Brute force on the rows: fit each fold at every ridge, score the other fold's rows on all
    600 outputs; the moment-only scoring (on a subset of outputs) picks the same ridge."""
    rng = np.random.default_rng(11)
    dims, outputs = 40, 600
    prior = rng.standard_normal((dims, outputs))
    p = rng.standard_normal((120, dims)) * rng.uniform(0.2, 3.0, dims)
    t = p @ (prior + 0.5 * rng.standard_normal((dims, outputs))) + 0.3 + 2.0 * rng.standard_normal((120, outputs))
    halves = (np.arange(120) % 2 == 0, np.arange(120) % 2 == 1)
    folds = tuple(_moments(p[h], t[h]) for h in halves)
    cols = np.arange(0, dims, 2)
    held_out = []
    for ridge in RIDGE_GRID:
        error = 0.0
        for train, test in ((0, 1), (1, 0)):
            w, b = refit_least_squares(folds[train], cols, ridge=ridge, prior=prior)
            error += float(np.sum((t[halves[test]] - p[halves[test]][:, cols] @ w - b) ** 2))
        held_out.append(error)
    best = RIDGE_GRID[int(np.argmin(held_out))]
    assert 0.0 < best < 1e3  # a problem where the grid's inside wins
    assert choose_ridge(folds, cols, prior=prior) == best


def test_wide_layers_scored_in_float32_pick_the_ridge_float64_fits_pick():
    """Past FLOAT32_DIMS unknowns the grid is scored with float32 factors; brute force on the
    rows with float64 fits (every ridge, all outputs) must agree, on an inside optimum and on
    an exact fit (ridge 0, the eigen-pairs' path)."""
    rng = np.random.default_rng(12)
    dims, outputs, rows = FLOAT32_DIMS + 76, 160, 2400
    prior = rng.standard_normal((dims, outputs))
    mix = rng.standard_normal((dims, dims)) * 0.05 + np.eye(dims)  # correlated inputs
    p = (rng.standard_normal((rows, dims)) * rng.uniform(0.2, 3.0, dims)) @ mix
    t = (p @ (prior + 0.2 * rng.standard_normal((dims, outputs))) + 0.3
         + 0.5 * np.sqrt(dims) * rng.standard_normal((rows, outputs)))
    halves = (np.arange(rows) % 2 == 0, np.arange(rows) % 2 == 1)
    folds = tuple(_moments(p[h], t[h]) for h in halves)
    cols = np.arange(dims)
    held_out = []
    for ridge in RIDGE_GRID:
        error = 0.0
        for train, test in ((0, 1), (1, 0)):
            w, b = refit_least_squares(folds[train], cols, ridge=ridge, prior=prior)
            error += float(np.sum((t[halves[test]] - p[halves[test]] @ w - b) ** 2))
        held_out.append(error)
    best = RIDGE_GRID[int(np.argmin(held_out))]
    assert 0.0 < best < 1e3
    assert choose_ridge(folds, cols, prior=prior) == best
    exact = p @ prior
    folds = tuple(_moments(p[h], exact[h]) for h in halves)
    assert choose_ridge(folds, cols) == 0.0


@pytest.mark.parametrize("seed", [2, 4, 5])
def test_refit_on_duplicated_channels_stays_near_the_prior(seed):
    """Fuzz seed 0: a reader of Concat(f, conv1x1(x), x) sees channels that are affine in others,
    computed in float32. Cross-validation picks ridge 0; a plain solve of the singular Gram
    turned the rounding into weights of 1e3-1e5 (float32 inference then differed by 16%)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 4)).astype(np.float32)
    a, c = rng.standard_normal((2, 2)).astype(np.float32), rng.standard_normal(2).astype(np.float32)
    p = np.hstack([x, x[:, 2:] @ a + c])  # two channels that duplicate two others, float32 rounding
    t = p.astype(np.float64) @ rng.standard_normal((6, 3)) + 0.5 + 1e-3 * rng.standard_normal((400, 3))
    prior, cols = rng.standard_normal((6, 3)), np.arange(6)
    ridge = choose_ridge((_moments(p[::2], t[::2]), _moments(p[1::2], t[1::2])), cols, prior=prior)
    moments = _moments(p, t)
    w, b = refit_least_squares(moments, cols, ridge=ridge, prior=prior)
    assert ridge == 0.0
    assert np.abs(w).max() < 10.0 * np.abs(prior).max()
    design = np.hstack([p, np.ones((400, 1))]).astype(np.float64)
    best = np.linalg.norm(t - design @ np.linalg.lstsq(design, t, rcond=None)[0]) / np.linalg.norm(t)
    assert refit_error(moments, cols, w, b) < 1.01 * best  # only the rounding directions are left unfit


@pytest.mark.parametrize("errors, best", [
    ([5, 4, 3, 2, 1, 2, 3, 4, 5], 4),
    ([9, 7, 5, 3, 2, 1, 0.5, 0.7, 3], 6),
    ([0, 1e-9, 1, 2, 3, 4, 5, 6, 7], 0),  # an exact fit: ridge 0
    ([9, 8, 7, 6, 5, 4, 3, 2, 1], 8),  # plain slicing
    ([3, 2, 1, 1, 1, 1, 4, 5, 6], 2),  # ties keep the smaller ridge
])
@pytest.mark.parametrize("start", [None, 0, 8])
def test_descending_the_grid_finds_the_minimum_of_a_valley_with_fewer_solves(errors, best, start):
    calls = []

    def error(k):
        calls.append(k)
        return errors[k]

    assert descend_grid(error, len(errors), start) == best
    assert len(set(calls)) == len(calls)  # each ridge solved once
    assert len(calls) <= abs(best - (len(errors) // 2 if start is None else start)) + 3


def test_a_fit_with_fewer_rows_than_unknowns_walks_from_the_largest_ridge(monkeypatch):
    """Brute force over the grid on underdetermined folds agrees with the walk, which solves
    only the ridges from the largest down to one past the best."""
    solved = []
    original = solvers._HeldOutFit.error
    monkeypatch.setattr(solvers._HeldOutFit, "error", lambda self, r: solved.append(r) or original(self, r))
    rng = np.random.default_rng(14)
    dims, rows = 60, 80  # folds of 40 rows
    p = rng.standard_normal((rows, dims))
    prior = rng.standard_normal((dims, 5))
    truth = prior + 0.3 * rng.standard_normal((dims, 5))
    for noise in (100.0, 0.1):
        t = p @ truth + noise * rng.standard_normal((rows, 5))
        folds = (_moments(p[::2], t[::2]), _moments(p[1::2], t[1::2]))
        held_out = []
        for ridge in RIDGE_GRID:
            error = 0.0
            for train, test in ((0, 1), (1, 0)):
                w, b = refit_least_squares(folds[train], np.arange(dims), ridge=ridge, prior=prior)
                error += float(np.sum((t[test::2] - p[test::2] @ w - b) ** 2))
            held_out.append(error)
        solved.clear()
        best = int(np.argmin(held_out))
        assert choose_ridge(folds, np.arange(dims), prior=prior) == RIDGE_GRID[best]
        assert len(set(solved)) == min(len(RIDGE_GRID), len(RIDGE_GRID) + 1 - best)
        assert best > len(RIDGE_GRID) // 2 if noise > 1 else best < len(RIDGE_GRID) // 2


def test_small_problems_run_on_one_blas_thread_and_large_ones_on_the_callers():
    from threadpoolctl import threadpool_info

    from onnx_thinet.solve.threads import PARALLEL_UNKNOWNS, blas_threads_for

    def threads():
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = threads()
    with blas_threads_for(PARALLEL_UNKNOWNS - 1):
        assert set(threads().values()) == {1}
    assert threads() == before
    with blas_threads_for(PARALLEL_UNKNOWNS):
        assert threads() == before


def test_concurrent_calls_split_the_blas_threads_and_keep_order_and_errors():
    from threadpoolctl import threadpool_info, threadpool_limits

    from onnx_thinet.solve.threads import concurrently

    def blas_threads():
        return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")

    with threadpool_limits(limits=4, user_api="blas"):
        seen = concurrently([blas_threads, blas_threads, lambda: "third"])
        assert seen == [1, 1, "third"]  # 4 threads over 3 calls: one each
        assert concurrently([blas_threads, blas_threads]) == [2, 2]
        assert blas_threads() == 4  # restored

        def fails():
            raise ValueError("second call")

        with pytest.raises(ValueError, match="second call"):
            concurrently([lambda: 1, fails])
        assert blas_threads() == 4


@pytest.mark.parametrize("noise", [100.0, 1.0, 0.01])
def test_a_search_started_near_a_similar_layers_ridge_chooses_as_from_the_middle(monkeypatch, noise):
    """The start only saves solves: from the grid point nearest `near` the walk reaches the
    ridge the middle start reaches (and brute force picks), in fewer solves when it is near."""
    solved = []
    original = solvers._HeldOutFit.error
    monkeypatch.setattr(solvers._HeldOutFit, "error", lambda self, r: solved.append(r) or original(self, r))
    rng = np.random.default_rng(5)
    dims, rows = 40, 400
    p = rng.standard_normal((rows, dims))
    prior = rng.standard_normal((dims, 4))
    t = p @ (prior + 0.3 * rng.standard_normal((dims, 4))) + noise * rng.standard_normal((rows, 4))
    folds = (_moments(p[::2], t[::2]), _moments(p[1::2], t[1::2]))
    cols = np.arange(dims)
    held_out = [sum(float(np.sum((t[test::2] - p[test::2] @ w - b) ** 2))
                    for train, test in ((0, 1), (1, 0))
                    for w, b in [refit_least_squares(folds[train], cols, ridge=r, prior=prior)])
                for r in RIDGE_GRID]
    best = RIDGE_GRID[int(np.argmin(held_out))]
    assert choose_ridge(folds, cols, prior=prior) == best
    for near in (*RIDGE_GRID, 5e-3, 1e9):
        assert choose_ridge(folds, cols, prior=prior, near=near) == best
    solved.clear()
    assert choose_ridge(folds, cols, prior=prior, near=best) == best
    assert len(set(solved)) <= 3  # the choice and its two neighbours


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX); Windows has no fork")
def test_concurrent_calls_work_in_a_forked_child_after_the_parent_used_them():
    from onnx_thinet.solve.threads import concurrently

    assert concurrently([lambda: 1, lambda: 2]) == [1, 2]  # the parent's worker exists
    pid = os.fork()
    if pid == 0:  # the child: its pool must be its own, or the call never returns
        os._exit(0 if concurrently([lambda: 3, lambda: 4]) == [3, 4] else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child's concurrent call did not return")
