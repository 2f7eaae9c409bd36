"""Patch streaming: prefetching changes when patches are drawn, never which; the thread stops."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from SemiSupSegLib.backend.config import TrainConfig
from SemiSupSegLib.backend.data import BatchSource, Prefetcher, VolumeCache
from SemiSupSegLib.backend.datasets import Case


@pytest.fixture
def cases(write_volume):
    """Three small labeled volumes (image and a two-class label)."""
    rng = np.random.default_rng(0)
    result = []
    for i in range(3):
        image = rng.normal(size=(20, 24, 20)).astype(np.float32)
        label = np.zeros((20, 24, 20), np.uint8)
        label[5:12, 6:14, 5:12] = 1 + i % 2
        result.append(
            Case(
                f"case{i}",
                write_volume(f"img{i}.nii.gz", image),
                write_volume(f"lab{i}.nii.gz", label),
            )
        )
    return result


def _config(prefetch: int) -> TrainConfig:
    return TrainConfig(patch_size=(16, 16, 16), prefetch=prefetch, cache_volumes=2)


def _draw(source: BatchSource, rounds: int) -> list:
    return [(source.labeled(2), source.unlabeled(1 + r % 2)) for r in range(rounds)]


def test_prefetching_yields_the_same_batches_as_drawing_in_the_loop(cases):
    plain = BatchSource(cases, cases[:2], _config(0), seed=3)
    ahead = BatchSource(cases, cases[:2], _config(3), seed=3)
    try:
        for (a_l, a_u), (b_l, b_u) in zip(_draw(plain, 6), _draw(ahead, 6)):
            for key in ("image", "label"):
                torch.testing.assert_close(a_l[key], b_l[key], rtol=0, atol=0)
            torch.testing.assert_close(a_u["image"], b_u["image"], rtol=0, atol=0)
    finally:
        ahead.close()


def test_closing_stops_the_threads_and_errors_reach_the_caller(cases, tmp_path):
    before = threading.active_count()
    source = BatchSource(cases, cases, _config(2), seed=0)
    source.labeled(1)
    time.sleep(0.2)  # let the producers fill their queues and block
    source.close()
    assert threading.active_count() == before
    broken = [Case("missing", tmp_path / "missing.nii.gz", tmp_path / "missing-label.nii.gz")]
    failing = BatchSource(broken, [], _config(2), seed=0)
    for _ in range(2):  # the same error again, rather than waiting for a dead thread
        with pytest.raises(Exception, match="does not exist"):
            failing.labeled(1)
    failing.close()


def test_prefetcher_keeps_order_and_stops_when_dropped():
    stream = Prefetcher(iter(range(100)), depth=4)
    assert [next(stream) for _ in range(10)] == list(range(10))
    endless = Prefetcher(iter(lambda: 1, None), depth=2)
    thread = endless._thread
    del endless
    thread.join(5)
    assert not thread.is_alive()


def test_cache_is_bounded_in_count_and_bytes(cases):
    config = _config(0)
    cache = VolumeCache(config, capacity=2)
    for case in cases + cases[:1]:
        cache.get(case)
    assert len(cache) == 2 and cache.misses == 4 and cache.hits == 0
    one = cache.get(cases[0]).nbytes
    assert cache.hits == 1
    small = VolumeCache(config, capacity=10, max_bytes=one + one // 2)
    for case in cases:
        small.get(case)
    assert len(small) == 1 and small.nbytes == one


def test_case_weights_steer_which_cases_are_drawn(cases):
    """case1 is the only one labeled 2: weighted out, no patch holds a 2; alone, every one."""
    config = _config(0)
    without = BatchSource(cases, [], config, seed=1, labeled_weights=[1, 0, 1])
    only = BatchSource(cases, [], config, seed=1, labeled_weights=[0, 1, 0])
    try:
        labels_without = [without.labeled(2)["label"] for _ in range(8)]
        labels_only = [only.labeled(2)["label"] for _ in range(8)]
    finally:
        without.close()
        only.close()
    assert not any(bool((lab == 2).any()) for lab in labels_without)
    assert all(not bool((lab == 1).any()) for lab in labels_only)
    assert any(bool((lab == 2).any()) for lab in labels_only)
    with pytest.raises(ValueError, match="3 non-negative"):
        BatchSource(cases, [], config, seed=1, labeled_weights=[1, -1, 0])
