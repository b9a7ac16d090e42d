"""Tests for dkmeans.disk_state: streamed chunks' norms and Yinyang bounds kept in files between passes."""

from __future__ import annotations

import dataclasses
import os
import time

import dask
import numpy as np
import pytest

from dkmeans import compiled, disk_state, engine, kernels, screening, worker_state
from dkmeans.data.store import _STALE_TMP_S


def put(fit, chunk, norms, models, states):
    """disk_state.put with the digests the engine computes once per pass."""
    disk_state.put(fit, chunk, norms, models, states, [screening.centres_digest(s.centers) for s in states])


@pytest.fixture
def state_dir(tmp_path):
    with dask.config.set({"temporary-directory": str(tmp_path)}):
        yield tmp_path / "dkmeans-state"


@pytest.fixture
def chunk_and_states(mnist_numpy, monkeypatch):
    """A real MNIST chunk after two passes of two models (k = 10 and 20), as a pass leaves them."""
    # The second pass with its bounds (drift history and all), not the one product over every row that a
    # second pass from a random start may choose instead.
    monkeypatch.setattr(compiled, "DENSE_PASS", 2.0)
    chunk = mnist_numpy[0][:3000]
    rng = np.random.default_rng(0)
    centers = [chunk[rng.choice(3000, k, replace=False)].astype(np.float64) for k in (10, 20)]
    norms = kernels.chunk_norms(chunk)
    states, stats = kernels.lloyd_chunk_many(chunk, np.concatenate(centers), (10, 20), (0, 0), norms=norms)
    moved = [kernels.update_centers(st, c) for st, c in zip(stats, centers)]
    again = np.concatenate(moved)
    states, _ = kernels.lloyd_chunk_many(chunk, again, (10, 20), (0, 0), norms=norms, states=states, bounds=True)
    return chunk, norms, states


def test_saved_state_reads_back_equal(state_dir, chunk_and_states):
    _, norms, states = chunk_and_states
    assert states[0].sums is not None and states[0].drift.shape[0] == 2
    put("fit-a", 3, norms, (0, 1), states)
    disk_state._centres.clear()  # as on another worker of the host: the centres come from their file
    got_norms, got = disk_state.get("fit-a", 3, (0, 1))
    np.testing.assert_array_equal(got_norms.sq, norms.sq)
    np.testing.assert_array_equal(got_norms.norm, norms.norm)
    assert (got_norms.total, got_norms.screen, got_norms.integral) == (norms.total, norms.screen, norms.integral)
    for state, back in zip(states, got):
        for name in ("centers", "labels", "upper", "nearest", "lower", "stamp", "drift", "sums"):
            expected, found = getattr(state, name), getattr(back, name)
            assert found.dtype == expected.dtype, name
            np.testing.assert_array_equal(found, expected, err_msg=name)
    # Another chunk, a model never saved, an unknown fit: nothing.
    assert disk_state.get("fit-a", 4, (0,)) == (None, [None])
    assert disk_state.get("fit-a", 3, (0, 7))[1][1] is None
    assert disk_state.get("fit-b", 3, (0,)) == (None, [None])


def test_a_pass_from_saved_state_equals_one_from_memory(state_dir, chunk_and_states):
    chunk, norms, states = chunk_and_states
    put("fit-a", 0, norms, (0, 1), states)
    _, saved = disk_state.get("fit-a", 0, (0, 1))
    centers = np.concatenate([s.centers + 0.5 for s in states])
    from_memory = kernels.lloyd_chunk_many(chunk, centers, (10, 20), (0, 0), norms=norms, states=states, bounds=True)
    from_disk = kernels.lloyd_chunk_many(chunk, centers, (10, 20), (0, 0), norms=norms, states=saved, bounds=True)
    for a, b in zip(from_memory[1], from_disk[1]):
        np.testing.assert_array_equal(a.sums, b.sums)
        np.testing.assert_array_equal(a.counts, b.counts)
    for a, b in zip(from_memory[0], from_disk[0]):
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_file_is_not_used(state_dir, chunk_and_states, damage):
    _, norms, states = chunk_and_states
    put("fit-a", 0, norms, (0,), states[:1])
    path = state_dir / "fit-a" / "chunk-0.bin"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":  # an interrupted write
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        raw = bytearray(b"not a state file")
    path.write_bytes(bytes(raw))
    assert disk_state.get("fit-a", 0, (0,)) == (None, [None])


def test_nothing_is_written_below_the_free_space_reserve(state_dir, chunk_and_states, monkeypatch, caplog):
    _, norms, states = chunk_and_states
    monkeypatch.setattr(disk_state, "RESERVE_FRACTION", 1.0)  # the whole disk is reserved
    for chunk in range(3):
        put("fit-reserve", chunk, norms, (0,), states[:1])
    assert disk_state.get("fit-reserve", 0, (0,)) == (None, [None])
    assert not list((state_dir / "fit-reserve").glob("chunk-*"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "below its reserve" in warned[0] and "every pass computes every row" in warned[0]


def test_forget_removes_the_fit_and_old_fits_are_cleaned_up(state_dir, chunk_and_states):
    _, norms, states = chunk_and_states
    put("fit-old", 0, norms, (0,), states[:1])
    day_ago = time.time() - _STALE_TMP_S - 60
    os.utime(state_dir / "fit-old", (day_ago, day_ago))  # a fit whose client never came back
    put("fit-a", 0, norms, (0,), states[:1])
    assert not (state_dir / "fit-old").exists()
    assert (state_dir / "fit-a" / "chunk-0.bin").exists()
    disk_state.forget("fit-a")
    assert not (state_dir / "fit-a").exists()
    assert disk_state.get("fit-a", 0, (0,)) == (None, [None])


def test_only_the_newest_centre_sets_stay_on_disk(state_dir, chunk_and_states, monkeypatch):
    _, norms, states = chunk_and_states
    monkeypatch.setattr(disk_state, "_CENTRES_FILES", 2)
    for chunk, shift in enumerate((1.0, 2.0, 3.0)):  # three passes' centres
        moved = dataclasses.replace(states[0], centers=states[0].centers + shift)
        put("fit-c", chunk, norms, (0,), [moved])
        time.sleep(0.01)
    assert len(list((state_dir / "fit-c").glob("centres-*.bin"))) == 2
    disk_state._centres.clear()
    assert disk_state.get("fit-c", 0, (0,))[1] == [None]  # its centres are gone: the chunk is computed in full
    for chunk, shift in ((1, 2.0), (2, 3.0)):
        np.testing.assert_array_equal(disk_state.get("fit-c", chunk, (0,))[1][0].centers, states[0].centers + shift)


def test_centre_sets_in_memory_are_as_few_as_on_disk(state_dir, chunk_and_states, monkeypatch):
    _, norms, states = chunk_and_states
    monkeypatch.setattr(disk_state, "_CENTRES_FILES", 2)
    disk_state._centres.clear()
    for chunk, shift in enumerate((1.0, 2.0, 3.0)):  # three passes' centres, each far under the byte budget
        put("fit-m", chunk, norms, (0,), [dataclasses.replace(states[0], centers=states[0].centers + shift)])
    kept = [c for (fit, _), c in disk_state._centres.items() if fit == "fit-m"]
    assert len(kept) == 2
    np.testing.assert_array_equal(kept[-1], states[0].centers + 3.0)


def test_labels_a_streamed_pass_keeps_in_memory_do_not_hold_its_state_file(state_dir, chunk_and_states):
    """Labels a pass leaves unchanged come from the chunk's state file: kept as they were, a view of the whole
    file (ten times their size here), a long streamed fit's workers filled up with files."""
    chunk, norms, states = chunk_and_states
    put("fit-l", 0, norms, (0,), states[:1])
    centers = states[0].centers  # unchanged: the bounds settle every row, no label is computed again
    digests = [screening.centres_digest(centers)]
    try:
        engine._lloyd_task(chunk, centers, (10,), (0,), (0,), "fit-l", True, digests, offset=0, index=0)
        kept = worker_state.get(("fit-l", 0, 0))
        np.testing.assert_array_equal(kept.labels, states[0].labels)
        assert kept.labels.base is None  # its own 4 bytes a row, not a view of the file it was read from
    finally:
        worker_state.forget("fit-l")
