import numpy as np
import pytest

from data_pipeline.vector import SemDedupConfig, VectorInputError, semdedup
from tests.vector.synthetic import clustered, with_copies


def reference(x, cluster, centroids, limit, keep_rule, compare_with, scores=None):
    """Brute force: full similarity matrix per cluster, members walked in keep order one by one."""
    keep = np.ones(len(x), bool)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        to_centroid = x[members] @ centroids[c]
        priority = {"hardest": to_centroid, "easiest": -to_centroid,
                    "clip_score": None if scores is None else -scores[members]}[keep_rule]
        members = members[np.lexsort((members, priority))]
        sims = x[members] @ x[members].T
        for j in range(1, len(members)):
            earlier = np.arange(j) if compare_with == "all" else [i for i in range(j) if keep[members[i]]]
            if len(earlier) and sims[j, earlier].max() > limit:
                keep[members[j]] = False
    return keep


@pytest.fixture(scope="module")
def pool():
    base, _ = clustered(1500, 32, 12)
    return with_copies(base, 150, noise=0.2)[0]


@pytest.mark.parametrize("keep_rule", ["hardest", "easiest", "clip_score"])
@pytest.mark.parametrize("compare_with", ["all", "kept"])
def test_semdedup_keeps_the_same_set_as_a_brute_force_reference(pool, keep_rule, compare_with):
    scores = np.random.default_rng(3).random(len(pool))
    cfg = SemDedupConfig(n_clusters=12, epsilon=0.05, keep=keep_rule, compare_with=compare_with)
    result = semdedup(pool, cfg, clip_score=scores if keep_rule == "clip_score" else None)  # only for "clip_score"
    assert (result.cluster == np.argmax(pool @ result.centroids.T, axis=1)).all()
    expected = reference(pool, result.cluster, result.centroids, 0.95, keep_rule, compare_with, scores)
    assert 50 < (~expected).sum() < 400
    np.testing.assert_array_equal(result.keep, expected)
    removed = ~result.keep
    assert (result.max_similarity[removed] > 0.95).all()
    assert (result.cluster[result.most_similar[removed]] == result.cluster[removed]).all()


def test_the_greedy_rule_keeps_the_far_end_of_a_chain():
    # a≈b and b≈c above the limit, a and c below: "all" removes b and c, "kept" removes only b.
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.25), np.sin(0.25), 0.0])
    c = np.array([np.cos(0.5), np.sin(0.5), 0.0])
    x = np.stack([a, b, c]).astype(np.float32)
    cfg = SemDedupConfig(n_clusters=1, epsilon=1 - np.cos(0.3), keep="clip_score")
    scores = np.array([3.0, 2.0, 1.0])
    assert semdedup(x, cfg, scores).keep.tolist() == [True, False, False]
    greedy = SemDedupConfig(n_clusters=1, epsilon=1 - np.cos(0.3), keep="clip_score", compare_with="kept")
    assert semdedup(x, greedy, scores).keep.tolist() == [True, False, True]


def test_keep_by_clip_score_without_clip_scores_is_rejected_naming_the_argument(pool):
    with pytest.raises(VectorInputError, match="clip_score: keep='clip_score' needs one CLIP score per sample"):
        semdedup(pool, SemDedupConfig(keep="clip_score"))
