"""The budget arithmetic on plain arrays: error curves, the multilinear cost model, allocation."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_thinet.solve.budget import (
    CostModel,
    allocate,
    allowed_keeps,
    greedy_error_curve,
    least_squares_curve,
)
from onnx_thinet.solve.solvers import reconstruction_error, rescale_least_squares, select_thinet


def _problem(channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, channels)) * rng.uniform(0.1, 2.0, channels)
    gram = x.T @ x
    corr = gram.sum(axis=1)
    return gram, corr, float(corr.sum())


def test_error_curve_is_thinets_greedy_at_every_size():
    gram, corr, target = _problem(12)
    order, errors = greedy_error_curve(gram, corr, target)
    assert errors[12] == pytest.approx(0.0, abs=1e-7) and errors[0] == pytest.approx(1.0)
    for k in range(1, 12):
        kept = select_thinet(gram, corr, target, k)
        np.testing.assert_array_equal(np.sort(order[12 - k:]), kept)
        assert errors[k] == pytest.approx(reconstruction_error(gram, corr, target, kept, np.ones(k)), abs=1e-9)


def test_least_squares_curve_matches_the_rescale_at_every_size():
    gram, corr, target = _problem(10, seed=3)
    order, sliced = greedy_error_curve(gram, corr, target)
    rescaled = least_squares_curve(gram, corr, target, order)
    for k in range(1, 10):
        kept = np.sort(order[10 - k:])
        expected = reconstruction_error(gram, corr, target, kept, rescale_least_squares(gram, corr, kept))
        assert rescaled[k] == pytest.approx(expected, abs=1e-6)
        assert rescaled[k] <= sliced[k] + 1e-9


def test_cost_model_is_multilinear_in_the_keep_ratios():
    costs = CostModel(fixed=5.0, coefficients=(10.0, 20.0, 4.0), groups=((0,), (0, 1), (1,)))
    assert costs.full() == 39.0
    assert costs.cost(np.array([0.5, 0.25])) == pytest.approx(5 + 5 + 2.5 + 1)
    assert costs.slope(np.array([0.5, 0.25]), 1) == pytest.approx(20 * 0.5 + 4)


def test_allowed_keeps_are_multiples_and_the_full_width():
    np.testing.assert_array_equal(allowed_keeps(20, 8, floor=1), [8, 16, 20])
    np.testing.assert_array_equal(allowed_keeps(5, 1, floor=2), [2, 3, 4, 5])


def test_allocation_cuts_the_layer_that_hurts_little():
    """Two equally costly layers; one's error grows slowly: it gives (almost) all the cut."""
    flat = np.linspace(0.2, 0.0, 17)  # error 0.2 at 0 kept down to 0 at 16
    steep = np.linspace(1.0, 0.0, 17)
    costs = CostModel(0.0, (1.0, 1.0), ((0,), (1,)))
    plan = allocate([flat, steep], costs, target=0.6)
    assert plan.reached and plan.cost_fraction <= 0.6
    assert plan.layers[0].keep < 8 < plan.layers[1].keep
    assert "sensitivity" in plan.layers[0].why


def test_allocation_prefers_cheap_error_per_cost():
    """Same curves; the cut goes where it saves more cost."""
    curve = np.linspace(0.5, 0.0, 9) ** 2
    costs = CostModel(0.0, (9.0, 1.0), ((0,), (1,)))
    plan = allocate([curve, curve], costs, target=0.7)
    assert plan.layers[0].keep < plan.layers[1].keep


def test_allocation_respects_round_to_and_reports_unreachable_budgets():
    curves = [np.linspace(1.0, 0.0, 33), np.linspace(1.0, 0.0, 21)]
    costs = CostModel(50.0, (25.0, 25.0), ((0,), (1,)))
    plan = allocate(curves, costs, target=0.75, multiple=8)
    for layer in plan.layers:
        assert layer.keep % 8 == 0 or layer.keep == layer.channels
    assert plan.cost_fraction <= 0.75
    impossible = allocate(curves, costs, target=0.3, multiple=8)  # fixed cost alone is 0.5
    assert not impossible.reached and impossible.cost_fraction > 0.5


def test_non_monotone_curves_are_never_planned_to_improve_by_cutting():
    bumpy = np.array([1.0, 0.2, 0.6, 0.1, 0.0])  # noisy statistics: 1 kept looks better than 2
    costs = CostModel(0.0, (1.0,), ((0,),))
    plan = allocate([bumpy], costs, target=0.5)
    assert plan.layers[0].keep == 2 and plan.layers[0].error == pytest.approx(0.2)
