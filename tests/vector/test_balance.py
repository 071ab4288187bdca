import numpy as np
import pytest

from data_pipeline.vector import BalanceConfig, ClippedWarning, VectorInputError, balanced_sampling, hierarchical_kmeans
from tests.vector.synthetic import clustered


@pytest.fixture(scope="module")
def hierarchy():
    # Unbalanced pool: cluster sizes drawn from a long-tailed distribution.
    x, _ = clustered(2400, 32, 30, spread=1.0)
    rng = np.random.default_rng(0)
    x = x[np.argsort(rng.pareto(1.0, len(x)))][:2000]
    cfg = BalanceConfig(n_clusters=[40, 6], resample_size=[5, 2], resampling_steps=2)
    return x, hierarchical_kmeans(x, cfg)


def reference_split(sizes, target):
    """Linear search for the cap (no bisection), remainder to the largest clusters above it."""
    sizes = np.asarray(sizes)
    if sizes.sum() <= target:
        return sizes.copy()
    cap = 0
    while np.minimum(sizes, cap + 1).sum() <= target:
        cap += 1
    quota = np.minimum(sizes, cap)
    for i in sorted(np.flatnonzero(sizes > cap), key=lambda i: (-sizes[i], i))[:target - quota.sum()]:
        quota[i] += 1
    return quota


def reference_leaf_quotas(x, hierarchy, target):
    leaf = np.argmax(-((x[:, None, :] - hierarchy.levels[0].centroids[None]) ** 2).sum(-1), axis=1)
    parent = np.argmin(((hierarchy.levels[0].centroids[:, None] - hierarchy.levels[1].centroids[None]) ** 2).sum(-1),
                       axis=1)
    leaf_sizes = np.bincount(leaf, minlength=len(parent))
    top_sizes = np.array([leaf_sizes[parent == p].sum() for p in range(len(hierarchy.levels[1].centroids))])
    quotas = np.zeros(len(parent), np.int64)
    for p, share in enumerate(reference_split(top_sizes, target)):
        kids = np.flatnonzero(parent == p)
        quotas[kids] = reference_split(leaf_sizes[kids], share)
    return leaf, quotas


@pytest.mark.parametrize("target", [300, 1000])
def test_balanced_sampling_matches_a_brute_force_reference(hierarchy, target):
    x, tree = hierarchy
    leaf, quotas = reference_leaf_quotas(x, tree, target)
    closest = balanced_sampling(tree, BalanceConfig(target_size=target, pick="closest"))
    assert closest.keep.sum() == target
    np.testing.assert_array_equal(closest.leaf_cluster, leaf)
    np.testing.assert_array_equal(np.bincount(leaf[closest.keep], minlength=len(quotas)), quotas)
    distance = ((x - tree.levels[0].centroids[leaf]) ** 2).sum(1)
    for c in np.flatnonzero(quotas):
        members = np.flatnonzero(leaf == c)
        expected = members[np.argsort(distance[members], kind="stable")][:quotas[c]]
        assert set(np.flatnonzero(closest.keep & (leaf == c))) == set(expected)
    randomly = balanced_sampling(tree, BalanceConfig(target_size=target, pick="random", seed=1))
    np.testing.assert_array_equal(np.bincount(leaf[randomly.keep], minlength=len(quotas)), quotas)


def test_balanced_sampling_flattens_the_cluster_size_distribution(hierarchy):
    x, tree = hierarchy
    result = balanced_sampling(tree, BalanceConfig(target_size=400))
    sizes = np.bincount(result.top_cluster, minlength=6)
    taken = np.bincount(result.top_cluster[result.keep], minlength=6)
    assert taken.max() - taken[sizes >= taken.max()].min() <= 1 and taken.std() < sizes.std() * 400 / 2000


def test_every_level_assigns_to_its_nearest_centroid(hierarchy):
    x, tree = hierarchy
    assert [level.n_clusters for level in tree.levels] == [40, 6]
    upper = tree.levels[1]
    nearest = np.argmin(((tree.levels[0].centroids[:, None] - upper.centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(upper.assignment, nearest)


def test_a_target_above_the_pool_selects_everything_with_a_warning(hierarchy):
    _, tree = hierarchy
    with pytest.warns(ClippedWarning, match="target_size=5000 is larger than the pool"):
        assert balanced_sampling(tree, BalanceConfig(target_size=5000)).keep.all()
    with pytest.raises(VectorInputError, match="target_size: must be a positive integer"):
        balanced_sampling(tree, BalanceConfig(target_size=0))


def test_a_level_count_mismatch_is_rejected_naming_the_argument():
    with pytest.raises(VectorInputError, match="resample_size: needs one value per level"):
        hierarchical_kmeans(np.eye(4, dtype=np.float32), BalanceConfig(n_clusters=[2], resample_size=[2, 2]))
