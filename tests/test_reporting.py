"""Majority vote, figures and atomic writes: everything the CLI reports through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dkmeans import plots  # noqa: E402
from dkmeans.atomic import atomic_path, write_json  # noqa: E402
from dkmeans.metrics import accuracy, centroid_labels, predict_labels  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --- majority vote -------------------------------------------------------------------------


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


@pytest.mark.parametrize("k", [2, 10, 20, 64, 256])
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


def test_figures_are_not_kept_open_by_pyplot(tmp_path):
    plt.close("all")
    plots.loss_curve([3.0, 2.0])
    plots.centroid_grid(np.zeros((3, 784)), [1, 2, 3])
    plots.elbow({"sample": [(2, 3.0), (3, 2.0)]})
    plots.confusion_matrix(np.eye(3, dtype=int))
    assert plt.get_fignums() == []  # a 100-figure sweep does not pile up figures (or pyplot's warning)


def test_plots_headless_without_display_or_backend(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    script = (
        "import matplotlib, numpy as np; from dkmeans import plots; "
        f"plots.confusion_matrix(np.eye(3, dtype=int), path={str(tmp_path / 'c.png')!r}); "
        "print(matplotlib.get_backend())"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().lower() == "agg"
    assert_png(tmp_path / "c.png")


@pytest.mark.parametrize("history, match", [([], "non-empty"), ([[1.0, 2.0]], "1-D"), ([3.0, np.nan], "NaN")])
def test_loss_curve_bad_input(tmp_path, history, match):
    with pytest.raises(ValueError, match=match):
        plots.loss_curve(history, path=tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


# --- centroid grid layout ---------------------------------------------------------------


def agg_renderer(fig):
    """Lay the figure out as the PNG writer would and return the renderer, for measuring text."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def boxes(artists, renderer):
    return np.array([a.get_window_extent(renderer).extents for a in artists])  # x0, y0, x1, y1 in pixels


def overlapping(a, b):
    """Pairs (i, j) where box a[i] and box b[j] overlap by more than a pixel."""
    x = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    y = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.argwhere((x > 1) & (y > 1))


@pytest.mark.parametrize(
    "k, shape", [(2, (1, 2)), (3, (1, 3)), (10, (2, 5)), (20, (4, 5)), (64, (8, 8)), (256, (16, 16))]
)
def test_centroid_grid_layout_is_readable(k, shape):
    labels = np.arange(k) % 10
    labels[-1] = -1  # the widest label
    fig = plots.centroid_grid(np.random.default_rng(0).random((k, 784)), labels)
    width, height = fig.get_size_inches() * plots.DPI
    assert 400 <= width <= 2000 and 200 <= height <= 2000, (width, height)
    image_axes = [ax for ax in fig.axes if ax.images]
    rows_cols = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in fig.axes}
    assert len(rows_cols) == shape[0] * shape[1] == len(fig.axes)  # the expected grid, fully used for these k
    renderer = agg_renderer(fig)
    cells = boxes(image_axes, renderer)
    titles = boxes([ax.title for ax in image_axes], renderer)
    suptitle = boxes([fig._suptitle], renderer)
    sizes = cells[:, 2:] - cells[:, :2]
    assert np.ptp(sizes, axis=0).max() < 1.5  # every image the same size
    assert sizes.min() >= 40  # pixels: a 28x28 digit is at least drawn at full resolution
    for group in (cells, titles, suptitle):  # everything inside the canvas
        assert group[:, :2].min() >= -0.5 and group[:, 2].max() <= width + 0.5 and group[:, 3].max() <= height + 0.5
    assert overlapping(titles, cells).size == 0  # labels clear of every image
    assert len(overlapping(titles, titles)) == k  # (each only with itself)
    assert overlapping(suptitle, np.vstack([cells, titles])).size == 0
    fonts = {ax.title.get_fontsize() for ax in image_axes}
    assert len(fonts) == 1 and 8 <= fonts.pop() <= 12
    assert titles[:, 3].max() - titles[:, 1].min() > 0


@pytest.mark.parametrize(
    "centers, labels, match",
    [
        (np.zeros((0, 784)), None, "non-empty 2-D"),
        (np.zeros(784), None, "non-empty 2-D"),
        (np.zeros((3, 784)), [1, 2], "2 labels for 3 centroids"),
    ],
)
def test_centroid_grid_bad_input(tmp_path, centers, labels, match):
    with pytest.raises(ValueError, match=match):
        plots.centroid_grid(centers, labels, path=tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


# --- elbow --------------------------------------------------------------------------------


def test_elbow(tmp_path):
    results = {
        "sample": [(7, 5.0), (5, 9.0), (6, 6.5)],  # unsorted on purpose
        "random": {5: 10.0, 6: 8.0, 7: 7.5, 8: 7.0},
    }
    path = tmp_path / "elbow.png"
    fig = plots.elbow(results, path=path)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() == "Elbow: J_clust against k"
    assert ax.get_xlabel() == "k (number of clusters)"
    assert "J_clust" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"sample", "random"}
    np.testing.assert_array_equal(lines["sample"].get_xdata(), [5, 6, 7])
    np.testing.assert_array_equal(lines["sample"].get_ydata(), [9.0, 6.5, 5.0])
    np.testing.assert_array_equal(lines["random"].get_xdata(), [5, 6, 7, 8])
    np.testing.assert_array_equal(lines["random"].get_ydata(), [10.0, 8.0, 7.5, 7.0])
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["sample", "random"]
    assert legend.get_title().get_text() == "init"
    assert all(float(t).is_integer() for t in ax.get_xticks())  # k ticks are whole numbers
    image = assert_png(path)
    assert image[..., :3].std() > 0.01
    assert leftovers(tmp_path) == []


def test_elbow_single_point_and_custom_title():
    fig = plots.elbow({"k-means||": [(np.int64(10), np.float64(2.5e6))]}, title="one")
    assert fig.axes[0].get_title() == "one"
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == [10]


@pytest.mark.parametrize(
    "results, match",
    [
        ({}, "non-empty mapping"),
        ([("sample", [(5, 1.0)])], "non-empty mapping"),
        ({"sample": []}, "'sample' has no"),
        ({"sample": [5, 6]}, "pairs"),
        ({"sample": [(5, 1.0, 2.0)]}, "pairs"),
        ({"sample": [(5.5, 1.0)]}, "positive integers"),
        ({"sample": [(0, 1.0)]}, "positive integers"),
        ({"sample": [(5, 1.0), (5, 2.0)]}, "repeats"),
        ({"sample": [(5, np.nan)]}, "NaN"),
        ({"sample": [(5, 1.0)], "random": [(5, np.inf)]}, "'random'"),
    ],
)
def test_elbow_bad_input(tmp_path, results, match):
    with pytest.raises(ValueError, match=match):
        plots.elbow(results, path=tmp_path / "elbow.png")
    assert list(tmp_path.iterdir()) == []


# --- confusion matrix -----------------------------------------------------------------------


def test_confusion_matrix_plot(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 50, (10, 10)) + np.diag(rng.integers(500, 6000, 10))
    path = tmp_path / "confusion.png"
    fig = plots.confusion_matrix(matrix, path=path)
    assert isinstance(fig, Figure)
    ax, bar = fig.axes  # the matrix and its colorbar
    assert ax.get_title() == "Confusion matrix"
    assert ax.get_xlabel() == "predicted digit" and ax.get_ylabel() == "true digit"
    assert bar.get_ylabel() == "count"
    np.testing.assert_array_equal(ax.images[0].get_array(), matrix)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(10)]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(texts) == 100
    assert all(texts[i, j] == str(matrix[i, j]) for i in range(10) for j in range(10))
    # dark cells get white text
    assert {t.get_color() for t in ax.texts} == {"white", "black"}
    image = assert_png(path)
    assert max(image.shape[:2]) <= 2000
    assert leftovers(tmp_path) == []


def test_confusion_matrix_plot_normalized_and_labelled():
    matrix = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    fig = plots.confusion_matrix(
        matrix, normalize=True, row_labels=["a", "b", "c"], col_labels=["x", "y", "z"], title="t", xlabel="X"
    )
    ax, bar = fig.axes
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.8, 0.2, 0], [0.25, 0.25, 0.5], [0, 0, 0]])
    assert "fraction" in bar.get_ylabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert ax.get_title() == "t" and ax.get_xlabel() == "X"
    assert sorted(t.get_text() for t in ax.texts)[-1] == "0.80"


@pytest.mark.parametrize("n_cols", [2, 20, 256])
def test_confusion_matrix_plot_digit_by_cluster_sizes(tmp_path, n_cols):
    matrix = np.random.default_rng(n_cols).integers(0, 600, (10, n_cols))
    path = tmp_path / "c.png"
    fig = plots.confusion_matrix(matrix, xlabel="cluster", path=path)
    ax = fig.axes[0]
    image = assert_png(path)
    assert 300 <= image.shape[1] <= 2000 and 300 <= image.shape[0] <= 2000
    assert len(ax.texts) == (10 * n_cols if n_cols <= 20 else 0)  # numbers only where they fit
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(ticks) <= 41 and all(0 <= int(t) < n_cols for t in ticks)
    renderer = agg_renderer(fig)
    tick_boxes = boxes([t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()], renderer)
    assert len(overlapping(tick_boxes, tick_boxes)) == len(tick_boxes)  # tick labels do not collide


@pytest.mark.parametrize(
    "matrix, kwargs, match",
    [
        (np.arange(4), {}, "non-empty 2-D"),
        (np.zeros((0, 3)), {}, "non-empty 2-D"),
        (np.array([[1, -1], [0, 2]]), {}, "non-negative"),
        (np.array([[1.0, np.nan], [0, 2]]), {}, "finite"),
        (np.array([["a", "b"]]), {}, "counts"),
        (np.eye(3, dtype=int), {"row_labels": [0, 1]}, "2 row_labels for 3 matrix rows"),
        (np.eye(3, dtype=int), {"col_labels": list("abcd")}, "4 col_labels for 3 matrix cols"),
    ],
)
def test_confusion_matrix_plot_bad_input(tmp_path, matrix, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.confusion_matrix(matrix, path=tmp_path / "c.png", **kwargs)
    assert list(tmp_path.iterdir()) == []


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
