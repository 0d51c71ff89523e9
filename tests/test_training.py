"""The shared training loop's schedule on its own: batch orders and the learning rate.

These decide which samples each step sees, so a resumed `finetune` run must draw exactly
the batches the uninterrupted one would have; no torch is needed to check that.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_thinet.pytorch.training import cosine_lr, cycled_batches, epoch_batches, steps_per_epoch


def test_steps_per_epoch_keeps_remainders_of_two_or_more():
    assert steps_per_epoch(64, 16) == 4
    assert steps_per_epoch(65, 16) == 4  # a batch of one sample is dropped (BatchNorm)
    assert steps_per_epoch(66, 16) == 5
    assert steps_per_epoch(5, 16) == 1  # fewer samples than a batch: one batch of all


def test_epoch_batches_cover_each_epoch_once_and_resume_exactly():
    full = list(epoch_batches(50, 16, seed=3, epochs=3))
    assert len(full) == 3 * steps_per_epoch(50, 16)
    for epoch in range(3):
        seen = np.concatenate([b.samples for b in full if b.epoch == epoch])
        np.testing.assert_array_equal(np.sort(seen), np.arange(50))
    assert [b.last for b in full].count(True) == 3 and full[-1].last
    resumed = list(epoch_batches(50, 16, seed=3, epochs=3, start_epoch=1, start_batch=2))
    tail = full[steps_per_epoch(50, 16) + 2 :]
    assert [(b.epoch, b.index, b.last) for b in resumed] == [(b.epoch, b.index, b.last) for b in tail]
    for a, b in zip(resumed, tail):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_cycled_batches_are_full_and_follow_one_seeded_stream():
    batches = list(itertools.islice(cycled_batches(10, 4, seed=1), 5))
    assert [len(b.samples) for b in batches] == [4] * 5  # 10 // 4 = 2 full batches per epoch
    assert [(b.epoch, b.index, b.last) for b in batches] == [
        (0, 0, False), (0, 1, True), (1, 0, False), (1, 1, True), (2, 0, False)]
    rng = np.random.default_rng(1)
    first = rng.permutation(10)
    np.testing.assert_array_equal(batches[1].samples, np.sort(first[4:8]))
    np.testing.assert_array_equal(batches[2].samples, np.sort(rng.permutation(10)[:4]))
    assert len(next(cycled_batches(3, 8, seed=0)).samples) == 3


def test_cosine_learning_rate_runs_from_base_to_zero():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 0, 1) == 0.1  # a single step runs at the base rate
