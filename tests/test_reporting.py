"""Labeling (majority vote), figures and atomic writes: everything the CLI reports through."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dkmeans import plots  # noqa: E402
from dkmeans.atomic import atomic_path, write_json  # noqa: E402
from dkmeans.labeling import accuracy, centroid_labels, predict_labels  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --- labeling -------------------------------------------------------------------------


def reference_labels(clusters, truth, k):
    """Plain Python: the most common true label per cluster, ties to the smaller label, -1 when empty."""
    votes = {j: Counter() for j in range(k)}
    for c, t in zip(list(clusters), list(truth)):
        votes[int(c)][int(t)] += 1
    out = []
    for j in range(k):
        if not votes[j]:
            out.append(-1)
            continue
        best = max(votes[j].values())
        out.append(min(t for t, n in votes[j].items() if n == best))
    return out


def test_centroid_labels_hand_built():
    clusters = [0, 0, 0, 1, 1, 1, 1, 3, 3, 4, 4, 4]
    truth = [7, 7, 2, 5, 3, 3, 5, 9, 0, 6, 6, 6]
    # cluster 0: 7 wins 2:1; cluster 1: 3 and 5 tie, 3 is smaller; cluster 2: empty;
    # cluster 3: 0 and 9 tie, 0 is smaller; cluster 4: 6; cluster 5: empty (beyond the last used).
    expected = [7, 3, -1, 0, 6, -1]
    out = centroid_labels(clusters, truth, 6)
    assert out.tolist() == expected
    assert out.tolist() == reference_labels(clusters, truth, 6)
    assert out.shape == (6,)
    assert np.issubdtype(out.dtype, np.integer)


@pytest.mark.parametrize("seed", range(8))
def test_centroid_labels_matches_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 40))
    n = int(rng.integers(0, 400))
    n_classes = int(rng.integers(1, 12))
    # Use only some clusters so empty ones occur; few classes and small n make ties frequent.
    used = rng.choice(k, size=max(1, k // 2), replace=False)
    clusters = rng.choice(used, size=n)
    truth = rng.integers(0, n_classes, size=n)
    for dtype in (np.int64, np.int32, np.uint8):
        out = centroid_labels(clusters.astype(dtype), truth.astype(dtype), k)
        assert out.tolist() == reference_labels(clusters, truth, k)


def test_centroid_labels_with_no_rows_is_all_empty():
    assert centroid_labels([], [], 3).tolist() == [-1, -1, -1]


def test_centroid_labels_uint8_labels_do_not_wrap():
    clusters = np.zeros(300, dtype=np.uint8)
    truth = np.full(300, 255, dtype=np.uint8)
    truth[:100] = 4
    assert centroid_labels(clusters, truth, 1).tolist() == [255]


@pytest.mark.parametrize("n_clusters, n_truth", [(5, 4), (4, 5), (0, 1)])
def test_centroid_labels_mismatched_lengths(n_clusters, n_truth):
    with pytest.raises(ValueError, match="labels"):
        centroid_labels(np.zeros(n_clusters, int), np.zeros(n_truth, int), 2)


def test_centroid_labels_negative_true_label():
    with pytest.raises(ValueError, match="non-negative"):
        centroid_labels([0, 1], [1, -1], 2)


def test_predict_labels():
    mapping = np.array([7, 3, -1, 0])
    assert predict_labels([0, 1, 3, 3, 0, 2], mapping).tolist() == [7, 3, 0, 0, 7, -1]
    assert predict_labels(np.array([], dtype=int), mapping).tolist() == []
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 4, size=1000)
    np.testing.assert_array_equal(predict_labels(clusters, mapping), [mapping[c] for c in clusters])
    with pytest.raises(IndexError):
        predict_labels([4], mapping)


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy([0, 0], [0, 0]) == 1.0
    assert accuracy([0, 0], [1, 1]) == 0.0
    assert isinstance(accuracy(np.array([1]), np.array([1])), float)
    assert np.isnan(accuracy([], []))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 10, 777), rng.integers(0, 10, 777)
    assert accuracy(a, b) == sum(int(x == y) for x, y in zip(a, b)) / 777


def test_accuracy_mismatched_lengths():
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        accuracy([1], [])


def test_majority_vote_end_to_end():
    """Labels -> mapping -> predictions -> accuracy agrees with a hand count."""
    clusters = [0, 0, 0, 1, 1, 2]
    truth = [5, 5, 1, 2, 2, 9]
    mapping = centroid_labels(clusters, truth, 3)
    assert accuracy(truth, predict_labels(clusters, mapping)) == pytest.approx(5 / 6)


# --- plots -----------------------------------------------------------------------------


def assert_png(path: Path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= 100
    return image


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_loss_curve(tmp_path):
    history = [10.0, 6.0, 5.0, 4.5, 4.5]
    path = tmp_path / "loss.png"
    fig = plots.loss_curve(history, title="my title", path=path)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() == "my title"
    assert ax.get_xlabel() == "iteration"
    assert "J_clust" in ax.get_ylabel()
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
    np.testing.assert_array_equal(line.get_ydata(), history)
    assert_png(path)
    assert leftovers(tmp_path) == []


def test_loss_curve_without_path_and_long_history(tmp_path):
    fig = plots.loss_curve(np.linspace(5, 1, 300))
    assert fig.axes[0].get_title()
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 300
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("k", [2, 10, 20, 256])
def test_centroid_grid(tmp_path, k):
    rng = np.random.default_rng(k)
    centers = rng.random((k, 784)) * 255
    labels = rng.integers(-1, 10, size=k)
    path = tmp_path / "centroids.png"
    fig = plots.centroid_grid(centers, labels, path=path)
    assert isinstance(fig, Figure)
    assert len(fig.axes) >= k
    with_images = [ax for ax in fig.axes if ax.images]
    assert len(with_images) == k
    assert fig.axes[:k] == with_images  # in order, first k cells
    for i, ax in enumerate(with_images):
        assert ax.get_title() == str(labels[i])
        np.testing.assert_array_equal(ax.images[0].get_array(), centers[i].reshape(28, 28))
    for ax in fig.axes[k:]:
        assert not ax.images and ax.get_title() == ""
    assert str(k) in fig.get_suptitle()
    image = assert_png(path)
    assert max(image.shape[:2]) <= 4000
    assert leftovers(tmp_path) == []


def test_centroid_grid_without_labels_and_custom_shape(tmp_path):
    centers = np.arange(3 * 12, dtype=float).reshape(3, 12)
    fig = plots.centroid_grid(centers, image_shape=(3, 4), title="custom")
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["#0", "#1", "#2"]
    assert fig.axes[0].images[0].get_array().shape == (3, 4)
    assert fig.get_suptitle() == "custom"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_features, image_shape", [(784, (28, 27)), (784, (7, 7)), (700, (28, 28)), (784, (784, 2))])
def test_centroid_grid_wrong_image_shape(tmp_path, n_features, image_shape):
    path = tmp_path / "centroids.png"
    with pytest.raises(ValueError, match="image_shape"):
        plots.centroid_grid(np.zeros((4, n_features)), [0, 1, 2, 3], image_shape=image_shape, path=path)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_file(tmp_path):
    path = tmp_path / "loss.not-a-format"
    with pytest.raises(ValueError):
        plots.loss_curve([3.0, 2.0], path=path)
    assert list(tmp_path.iterdir()) == []


def test_plot_replaces_existing_file(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    plots.loss_curve([3.0, 2.0], path=path)
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


# --- atomic writes ------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_atomic_path_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_creates_new_file(tmp_path):
    target = tmp_path / "fresh.bin"
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["fresh.bin"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_path_failure_keeps_old_content(tmp_path, exc):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise exc()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_failure_without_old_file(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_after_block_removed_its_temp(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.unlink()
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "nope" / "out.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_honours_umask(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        target = tmp_path / "atomic.txt"
        with atomic_path(target) as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert plain.stat().st_mode & 0o777 == 0o644
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_write_json_round_trip(tmp_path):
    obj = {
        "k": 10,
        "init": "k-means||",
        "loss_history": [4.5, 2.25, 2.0],
        "accuracy": 0.5330000000000001,
        "nested": {"none": None, "flag": True},
        "unicode": "J_clust \u2193",
    }
    path = tmp_path / "metrics.json"
    path.write_text("stale")
    write_json(path, obj)
    assert json.loads(path.read_text()) == obj
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_json_unserialisable_keeps_old(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
