"""Tests for dkmeans.worker_state: the per-worker memory of a fit between passes, and its memory budget."""

from dataclasses import dataclass

import numpy as np
import pytest

from dkmeans import worker_state


@dataclass
class Entry:
    values: np.ndarray


@pytest.fixture
def budget_of_4_kb(monkeypatch):
    monkeypatch.setattr(worker_state, "_budget", lambda: 4096)
    for fit in {key[0] for key in list(worker_state._entries)}:
        worker_state.forget(fit)
    yield
    for fit in {key[0] for key in list(worker_state._entries)}:
        worker_state.forget(fit)


def kb(n=1):
    return Entry(np.zeros(128 * n))  # 1 kB per n


def test_get_put_forget(budget_of_4_kb):
    a = kb()
    worker_state.put(("fit-a", 0, 1), a)
    assert worker_state.get(("fit-a", 0, 1)) is a
    assert worker_state.get(("fit-a", 1, 1)) is None
    worker_state.put(("fit-a", 0, 1), kb(2))  # replacing an entry frees the old one
    assert worker_state._used == 2048
    assert worker_state.forget("fit-a") == 1
    assert worker_state.get(("fit-a", 0, 1)) is None and worker_state._used == 0


def test_a_fit_keeps_its_first_entries_when_its_state_does_not_fit(budget_of_4_kb):
    """Evicting in a cycle would find nothing on the next pass; keeping the first chunks finds them every time."""
    for chunk in range(6):
        worker_state.put(("fit-a", chunk, 0), kb())
    kept = [chunk for chunk in range(6) if worker_state.get(("fit-a", chunk, 0)) is not None]
    assert kept == [0, 1, 2, 3]
    assert worker_state._used == 4096


def test_a_new_fit_evicts_older_fits_first(budget_of_4_kb):
    for chunk in range(4):
        worker_state.put(("stale", chunk, 0), kb())  # a fit whose client never came back to forget it
    worker_state.put(("fresh", 0, 0), kb(2))
    assert worker_state.get(("fresh", 0, 0)) is not None
    assert [worker_state.get(("stale", c, 0)) is not None for c in range(4)] == [False, False, True, True]


def test_an_entry_larger_than_the_budget_is_not_kept(budget_of_4_kb):
    worker_state.put(("fit", 0, 0), kb(5))
    assert worker_state.get(("fit", 0, 0)) is None and worker_state._used == 0


def test_stale_entries_of_the_same_fit_make_room(budget_of_4_kb):
    """Labels of an earlier pass (the chunk ran on another worker since) give way to this pass's."""
    for chunk in range(4):
        worker_state.put(("fit-a", chunk, 0), Entry(np.full(128, 1.0)))  # pass 1 fills the budget
    fresh = Entry(np.full(128, 2.0))
    worker_state.put(("fit-a", 9, 0), fresh, stale=lambda key, value: value.values[0] == 1.0)
    assert worker_state.get(("fit-a", 9, 0)) is fresh
    assert worker_state.get(("fit-a", 0, 0)) is None  # the oldest stale entry went
    assert [worker_state.get(("fit-a", c, 0)) is not None for c in (1, 2, 3)] == [True] * 3
    worker_state.put(("fit-a", 10, 0), kb(), stale=lambda key, value: False)  # nothing stale: not stored
    assert worker_state.get(("fit-a", 10, 0)) is None and worker_state._used == 4096


def test_room_is_the_budget_less_the_fits_own_entries(budget_of_4_kb):
    worker_state.put(("other", 0, 0), kb())
    worker_state.put(("fit", 0, 0), kb(2))
    assert worker_state.room("fit") == 2048 and worker_state.room("other") == 3072
    assert worker_state.room("new") == 4096  # other fits' entries give way to it


@pytest.mark.parametrize("budget, k, split", [(1 << 30, 160, True), (1 << 30, 64, False), (2_000_000, 160, False)])
def test_chunks_are_split_for_many_centres_where_the_budget_has_room(mnist_numpy, monkeypatch, budget, k, split):
    """engine._lloyd_task splits a kept chunk's rows for passes over SPLIT_MIN_CENTRES centres or more, unless
    the split would take more than half of what the fit may still keep on the worker (2 MB here, for a
    1.6 MB chunk)."""
    from dkmeans import engine, kernels

    monkeypatch.setattr(worker_state, "_budget", lambda: budget)
    block = mnist_numpy[0][:2000]
    centers = block[:k].astype(np.float64)
    assert (k >= kernels.SPLIT_MIN_CENTRES) == (k == 160)
    try:
        engine._lloyd_task(block, centers, (k,), (0,), (0,), "fit-split", True, None, offset=0, index=0)
        norms = worker_state.get(("fit-split", 0, "norms"))  # kept in all three cases (2,000 x 16 bytes)
        assert (norms.columns is not None) == split
    finally:
        worker_state.forget("fit-split")
