"""Turning clusters into digit predictions: the course notebook's majority vote."""

from __future__ import annotations

import numpy as np


def centroid_labels(cluster_labels, true_labels, n_clusters: int) -> np.ndarray:
    """Most frequent true label in each cluster (ties go to the smaller label; -1 for an empty cluster)."""
    cluster_labels = np.asarray(cluster_labels, dtype=np.int64)
    true_labels = np.asarray(true_labels, dtype=np.int64)
    if cluster_labels.shape != true_labels.shape:
        raise ValueError(f"{cluster_labels.size} cluster labels but {true_labels.size} true labels")
    if cluster_labels.size and (cluster_labels.min() < 0 or cluster_labels.max() >= n_clusters):
        raise ValueError(
            f"cluster labels must lie in [0, {n_clusters}), got {cluster_labels.min()}..{cluster_labels.max()}"
        )
    if true_labels.size and true_labels.min() < 0:
        raise ValueError("true labels must be non-negative integers")
    n_classes = int(true_labels.max()) + 1 if true_labels.size else 1
    table = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(table, (cluster_labels, true_labels), 1)
    out = table.argmax(axis=1)
    out[table.sum(axis=1) == 0] = -1
    return out


def predict_labels(cluster_labels, mapping: np.ndarray) -> np.ndarray:
    return np.asarray(mapping)[np.asarray(cluster_labels, dtype=np.int64)]


def accuracy(true_labels, predicted) -> float:
    true_labels = np.asarray(true_labels)
    predicted = np.asarray(predicted)
    if true_labels.shape != predicted.shape:
        raise ValueError(f"{true_labels.size} true labels but {predicted.size} predictions")
    return float(np.mean(true_labels == predicted)) if true_labels.size else float("nan")
