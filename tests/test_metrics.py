"""Clustering scores against independent oracles: scikit-learn, plain Python, and hand-counted cases."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import sklearn.metrics as skm
from sklearn.metrics.cluster import contingency_matrix as sk_contingency

from dkmeans import metrics

# --- hand-computed cases -------------------------------------------------------------------

# Three clusters over three classes, rows = clusters, columns = classes:
#   cluster 0: class 0 x3, class 1 x1         -> majority 0
#   cluster 1: class 1 x2, class 2 x2         -> tie, majority 1 (smaller)
#   cluster 2: class 2 x2                     -> majority 2
HAND_CLUSTERS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
HAND_TRUTH = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_hand_case_table_purity_accuracy_confusion():
    table = metrics.contingency_table(HAND_CLUSTERS, HAND_TRUTH, 3)
    assert table.tolist() == [[3, 1, 0], [0, 2, 2], [0, 0, 2]]
    assert metrics.purity(HAND_TRUTH, HAND_CLUSTERS) == pytest.approx(7 / 10)
    mapping = metrics.centroid_labels(HAND_CLUSTERS, HAND_TRUTH, 3)
    assert mapping.tolist() == [0, 1, 2]
    predicted = metrics.predict_labels(HAND_CLUSTERS, mapping)
    assert predicted.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert metrics.accuracy(HAND_TRUTH, predicted) == pytest.approx(7 / 10)
    # true 0 -> 0 (3); true 1 -> 0 (1), 1 (2); true 2 -> 1 (2), 2 (2)
    assert metrics.confusion_matrix(HAND_TRUTH, predicted, 3).tolist() == [[3, 0, 0], [1, 2, 0], [0, 2, 2]]


def test_hand_case_ari_and_nmi():
    # Pairs within the same cluster: 6 + 6 + 1 = 13; same class: 3 + 3 + 6 = 12; both: 3 + 1 + 1 + 1 = 6.
    # Of 45 pairs: expected = 13 * 12 / 45, max = (13 + 12) / 2.
    expected_index = 13 * 12 / 45
    ari = (6 - expected_index) / (12.5 - expected_index)
    assert metrics.adjusted_rand_index(HAND_TRUTH, HAND_CLUSTERS) == pytest.approx(ari, rel=1e-12)

    # MI and entropies written out term by term from the table above.
    n = 10
    cells = [(3, 4, 3), (1, 4, 3), (2, 4, 3), (2, 4, 4), (2, 2, 4)]  # (n_ij, cluster size, class size)
    mi = sum(c / n * np.log(n * c / (a * b)) for c, a, b in cells)
    h_clusters = -sum(a / n * np.log(a / n) for a in (4, 4, 2))
    h_classes = -sum(b / n * np.log(b / n) for b in (3, 3, 4))
    assert metrics.normalized_mutual_info(HAND_TRUTH, HAND_CLUSTERS) == pytest.approx(
        mi / ((h_clusters + h_classes) / 2), rel=1e-12
    )
    assert metrics.normalized_mutual_info(HAND_TRUTH, HAND_CLUSTERS, average_method="max") == pytest.approx(
        mi / max(h_clusters, h_classes), rel=1e-12
    )


@pytest.mark.parametrize(
    "truth, clusters, nmi, ari",
    [
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0, 1.0),  # same partition, other names
        ([0, 0, 1, 1], [0, 1, 0, 1], 0.0, -0.5),  # independent
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0, 1.0),  # nobody splits
        ([0, 0, 0, 0], [0, 1, 2, 3], 0.0, 0.0),  # one class, every row its own cluster
        ([0, 1, 2, 3], [0, 0, 0, 0], 0.0, 0.0),
        ([0, 1, 2, 3], [3, 2, 1, 0], 1.0, 1.0),  # all singletons on both sides
        ([5], [9], 1.0, 1.0),
    ],
)
def test_limit_cases_match_sklearn(truth, clusters, nmi, ari):
    assert metrics.normalized_mutual_info(truth, clusters) == pytest.approx(nmi, abs=1e-12)
    assert metrics.adjusted_rand_index(truth, clusters) == pytest.approx(ari, abs=1e-12)
    assert skm.normalized_mutual_info_score(truth, clusters) == pytest.approx(nmi, abs=1e-12)
    assert skm.adjusted_rand_score(truth, clusters) == pytest.approx(ari, abs=1e-12)


def test_no_rows_scores_are_nan():
    for score in (metrics.purity, metrics.normalized_mutual_info, metrics.adjusted_rand_index):
        assert np.isnan(score(np.array([], int), np.array([], int)))
    assert np.isnan(metrics.accuracy([], []))
    assert metrics.confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


# --- random labellings against scikit-learn -------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_labellings_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 500))
    truth = rng.integers(0, int(rng.integers(1, 11)), n)
    # Sometimes a clustering that follows the truth closely, sometimes pure noise.
    if seed % 2:
        clusters = np.where(rng.random(n) < 0.8, truth * 3 + rng.integers(0, 3, n), rng.integers(0, 40, n))
    else:
        clusters = rng.integers(0, int(rng.integers(1, 40)), n)
    for method in metrics.NMI_AVERAGES:
        assert metrics.normalized_mutual_info(truth, clusters, average_method=method) == pytest.approx(
            skm.normalized_mutual_info_score(truth, clusters, average_method=method), abs=1e-12
        )
    assert metrics.adjusted_rand_index(truth, clusters) == pytest.approx(
        skm.adjusted_rand_score(truth, clusters), abs=1e-12
    )
    # Purity by plain Python: each cluster's most common class.
    by_cluster = {}
    for c, t in zip(clusters.tolist(), truth.tolist()):
        by_cluster.setdefault(c, Counter())[t] += 1
    assert metrics.purity(truth, clusters) == pytest.approx(
        sum(max(v.values()) for v in by_cluster.values()) / n, rel=1e-12
    )
    k = int(clusters.max()) + 1
    table = metrics.contingency_table(clusters, truth, k, 10)
    dense = sk_contingency(truth, clusters)  # rows: classes present, columns: clusters present
    present_clusters, present_classes = np.unique(clusters), np.unique(truth)
    np.testing.assert_array_equal(table[np.ix_(present_clusters, present_classes)], dense.T)
    assert table.sum() == n


def test_labels_need_not_be_small_integers():
    truth = np.array(["a", "b", "b", "c", "a", "c"])
    clusters = np.array([10, 20, 20, 999, 10, 999])
    assert metrics.normalized_mutual_info(truth, clusters) == pytest.approx(1.0)
    assert metrics.adjusted_rand_index(truth, clusters) == pytest.approx(1.0)
    assert metrics.purity(truth, clusters) == 1.0


def test_ari_does_not_overflow_on_large_inputs():
    # 300,000 rows in 2 clusters: pair counts ~ 4.5e10 and their products ~ 2e21, past int64.
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 300_000)
    clusters = np.where(rng.random(300_000) < 0.9, truth, 1 - truth)
    assert metrics.adjusted_rand_index(truth, clusters) == pytest.approx(
        skm.adjusted_rand_score(truth, clusters), rel=1e-9
    )
    assert metrics.normalized_mutual_info(truth, clusters) == pytest.approx(
        skm.normalized_mutual_info_score(truth, clusters), rel=1e-9
    )


def test_tables_add_up_across_chunks():
    """A distributed caller may sum per-chunk tables: the scores of the sum are those of the whole."""
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 10, 5000)
    clusters = (truth * 2 + rng.integers(0, 3, 5000)) % 17
    chunks = np.array_split(np.arange(5000), 7)
    table = sum(metrics.contingency_table(clusters[c], truth[c], 17, 10) for c in chunks)
    np.testing.assert_array_equal(table, metrics.contingency_table(clusters, truth, 17, 10))
    assert metrics.nmi_from_table(table) == pytest.approx(skm.normalized_mutual_info_score(truth, clusters))
    assert metrics.ari_from_table(table) == pytest.approx(skm.adjusted_rand_score(truth, clusters))
    np.testing.assert_array_equal(metrics.labels_from_table(table), metrics.centroid_labels(clusters, truth, 17))


# --- clustering_scores on real MNIST ------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_clustering(mnist, mnist_numpy):
    """A real clustering of the real digits: nearest of 30 random training images (one matrix product)."""
    X, y = mnist_numpy
    X_test = mnist.test_images.compute(scheduler="synchronous")
    y_test = np.asarray(mnist.test_labels)
    rng = np.random.default_rng(0)
    centers = X[rng.choice(len(X), 30, replace=False)].astype(np.float64)

    def nearest(A):
        A = A.astype(np.float64)
        return ((A * A).sum(1)[:, None] - 2 * A @ centers.T + (centers * centers).sum(1)).argmin(axis=1)

    return nearest(X), y, nearest(X_test), y_test


def test_scores_on_real_mnist_match_sklearn(mnist_clustering):
    clusters, y, test_clusters, y_test = mnist_clustering
    assert len(y) == 60_000 and len(y_test) == 10_000
    mapping = metrics.centroid_labels(clusters, y, 30)
    train = metrics.clustering_scores(clusters, y, mapping, n_classes=10)
    test = metrics.clustering_scores(test_clusters, y_test, mapping, n_classes=10)

    for scores, c, t in ((train, clusters, y), (test, test_clusters, y_test)):
        assert set(scores) == {"n", "accuracy", "purity", "nmi", "ari", "confusion_matrix", "unlabelled"}
        assert scores["n"] == len(t)
        predicted = mapping[c]
        assert scores["accuracy"] == pytest.approx(skm.accuracy_score(t, predicted), abs=1e-15)
        assert scores["nmi"] == pytest.approx(skm.normalized_mutual_info_score(t, c), abs=1e-12)
        assert scores["ari"] == pytest.approx(skm.adjusted_rand_score(t, c), abs=1e-12)
        dense = sk_contingency(t, c)
        assert scores["purity"] == pytest.approx(dense.max(axis=0).sum() / len(t), abs=1e-15)
        np.testing.assert_array_equal(scores["confusion_matrix"], skm.confusion_matrix(t, predicted, labels=range(10)))
        assert np.sum(scores["confusion_matrix"], axis=1).tolist() == np.bincount(t, minlength=10).tolist()
        assert scores["unlabelled"] == 0
        assert 0.3 < scores["accuracy"] < 0.95 and 0.2 < scores["nmi"] < 0.9 and 0.1 < scores["ari"] < 0.9

    # On the rows that chose the labels, majority-vote accuracy is the purity.
    assert train["accuracy"] == pytest.approx(train["purity"], abs=1e-15)
    # On test rows the vote comes from training rows, so it cannot beat the test set's own majority.
    assert test["accuracy"] <= test["purity"] + 1e-15


def test_majority_vote_on_real_mnist_matches_plain_python(mnist_clustering):
    clusters, y, _, _ = mnist_clustering
    votes = [Counter() for _ in range(30)]
    for c, t in zip(clusters.tolist(), y.tolist()):
        votes[c][t] += 1
    expected = [min(t for t, n in v.items() if n == max(v.values())) if v else -1 for v in votes]
    assert metrics.centroid_labels(clusters, y, 30).tolist() == expected


def test_unlabelled_predictions_are_counted_and_left_out_of_the_matrix():
    mapping = np.array([0, 1, -1])  # cluster 2 had no training rows
    truth = np.array([0, 1, 1, 0, 1])
    clusters = np.array([0, 1, 2, 2, 1])
    scores = metrics.clustering_scores(clusters, truth, mapping, n_classes=2)
    assert scores["unlabelled"] == 2
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["confusion_matrix"] == [[1, 0], [0, 2]]


def test_most_confused():
    assert metrics.most_confused([[5, 1, 0], [0, 4, 7], [2, 0, 9]]) == (1, 2, 7)
    assert metrics.most_confused([[5, 0], [0, 4]]) is None
    assert metrics.most_confused(np.zeros((0, 0), int)) is None


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: metrics.contingency_table([0, 1], [0], 2), ValueError, "2 cluster labels but 1 true labels"),
        (lambda: metrics.contingency_table([0, 2], [0, 1], 2), ValueError, r"\[0, 2\)"),
        (lambda: metrics.contingency_table([0, -1], [0, 1], 2), ValueError, r"\[0, 2\)"),
        (lambda: metrics.contingency_table([0, 1], [0, -3], 2), ValueError, "non-negative"),
        (lambda: metrics.contingency_table([0.5, 1], [0, 1], 2), TypeError, "cluster labels must be integers"),
        (lambda: metrics.contingency_table([0, 1], [0, 12], 2, n_classes=10), ValueError, "n_classes=10"),
        (lambda: metrics.contingency_table([[0, 1]], [[0, 1]], 2), ValueError, "1-D"),
        (lambda: metrics.purity([0, 1, 1], [0, 1]), ValueError, "3 true labels but 2 cluster labels"),
        (lambda: metrics.adjusted_rand_index([0], [0, 1]), ValueError, "1 true labels but 2"),
        (lambda: metrics.normalized_mutual_info([0, 1], [0, 1], average_method="mean"), ValueError, "arithmetic"),
        (lambda: metrics.nmi_from_table([1, 2, 3]), ValueError, "2-D"),
        (lambda: metrics.ari_from_table([[1, -2]]), ValueError, "non-negative integer counts"),
        (lambda: metrics.purity_from_table([[0.5, 1.0]]), ValueError, "integer counts"),
        (lambda: metrics.confusion_matrix([0, 1], [0], 2), ValueError, "2 true labels but 1 predictions"),
        (lambda: metrics.confusion_matrix([0, 2], [0, 1], 2), ValueError, "true labels must lie"),
        (lambda: metrics.confusion_matrix([0, 1], [0, -2], 2), ValueError, "or be -1"),
        (lambda: metrics.confusion_matrix([0, 1], [0.0, 1.5], 2), TypeError, "predicted labels must be integers"),
    ],
)
def test_bad_input_names_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()
