"""Figures of a fit: loss curve, centroid grid, elbow and confusion matrix.

Each function returns a matplotlib Figure (a notebook shows it once, as the cell's value) and, given
`path`, also writes it there atomically. Figures are closed in pyplot as soon as they are made, so a
long sweep or a headless run never accumulates open figures; without a display matplotlib uses Agg.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .atomic import atomic_path  # noqa: E402

DPI = 110
J_CLUST_LABEL = "J_clust (mean squared distance)"


def loss_curve(loss_history, *, title: str = "K-means loss per iteration", path=None):
    """J_clust (mean squared distance) against iteration, 0 being the initial centres."""
    history = _finite_1d(loss_history, "loss_history")
    fig = _figure((6, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(len(history)), history, marker="o" if len(history) <= 50 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(J_CLUST_LABEL)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def centroid_grid(centers, labels=None, *, image_shape=(28, 28), title: str | None = None, path=None):
    """Centroids as images in a grid, each titled with its (majority) label; readable from k=2 to 256 and beyond.

    The grid fills rows exactly where a divisor allows it (10 -> 5x2, 20 -> 5x4, 256 -> 16x16); cells
    shrink as k grows so the figure stays at most 12 inches wide, and label fonts shrink with them.
    """
    centers = np.asarray(centers)
    if centers.ndim != 2 or centers.shape[0] == 0:
        raise ValueError(f"centers must be a non-empty 2-D array (k, n_features), got shape {centers.shape}")
    k = centers.shape[0]
    if int(np.prod(image_shape)) != centers.shape[1]:
        raise ValueError(
            f"centres have {centers.shape[1]} features, image_shape {image_shape} needs {np.prod(image_shape)}"
        )
    if labels is not None and len(labels) != k:
        raise ValueError(f"{len(labels)} labels for {k} centroids")
    rows, cols = _grid_shape(k)
    aspect = image_shape[0] / image_shape[1]
    cell = min(1.3, 12 / cols)  # image width in inches
    font = float(np.clip(cell * 11, 8, 12))  # cell titles, in points
    title_h = font * 1.5 / 72  # inches above each image for its label
    top = 0.55  # inches for the figure title
    width = max(cols * cell * 1.08, 4.0)
    height = rows * (cell * aspect + title_h) + top + 0.1
    fig = _figure((width, height))
    grid = fig.add_gridspec(
        rows,
        cols,
        left=0.02,
        right=0.98,
        bottom=0.1 / height,
        top=1 - top / height,
        wspace=0.08,
        hspace=title_h / (cell * aspect),
    )
    for i in range(rows * cols):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.axis("off")
        if i < k:
            ax.imshow(centers[i].reshape(image_shape), cmap="gray_r", interpolation="nearest")
            ax.set_title(str(labels[i]) if labels is not None else f"#{i}", fontsize=font, pad=2)
    fig.suptitle(
        title or f"{k} centroids" + (" with their majority label" if labels is not None else ""),
        fontsize=12,
        y=1 - 0.1 / height,
        va="top",
    )
    return _save(fig, path)


def elbow(results, *, title: str = "Elbow: J_clust against k", path=None):
    """J_clust against k, one line per init.

    `results` maps an init name to its (k, J_clust) pairs, as a list of pairs or a {k: J_clust} dict,
    e.g. {"sample": [(5, 2.3e6), (6, 2.2e6)], "random": {5: 2.4e6, 6: 2.3e6}}; pairs are sorted by k.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of init name -> (k, J_clust) pairs")
    fig = _figure((7, 4.5), layout="constrained")
    ax = fig.subplots()
    for init, series in results.items():
        ks, js = _elbow_series(init, series)
        ax.plot(ks, js, marker="o", label=str(init))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k (number of clusters)")
    ax.set_ylabel(J_CLUST_LABEL)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="init")
    return _save(fig, path)


def confusion_matrix(
    matrix,
    *,
    row_labels=None,
    col_labels=None,
    title: str = "Confusion matrix",
    xlabel: str = "predicted digit",
    ylabel: str = "true digit",
    normalize: bool = False,
    path=None,
):
    """A counts matrix as an image with a colorbar; counts written in the cells when it is small (<= 20 x 20).

    Rows are true classes and columns predictions by default; any counts table works (e.g. digit x
    cluster, with `xlabel="cluster"`). `normalize=True` shows each row as fractions of its total.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("matrix must hold finite, non-negative counts")
    n_rows, n_cols = counts.shape
    row_labels = _tick_labels(row_labels, n_rows, "row_labels")
    col_labels = _tick_labels(col_labels, n_cols, "col_labels")
    values = counts.astype(np.float64)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    cell = float(np.clip(8 / max(n_rows, n_cols), 0.06, 0.55))  # inches per cell
    width = float(np.clip(n_cols * cell + 2.2, 5, 16))
    height = float(np.clip(n_rows * cell + 1.6, 4, 12))
    fig = _figure((width, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", aspect="auto", interpolation="nearest", vmin=0)
    fig.colorbar(image, ax=ax, label="fraction of the true class" if normalize else "count")
    for axis, labels, n in ((ax.xaxis, col_labels, n_cols), (ax.yaxis, row_labels, n_rows)):
        if n <= 40:
            axis.set_ticks(np.arange(n), labels=labels)
        else:
            axis.set_major_locator(MaxNLocator(integer=True, nbins=20))
            axis.set_major_formatter(lambda v, _pos, labels=labels: labels[int(v)] if 0 <= v < len(labels) else "")
    if max(n_rows, n_cols) <= 20:
        font = float(np.clip(cell * 18, 6, 10))
        threshold = values.max() / 2
        for (i, j), v in np.ndenumerate(values):
            text = f"{v:.2f}" if normalize else _count_text(counts[i, j])
            ax.text(j, i, text, ha="center", va="center", fontsize=font, color="white" if v > threshold else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def _figure(size, **kwargs):
    """A new figure that pyplot does not keep: shown once in a notebook (as a value), never leaked."""
    fig = plt.figure(figsize=size, **kwargs)
    plt.close(fig)
    return fig


def _grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols): near square, wider rather than taller, as few empty cells as possible."""
    base = math.ceil(math.sqrt(k))
    best = None
    for cols in range(base, min(k, 2 * base) + 1):
        rows = math.ceil(k / cols)
        if cols > 3 * rows and cols != k:
            break
        score = (rows * cols - k, abs(cols / rows - 1.3))
        if best is None or score < best[0]:
            best = (score, rows, cols)
    return best[1], best[2]


def _finite_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _elbow_series(init, series) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(series.items()) if isinstance(series, Mapping) else list(series)
    if not pairs:
        raise ValueError(f"init {init!r} has no (k, J_clust) pairs")
    try:
        ks, js = zip(*pairs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"init {init!r}: expected (k, J_clust) pairs, got {pairs[:3]!r}...") from exc
    ks = np.asarray(ks)
    if not np.issubdtype(ks.dtype, np.integer) or (ks < 1).any():
        raise ValueError(f"init {init!r}: k must be positive integers, got {ks.tolist()}")
    if len(set(ks.tolist())) != len(ks):
        raise ValueError(f"init {init!r}: k repeats in {sorted(ks.tolist())}")
    js = _finite_1d(js, f"J_clust of init {init!r}")
    order = np.argsort(ks)
    return ks[order], js[order]


def _tick_labels(labels, n: int, name: str) -> list[str]:
    if labels is None:
        return [str(i) for i in range(n)]
    labels = [str(v) for v in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} {name} for {n} matrix {name.split('_')[0]}s")
    return labels


def _count_text(count) -> str:
    return str(int(count)) if float(count).is_integer() else f"{float(count):.3g}"


def _save(fig, path):
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=DPI, format=Path(path).suffix.lstrip(".") or "png")
    return fig
