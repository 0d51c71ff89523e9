"""Property family: random CNN graphs (tests/fuzzgraphs.py) slim into valid, same-interface models.

Hypothesis draws each graph (derandomized: the same examples on every run, so CI is
reproducible); the properties are those of tests/fuzzcheck.py. tools/fuzz.py runs thousands.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzcheck import check_case  # noqa: E402
from tests.fuzzgraphs import BLOCKS, FuzzCase, RngChooser, build_case  # noqa: E402

try:
    import torch  # noqa: F401

    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False


class DrawChooser:
    """Choices drawn by hypothesis, so a failing graph shrinks to a small one."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))


FUZZ = settings(max_examples=10, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_properties(case: FuzzCase, torch: bool) -> None:
    outcome = check_case(case, torch=torch)
    assert not outcome.failures, (case.blocks, case.opset, outcome.failures)


@FUZZ
@given(st.data())
def test_random_graphs_slim_into_valid_same_interface_models(data):
    case = build_case(DrawChooser(data))
    _assert_properties(case, torch=HAS_TORCH)


# tools/fuzz.py seeds whose graphs together hold every block kind, each with planted redundancy.
COVERING_SEEDS = (0, 1, 4, 27)


@pytest.mark.parametrize("seed", COVERING_SEEDS)
def test_covering_graphs_slim_into_valid_same_interface_models(seed):
    _assert_properties(build_case(RngChooser(seed)), torch=HAS_TORCH)


def test_covering_seeds_hold_every_block_kind():
    kinds = {kind for seed in COVERING_SEEDS for kind in build_case(RngChooser(seed)).blocks}
    assert kinds == set(BLOCKS)


@pytest.mark.parametrize("seed", [0, 6, 8])
def test_fuzz_tool_seeds_are_reproducible_graphs(seed):
    """tools/fuzz.py names a failing graph by its seed: the seed must rebuild the same graph."""
    first, again = build_case(RngChooser(seed)), build_case(RngChooser(seed))
    assert first.model.SerializeToString() == again.model.SerializeToString()
    assert first.planted == again.planted
