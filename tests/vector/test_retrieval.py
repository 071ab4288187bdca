import numpy as np
import pytest

from data_pipeline.vector import (ClippedWarning, NoNeighboursWarning, RetrievalConfig, VectorInputError,
                                  retrieve_by_cluster, retrieve_by_sample)
from data_pipeline.vector.retrieval import cluster_quotas
from tests.vector.synthetic import clustered, normalized


@pytest.fixture(scope="module")
def pool_and_seeds():
    pool, labels = clustered(3000, 32, 20, spread=1.0)
    rng = np.random.default_rng(4)
    seeds = pool[rng.choice(np.flatnonzero(labels < 3), 40, replace=False)]
    seeds = normalized(seeds + 0.3 * rng.standard_normal(seeds.shape) / np.sqrt(32))
    return pool, seeds


def test_sample_based_retrieval_equals_brute_force_top_k_with_collisions_counted(pool_and_seeds):
    pool, seeds = pool_and_seeds
    result = retrieve_by_sample(pool, seeds, RetrievalConfig(k=8))
    sims = seeds @ pool.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :8]
    hits = np.bincount(top.ravel(), minlength=len(pool))
    np.testing.assert_array_equal(result.seed_hits, hits)
    np.testing.assert_array_equal(result.keep, hits > 0)
    assert result.collisions == 40 * 8 - (hits > 0).sum() > 0
    for row in np.flatnonzero(hits):
        hitting = np.flatnonzero((top == row).any(axis=1))
        assert result.best_seed[row] == hitting[np.argmax(sims[hitting, row])]
    assert (result.per_seed == 8).all()


def test_a_seed_set_with_no_neighbours_above_the_floor_warns_and_retrieves_nothing():
    pool = np.eye(4, 8, dtype=np.float32)         # pool lives in the first 4 dimensions
    seeds = np.eye(8, dtype=np.float32)[6:]       # seeds are orthogonal to all of it
    with pytest.warns(NoNeighboursWarning, match="seeds: 2 of 2 seed images retrieved nothing"):
        result = retrieve_by_sample(pool, seeds, RetrievalConfig(k=2, min_similarity=0.5))
    assert not result.keep.any() and (result.best_seed == -1).all()


def test_k_larger_than_the_pool_is_clipped_with_a_warning():
    pool, _ = clustered(5, 8, 1)
    with pytest.warns(ClippedWarning, match="k=8 is larger than the number of indexed vectors"):
        result = retrieve_by_sample(pool, pool[:2], RetrievalConfig(k=8))
    assert result.keep.all()


def test_an_empty_pool_or_seed_set_is_rejected_naming_the_argument():
    with pytest.raises(VectorInputError, match="pool: is empty"):
        retrieve_by_sample(np.zeros((0, 8), np.float32), np.ones((2, 8), np.float32))
    with pytest.raises(VectorInputError, match="seeds: is empty"):
        retrieve_by_cluster(np.ones((4, 8), np.float32), np.zeros((0, 8), np.float32))


def reference_cluster_retrieval(pool, seeds, centroids, min_seeds, per_cluster, max_total):
    """Brute force: nearest centroids, eligible clusters served by seed count, closest members first."""
    cluster = np.argmax(pool @ centroids.T, axis=1)
    seed_cluster = np.argmax(seeds @ centroids.T, axis=1)
    counts = {c: int((seed_cluster == c).sum()) for c in range(len(centroids))}
    selected, budget = set(), max_total
    for c in sorted(counts, key=lambda c: (-counts[c], c)):
        if counts[c] <= min_seeds:
            continue
        members = np.flatnonzero(cluster == c)
        distance = np.sum((pool[members] - centroids[c]) ** 2, axis=1)
        take = min(per_cluster, len(members), budget)
        selected.update(members[np.lexsort((members, distance))][:take].tolist())
        budget -= take
    return selected


@pytest.mark.parametrize("max_total", [10_000, 150])
def test_cluster_based_retrieval_equals_a_brute_force_reference(pool_and_seeds, max_total):
    pool, seeds = pool_and_seeds
    cfg = RetrievalConfig(n_clusters=20, min_seeds=3, per_cluster=100, max_total=max_total, pick="closest")
    result = retrieve_by_cluster(pool, seeds, cfg)
    expected = reference_cluster_retrieval(pool, seeds, result.centroids, 3, 100, max_total)
    assert set(np.flatnonzero(result.keep).tolist()) == expected
    assert result.keep.sum() == min(max_total, result.contributed.sum()) and result.keep.sum() > 0
    assert ((result.cluster_seeds > 3) | ~result.keep).all()


def test_random_picks_give_the_same_per_cluster_counts_and_are_seeded(pool_and_seeds):
    pool, seeds = pool_and_seeds
    cfg = RetrievalConfig(n_clusters=20, per_cluster=50, pick="random", seed=7)
    first, again = retrieve_by_cluster(pool, seeds, cfg), retrieve_by_cluster(pool, seeds, cfg)
    np.testing.assert_array_equal(first.keep, again.keep)
    sizes = np.bincount(first.cluster, minlength=20)
    expected = cluster_quotas(first.seeds_per_cluster, sizes, 3, 50, 10**6)
    np.testing.assert_array_equal(np.bincount(first.cluster[first.keep], minlength=20), expected)


def test_a_seed_set_in_no_qualifying_cluster_warns_and_retrieves_nothing(pool_and_seeds):
    pool, seeds = pool_and_seeds
    with pytest.warns(NoNeighboursWarning, match="seeds: no cluster holds more than min_seeds=3"):
        result = retrieve_by_cluster(pool, seeds[:3], RetrievalConfig(n_clusters=20))
    assert not result.keep.any()
