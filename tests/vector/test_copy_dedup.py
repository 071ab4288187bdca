import numpy as np
import pytest

from data_pipeline.vector import ClippedWarning, CopyDedupConfig, GraphConfig, IndexConfig, VectorInputError, copy_dedup
from tests.vector.synthetic import (brute_force_components, clustered, same_partition, together_pairs,
                                    with_copies)


@pytest.fixture(scope="module")
def pool():
    """2,000 clustered 64-d embeddings plus 300 planted groups of 2–5 near copies."""
    base, _ = clustered(2000, 64, 40)
    return with_copies(base, 300)


@pytest.fixture(scope="module")
def flat(pool):
    return copy_dedup(pool[0])


def test_planted_copy_groups_are_recovered_with_full_pair_recall_against_brute_force(pool, flat):
    x, groups = pool
    exact = brute_force_components(x, 64, 0.6)
    exact_pairs = together_pairs(exact)
    found_pairs = together_pairs(flat.component)
    assert len(exact_pairs & found_pairs) / len(exact_pairs) >= 0.99
    assert same_partition(flat.component, exact)  # Flat is exact: the same components
    for group in groups:
        assert len(set(flat.component[group])) == 1


def test_one_sample_per_component_is_kept_and_the_rest_name_their_representative(flat):
    kept = np.flatnonzero(flat.keep)
    assert len(kept) == len(np.unique(flat.component))
    assert sorted(flat.component[kept]) == sorted(np.unique(flat.component))
    removed = ~flat.keep
    assert (flat.reason[removed] == "copy_duplicate").all() and all(r is None for r in flat.reason[~removed])
    assert (flat.keep[flat.representative]).all()
    assert (flat.representative[removed] < np.flatnonzero(removed)).all()  # no quality: smallest row kept
    assert (flat.similarity_to_representative[removed] > 0.6).mean() > 0.95


def test_ivf_index_search_gives_the_flat_result_on_a_small_case(pool, flat):
    ivf = copy_dedup(pool[0], graph=GraphConfig(method="index", index=IndexConfig(kind="ivf_flat", nlist=16, nprobe=4)))
    assert ivf.graph.nlist == 16
    assert same_partition(ivf.component, flat.component)
    np.testing.assert_array_equal(ivf.keep, flat.keep)


def test_cell_join_gives_the_flat_result_on_a_small_case(pool, flat):
    joined = copy_dedup(pool[0], graph=GraphConfig(method="cell_join", join_nlist=16))
    assert joined.graph.method == "cell_join"
    assert same_partition(joined.component, flat.component)
    np.testing.assert_array_equal(joined.keep, flat.keep)


def test_the_neighbour_count_k_bounds_the_graph_like_the_brute_force_reference():
    base, _ = clustered(300, 32, 5)
    x, _ = with_copies(base, 10, max_copies=8, noise=0.05)
    for k in (1, 3):
        for method in ("index", "cell_join"):
            result = copy_dedup(x, CopyDedupConfig(k=k), graph=GraphConfig(method=method, join_nlist=4))
            assert same_partition(result.component, brute_force_components(x, k, 0.6)), (k, method)


def test_the_highest_quality_copy_is_kept_and_ties_go_to_the_smallest_row():
    base, _ = clustered(200, 64, 4)
    x, groups = with_copies(base, 5, max_copies=3, noise=0.05)
    quality = np.zeros(len(x))
    best = [group[-1] for group in groups]
    quality[best] = 1.0
    result = copy_dedup(x, quality=quality)
    for group, winner in zip(groups, best):
        assert result.keep[group].sum() == 1 and result.keep[winner]
    tied = copy_dedup(x, quality=np.ones(len(x)))
    smallest_row = {c: np.flatnonzero(tied.component == c).min() for c in np.unique(tied.component)}
    assert tied.representative.tolist() == [smallest_row[c] for c in tied.component]


def test_results_convert_to_one_row_per_sample_with_uids(flat, pool):
    uids = np.array([f"u{i}" for i in range(len(pool[0]))])
    frame = flat.to_frame(uids)
    assert len(frame) == len(uids) and list(frame.columns[:4]) == ["row", "uid", "keep", "reason"]
    assert "graph" not in frame.columns and frame["component_size"].max() >= 2


def test_an_empty_pool_is_rejected_naming_the_argument():
    with pytest.raises(VectorInputError, match="embeddings: is empty"):
        copy_dedup(np.zeros((0, 16), np.float32))


def test_a_single_sample_is_kept_and_k_above_the_pool_is_clipped_with_a_warning():
    assert copy_dedup(np.ones((1, 4), np.float32)).keep.tolist() == [True]
    x = np.eye(5, dtype=np.float32)
    x[4] = x[3] + 0.01
    with pytest.warns(ClippedWarning, match=r"k=64 is larger than the number of other samples in the pool \(4\)"):
        result = copy_dedup(x)
    assert result.keep.tolist() == [True, True, True, True, False]


def test_bad_quality_scores_are_rejected_naming_the_argument():
    with pytest.raises(VectorInputError, match=r"quality: expected one value per sample, shape \(3,\)"):
        copy_dedup(np.eye(3, dtype=np.float32), quality=np.ones(2))
