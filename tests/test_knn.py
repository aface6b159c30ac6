"""k-NN: clean clusters, and every fast backend equal to scikit-learn's KNeighborsClassifier on random data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from pipelines import knn
from pipelines.errors import UserError

BACKENDS = ["sklearn", "faiss", "torch"]
FAST = ["faiss", "torch"]
SETTINGS = [(m, w) for m in knn.METRICS for w in knn.WEIGHTS]


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, D] points around random picks of `centers`, and their int64 [n] classes."""
    labels = rng.integers(0, len(centers), n)
    return (centers[labels] + spread * rng.normal(size=(n, centers.shape[1]))).astype(np.float32), labels


def reference(train, labels, query, *, k, weights, metric):
    """scikit-learn's own answer: predict() and the stable top-5 of predict_proba(), on float64 copies."""
    clf = KNeighborsClassifier(n_neighbors=k, weights=weights, metric=metric)
    clf.fit(train.astype(np.float64), labels)
    q = query.astype(np.float64)
    top5 = clf.classes_[np.argsort(-clf.predict_proba(q), axis=1, kind="stable")[:, :5]]
    return clf.predict(q), top5, clf.kneighbors(q)[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("metric", "weights"), SETTINGS)
def test_separated_clusters_are_all_right(backend, metric, weights):
    rng = np.random.default_rng(1)
    centers = 10.0 * np.eye(6, 8) + 2.0  # distinct directions too, so cosine separates them as well
    train, y_train = clustered(rng, 120, centers, 0.3)
    query, y_query = clustered(rng, 300, centers, 0.3)
    result = knn.classify(train, y_train, query, n_classes=6, k=10, weights=weights, metric=metric,
                          backend=knn.make_backend(backend))
    assert (result.predictions == y_query).all()
    assert (result.top(5)[:, 0] == y_query).all()


@pytest.fixture(scope="module")
def random_data():
    """Overlapping clusters: votes are split, so weighting and the tie rules matter. 3,000 queries."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(40, 48))
    train, y_train = clustered(rng, 1500, centers, 2.0)
    query, _ = clustered(rng, 3000, centers, 2.0)
    return train, y_train, query


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("metric", "weights"), SETTINGS)
def test_predictions_equal_sklearn_on_random_data(random_data, backend, metric, weights):
    train, y_train, query = random_data
    expected, expected_top5, expected_neighbours = reference(train, y_train, query, k=10, weights=weights,
                                                             metric=metric)
    result = knn.classify(train, y_train, query, n_classes=40, k=10, weights=weights, metric=metric,
                          backend=knn.make_backend(backend))
    np.testing.assert_array_equal(result.predictions, expected)
    np.testing.assert_array_equal(result.top(5), expected_top5)
    np.testing.assert_array_equal(np.sort(result.neighbours.indices, axis=1), np.sort(expected_neighbours, axis=1))
    assert np.all(np.diff(result.neighbours.distances, axis=1) >= 0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("metric", knn.METRICS)
def test_near_duplicates_float32_cannot_order_are_rechecked(backend, metric):
    """60 train rows within 1e-7 of one another: float32 cannot rank them, so the float64 recheck must."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=16)
    dupes = base + 1e-7 * rng.normal(size=(60, 16))
    others = rng.normal(size=(200, 16))
    train = np.vstack([dupes, others])
    y_train = rng.integers(0, 5, len(train))
    query = base + 0.5 * rng.normal(size=(50, 16))
    expected, _, expected_neighbours = reference(train, y_train, query, k=10, weights="distance", metric=metric)
    result = knn.classify(train, y_train, query, n_classes=5, k=10, metric=metric, backend=knn.make_backend(backend))
    assert result.neighbours.rechecked > 0
    np.testing.assert_array_equal(result.neighbours.indices, expected_neighbours)
    np.testing.assert_array_equal(result.predictions, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_distance_neighbours_alone_vote(backend):
    """A query equal to two class-2 rows: those two vote (weight 1 each); the 1/d weights of the rest are ignored."""
    train = np.array([[0, 0, 4], [0, 0, 4], [1, 0, 4], [1, 1, 4], [0, 1, 4], [-1, 0, 4]], dtype=np.float32)
    y_train = np.array([2, 2, 0, 0, 1, 1])
    query = np.array([[0, 0, 4], [0.9, 0.2, 4]], dtype=np.float32)
    expected, _, _ = reference(train, y_train, query, k=6, weights="distance", metric="euclidean")
    result = knn.classify(train, y_train, query, n_classes=3, k=6, metric="euclidean",
                          backend=knn.make_backend(backend))
    np.testing.assert_array_equal(result.scores[0], [0.0, 0.0, 2.0])
    assert result.predictions[0] == 2 and result.predictions[1] == 0
    np.testing.assert_array_equal(result.predictions, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", knn.WEIGHTS)
def test_ties_go_to_the_lowest_class(backend, weights):
    """Two neighbours at the same distance, classes 3 and 1: the vote is even, class 1 wins (as in sklearn)."""
    train = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 9.0], [0.0, -9.0]], dtype=np.float32)
    y_train = np.array([3, 1, 0, 2])
    query = np.array([[0.0, 0.0]], dtype=np.float32)
    expected, _, _ = reference(train, y_train, query, k=2, weights=weights, metric="euclidean")
    result = knn.classify(train, y_train, query, n_classes=4, k=2, weights=weights, metric="euclidean",
                          backend=knn.make_backend(backend))
    assert result.predictions[0] == 1 == expected[0]
    np.testing.assert_array_equal(result.top(3)[0], [1, 3, 0])


def test_inputs_are_left_alone_and_settings_checked():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 4)).astype(np.float32)
    before = train.copy()
    knn.classify(train, np.arange(30) % 3, train[:5], n_classes=3, backend=knn.make_backend("torch"))
    np.testing.assert_array_equal(train, before)
    with pytest.raises(UserError, match="metric='manhattan'"):
        knn.classify(train, np.zeros(30, int), train, n_classes=1, metric="manhattan")
    with pytest.raises(UserError, match="weights='inverse'"):
        knn.classify(train, np.zeros(30, int), train, n_classes=1, weights="inverse")
    with pytest.raises(UserError, match="k=40 neighbours asked for, but only 30"):
        knn.classify(train, np.zeros(30, int), train, n_classes=1, k=40)
    with pytest.raises(UserError, match="4-d, queries 5-d"):
        knn.classify(train, np.zeros(30, int), np.zeros((2, 5)), n_classes=1)
    with pytest.raises(UserError, match="knn backend 'annoy'"):
        knn.make_backend("annoy")
