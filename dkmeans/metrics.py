"""How well a clustering matches the true labels: majority-vote accuracy, purity, confusion, NMI and ARI.

Everything is computed from the contingency table (clusters x classes counts). That table is all the
scores need, it is small (k x 10 for MNIST) and it adds up across chunks, so a distributed caller can
sum per-chunk tables instead of gathering labels. NMI and ARI are a few lines of closed-form
arithmetic on it; scikit-learn (whose conventions we follow, and which the tests use as the oracle)
would add scipy and joblib to the runtime dependencies for those few lines, and it needs label
arrays, not a table.

Conventions: rows of a contingency table are clusters, columns are classes; rows of a confusion
matrix are true classes, columns are predicted classes. Labels are non-negative integers.
"""

from __future__ import annotations

import math

import numpy as np

NMI_AVERAGES = ("min", "geometric", "arithmetic", "max")


def contingency_table(cluster_labels, true_labels, n_clusters: int, n_classes: int | None = None) -> np.ndarray:
    """Counts of (cluster, true label) pairs: an (n_clusters, n_classes) int64 table.

    `n_classes` defaults to the largest true label + 1; pass it to get the same width for train and test.
    """
    cluster_labels = np.asarray(cluster_labels)
    true_labels = np.asarray(true_labels)
    if cluster_labels.shape != true_labels.shape or cluster_labels.ndim != 1:
        raise ValueError(
            f"{cluster_labels.size} cluster labels but {true_labels.size} true labels (both must be 1-D and match)"
        )
    for name, labels in (("cluster", cluster_labels), ("true", true_labels)):
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    cluster_labels = cluster_labels.astype(np.int64, copy=False)
    true_labels = true_labels.astype(np.int64, copy=False)
    if cluster_labels.size and (cluster_labels.min() < 0 or cluster_labels.max() >= n_clusters):
        raise ValueError(
            f"cluster labels must lie in [0, {n_clusters}), got {cluster_labels.min()}..{cluster_labels.max()}"
        )
    if true_labels.size and true_labels.min() < 0:
        raise ValueError("true labels must be non-negative integers")
    seen = int(true_labels.max()) + 1 if true_labels.size else 1
    if n_classes is None:
        n_classes = seen
    elif seen > n_classes:
        raise ValueError(f"true label {seen - 1} does not fit n_classes={n_classes}")
    table = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(table, (cluster_labels, true_labels), 1)
    return table


# --- majority vote: clusters -> class predictions (the course notebook's rule) ----------------


def centroid_labels(cluster_labels, true_labels, n_clusters: int) -> np.ndarray:
    """Most frequent true label in each cluster (ties go to the smaller label; -1 for an empty cluster)."""
    return labels_from_table(contingency_table(cluster_labels, true_labels, n_clusters))


def labels_from_table(table) -> np.ndarray:
    """The majority label of each row of a contingency table (-1 for an empty row)."""
    table = np.asarray(table)
    out = table.argmax(axis=1)
    out[table.sum(axis=1) == 0] = -1
    return out


def predict_labels(cluster_labels, mapping: np.ndarray) -> np.ndarray:
    """Each row's predicted class: the majority label of its cluster."""
    return np.asarray(mapping)[np.asarray(cluster_labels, dtype=np.int64)]


def accuracy(true_labels, predicted) -> float:
    """Fraction of rows whose prediction equals the true label (nan for no rows)."""
    true_labels = np.asarray(true_labels)
    predicted = np.asarray(predicted)
    if true_labels.shape != predicted.shape:
        raise ValueError(f"{true_labels.size} true labels but {predicted.size} predictions")
    return float(np.mean(true_labels == predicted)) if true_labels.size else float("nan")


def confusion_matrix(true_labels, predicted, n_classes: int | None = None) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class.

    Predictions of -1 (a cluster that got no training rows) belong to no column and are left out,
    so a row then sums to less than that class's count; `clustering_scores` reports how many.
    """
    true_labels = np.asarray(true_labels)
    predicted = np.asarray(predicted)
    if true_labels.shape != predicted.shape:
        raise ValueError(f"{true_labels.size} true labels but {predicted.size} predictions")
    for name, labels in (("true", true_labels), ("predicted", predicted)):
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    if n_classes is None:
        n_classes = int(max(true_labels.max(initial=-1), predicted.max(initial=-1))) + 1
    if true_labels.size and (true_labels.min() < 0 or true_labels.max() >= n_classes):
        raise ValueError(f"true labels must lie in [0, {n_classes})")
    if predicted.size and (predicted.min() < -1 or predicted.max() >= n_classes):
        raise ValueError(f"predicted labels must lie in [0, {n_classes}) or be -1")
    keep = predicted >= 0
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (true_labels[keep].astype(np.int64), predicted[keep].astype(np.int64)), 1)
    return matrix


# --- scores of the clustering itself (no vote needed) ------------------------------------------


def purity(true_labels, cluster_labels) -> float:
    """Fraction of rows in their cluster's most common class (on the training rows it is the train accuracy)."""
    return purity_from_table(_table_of(true_labels, cluster_labels))


def normalized_mutual_info(true_labels, cluster_labels, *, average_method: str = "arithmetic") -> float:
    """NMI, as sklearn.metrics.normalized_mutual_info_score (same default normalisation, same limit cases)."""
    return nmi_from_table(_table_of(true_labels, cluster_labels), average_method=average_method)


def adjusted_rand_index(true_labels, cluster_labels) -> float:
    """ARI (Hubert and Arabie), as sklearn.metrics.adjusted_rand_score."""
    return ari_from_table(_table_of(true_labels, cluster_labels))


def purity_from_table(table) -> float:
    table = _check_table(table)
    n = int(table.sum())
    return float(table.max(axis=1).sum() / n) if n else float("nan")


def nmi_from_table(table, *, average_method: str = "arithmetic") -> float:
    """Mutual information over a mean of the two entropies; 1.0 when both sides have a single label."""
    if average_method not in NMI_AVERAGES:
        raise ValueError(f"average_method must be one of {', '.join(NMI_AVERAGES)}, got {average_method!r}")
    table = _check_table(table)
    n = float(table.sum())
    if n == 0:
        return float("nan")
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    if np.count_nonzero(rows) == 1 and np.count_nonzero(cols) == 1:
        return 1.0  # neither labelling splits the data: a perfect (if trivial) match
    if np.count_nonzero(rows) == 1 or np.count_nonzero(cols) == 1:
        return 0.0  # one side has a single label: no information shared (and a zero entropy to divide by)
    i, j = np.nonzero(table)
    p = table[i, j] / n
    mi = max(0.0, float(np.sum(p * (np.log(table[i, j]) + math.log(n) - np.log(rows[i]) - np.log(cols[j])))))
    if mi == 0.0:
        return 0.0
    h_clusters, h_classes = _entropy(rows, n), _entropy(cols, n)
    if average_method == "min":
        norm = min(h_classes, h_clusters)
    elif average_method == "geometric":
        norm = math.sqrt(h_classes * h_clusters)
    elif average_method == "arithmetic":
        norm = (h_classes + h_clusters) / 2
    else:
        norm = max(h_classes, h_clusters)
    return float(mi / norm)


def ari_from_table(table) -> float:
    """(index - expected) / (max - expected) over pair counts; 1.0 when the two partitions are the same."""
    table = _check_table(table)
    n = int(table.sum())
    if n == 0:
        return float("nan")
    # Python ints: pair counts of 60,000 rows multiply past int64.
    index = int(_pairs(table).sum())
    a = int(_pairs(table.sum(axis=1)).sum())
    b = int(_pairs(table.sum(axis=0)).sum())
    total = n * (n - 1) // 2
    # (index - a*b/total) / ((a+b)/2 - a*b/total), scaled by 2*total to stay in exact integers.
    numerator = 2 * (index * total - a * b)
    denominator = (a + b) * total - 2 * a * b
    return 1.0 if denominator == 0 else float(numerator / denominator)


# --- everything at once, for the CLI, the elbow sweep and the notebook ------------------------


def clustering_scores(cluster_labels, true_labels, mapping, n_classes: int | None = None) -> dict:
    """Accuracy (majority vote through `mapping`), purity, NMI, ARI and the confusion matrix of one set of rows.

    `mapping` comes from the training rows (`centroid_labels`), so on test rows accuracy measures
    generalisation while purity, NMI and ARI judge the test clustering on its own.
    """
    mapping = np.asarray(mapping)
    true_labels = np.asarray(true_labels)
    if n_classes is None:
        n_classes = int(max(true_labels.max(initial=-1), mapping.max(initial=-1))) + 1
    table = contingency_table(cluster_labels, true_labels, mapping.shape[0], n_classes)
    predicted = predict_labels(cluster_labels, mapping)
    return {
        "n": int(true_labels.size),
        "accuracy": accuracy(true_labels, predicted),
        "purity": purity_from_table(table),
        "nmi": nmi_from_table(table),
        "ari": ari_from_table(table),
        "confusion_matrix": confusion_matrix(true_labels, predicted, n_classes).tolist(),
        "unlabelled": int(np.count_nonzero(predicted < 0)),
    }


def most_confused(matrix) -> tuple[int, int, int] | None:
    """The largest off-diagonal cell of a confusion matrix: (true, predicted, count), or None if there is none."""
    off = np.array(matrix, dtype=np.int64, copy=True)
    np.fill_diagonal(off, 0)
    if off.size == 0 or off.max() == 0:
        return None
    true, pred = np.unravel_index(off.argmax(), off.shape)
    return int(true), int(pred), int(off[true, pred])


def _table_of(true_labels, cluster_labels) -> np.ndarray:
    """Contingency table of arbitrary hashable labels (as sklearn accepts), via their ranks."""
    true_labels = np.asarray(true_labels)
    cluster_labels = np.asarray(cluster_labels)
    if true_labels.shape != cluster_labels.shape or true_labels.ndim != 1:
        raise ValueError(f"{true_labels.size} true labels but {cluster_labels.size} cluster labels (1-D, same length)")
    clusters, cluster_idx = np.unique(cluster_labels, return_inverse=True)
    classes, class_idx = np.unique(true_labels, return_inverse=True)
    return contingency_table(cluster_idx.ravel(), class_idx.ravel(), max(len(clusters), 1), max(len(classes), 1))


def _check_table(table) -> np.ndarray:
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"a contingency table is 2-D (clusters x classes), got shape {table.shape}")
    if table.size and (not np.issubdtype(table.dtype, np.integer) or table.min() < 0):
        raise ValueError("a contingency table holds non-negative integer counts")
    return table.astype(np.int64, copy=False)


def _pairs(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    return counts * (counts - 1) // 2


def _entropy(counts, n: float) -> float:
    p = counts[counts > 0] / n
    return float(-np.sum(p * np.log(p)))
