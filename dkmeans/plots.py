"""Figures of a fit, written to files headlessly and returned for notebooks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path  # noqa: E402


def loss_curve(loss_history, *, title: str = "K-means loss per iteration", path=None):
    """J_clust (mean squared distance) against iteration, 0 being the initial centres."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(np.arange(len(loss_history)), loss_history, marker="o" if len(loss_history) <= 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("J_clust (mean squared distance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def centroid_grid(centers, labels=None, *, image_shape=(28, 28), title: str | None = None, path=None):
    """Centroids as images in a near-square grid, each titled with its (majority) label."""
    centers = np.asarray(centers)
    k = centers.shape[0]
    if int(np.prod(image_shape)) != centers.shape[1]:
        raise ValueError(
            f"centres have {centers.shape[1]} features, image_shape {image_shape} needs {np.prod(image_shape)}"
        )
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    cell = max(0.45, min(1.2, 12 / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell * 1.15 + 0.4), squeeze=False)
    fontsize = max(4, min(10, 90 / cols))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < k:
            ax.imshow(centers[i].reshape(image_shape), cmap="gray_r")
            ax.set_title(str(labels[i]) if labels is not None else f"#{i}", fontsize=fontsize, pad=2)
    fig.suptitle(title or f"{k} centroids" + (" with their majority label" if labels is not None else ""))
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path):
    if path is not None:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    return fig
