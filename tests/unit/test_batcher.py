"""The batcher's size-or-deadline logic, on a fake clock."""

import math

import pytest

from worker.batcher import Batcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_empty_batcher_waits_forever_and_is_not_ready():
    batcher = Batcher(max_batch=8, max_wait_s=0.05, clock=FakeClock())
    assert not batcher.ready()
    assert batcher.time_left() == math.inf
    assert batcher.take() == []


def test_full_batch_is_ready_at_once():
    clock = FakeClock()
    batcher = Batcher(max_batch=3, max_wait_s=10.0, clock=clock)
    for i in range(4):
        batcher.add(i)
    assert batcher.ready()
    assert batcher.time_left() == 0.0
    assert batcher.take() == [0, 1, 2]
    assert len(batcher) == 1
    assert not batcher.ready()


def test_partial_batch_ready_when_oldest_item_reaches_deadline():
    clock = FakeClock()
    batcher = Batcher(max_batch=8, max_wait_s=0.050, clock=clock)
    batcher.add("a")
    clock.now += 0.030
    batcher.add("b")
    assert not batcher.ready()
    assert batcher.time_left() == pytest.approx(0.020)  # recomputed from the oldest item, not the newest
    clock.now += 0.019
    assert not batcher.ready()
    clock.now += 0.002
    assert batcher.ready()
    assert batcher.take() == ["a", "b"]


def test_deadline_restarts_from_the_next_oldest_after_take():
    clock = FakeClock()
    batcher = Batcher(max_batch=2, max_wait_s=1.0, clock=clock)
    batcher.add(1)
    batcher.add(2)
    clock.now += 0.5
    batcher.add(3)
    assert batcher.take() == [1, 2]
    assert batcher.time_left() == pytest.approx(1.0)
    clock.now += 1.0
    assert batcher.ready()


def test_zero_wait_means_never_wait():
    batcher = Batcher(max_batch=8, max_wait_s=0.0, clock=FakeClock())
    batcher.add(1)
    assert batcher.ready()


@pytest.mark.parametrize("max_batch,max_wait", [(0, 1.0), (4, -1.0)])
def test_rejects_bad_limits(max_batch, max_wait):
    with pytest.raises(ValueError):
        Batcher(max_batch=max_batch, max_wait_s=max_wait)
