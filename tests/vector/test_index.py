import numpy as np
import pytest

from data_pipeline.vector import ClippedWarning, IndexConfig, VectorInputError, build_index
from data_pipeline.vector.index import default_nlist, default_nprobe
from tests.vector.synthetic import clustered


def test_nlist_and_nprobe_follow_the_stated_rule():
    assert default_nlist(1_000_000) == 4096 and default_nprobe(4096) == 128
    assert default_nlist(100_000) == 1024 and default_nprobe(1024) == 32
    assert default_nlist(200) == 5  # at least 39 training points per list
    assert default_nprobe(5) == 5


def test_auto_uses_flat_for_small_pools_and_ivf_above_flat_max():
    x, _ = clustered(2000, 32, 20)
    assert build_index(x).kind == "flat"
    ivf = build_index(x, IndexConfig(flat_max=1000))
    assert (ivf.kind, ivf.nlist, ivf.nprobe) == ("ivf_flat", 51, 8)


def test_ivf_probing_every_list_returns_the_flat_neighbours():
    x, _ = clustered(2000, 32, 20)
    flat_sims, flat_ids = build_index(x).search(x[:100], 10)
    ivf_sims, ivf_ids = build_index(x, IndexConfig(kind="ivf_flat", nlist=16, nprobe=16)).search(x[:100], 10)
    np.testing.assert_array_equal(ivf_ids, flat_ids)
    np.testing.assert_allclose(ivf_sims, flat_sims, atol=1e-5)


def test_flat_search_returns_cosine_of_unnormalized_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32) * 7
    sims, ids = build_index(x).search(x[:3] / np.linalg.norm(x[:3], axis=1, keepdims=True), 50)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, np.take_along_axis(unit[:3] @ unit.T, ids, axis=1), atol=1e-5)
    assert (ids[:, 0] == np.arange(3)).all()


def test_ivf_pq_index_builds_and_finds_near_copies():
    x, _ = clustered(4000, 32, 20)
    index = build_index(x, IndexConfig(kind="ivf_pq", nlist=16, nprobe=16, pq_m=8, pq_bits=4))
    assert index.kind == "ivf_pq"
    _, ids = index.search(x[:50], 5)
    assert (ids == np.arange(50)[:, None]).any(axis=1).mean() >= 0.9


def test_k_larger_than_the_pool_is_clipped_with_a_warning_naming_k():
    x, _ = clustered(30, 8, 3)
    with pytest.warns(ClippedWarning, match=r"k=100 is larger than the number of indexed vectors \(30\)"):
        sims, ids = build_index(x).search(x[:2], 100)
    assert ids.shape == (2, 30)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 8), np.float32), "vectors: is empty"),
    (np.zeros(8, np.float32), "vectors: expected a 2-D"),
    (np.array([[1.0, np.nan]], np.float32), "vectors: row 0 has NaN"),
    (np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), "vectors: row 1 is all zeros"),
])
def test_unusable_vectors_are_rejected_naming_the_argument(bad, message):
    with pytest.raises(VectorInputError, match=message) as error:
        build_index(bad)
    assert isinstance(error.value, ValueError) and error.value.argument == "vectors"


def test_ivf_pq_rejects_a_sub_quantizer_count_that_does_not_divide_the_dimension():
    x, _ = clustered(2000, 30, 5)
    with pytest.raises(VectorInputError, match="index.pq_m: 16 does not divide the dimension 30"):
        build_index(x, IndexConfig(kind="ivf_pq", nlist=8))
