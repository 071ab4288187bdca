import numpy as np
import pytest

from data_pipeline.vector import DecontaminateConfig, VectorInputError, decontaminate
from tests.vector.synthetic import clustered, normalized


def test_every_planted_copy_of_an_eval_image_is_removed_and_names_its_source():
    pool, _ = clustered(2000, 64, 30, seed=0)
    evals, _ = clustered(60, 64, 30, seed=5)
    rng = np.random.default_rng(2)
    sources = np.repeat(np.arange(20), 3)  # three copies of each of 20 eval images
    copies = normalized(evals[sources] + 0.5 * rng.standard_normal((len(sources), 64)) / 8)
    x = np.concatenate([pool, copies])
    result = decontaminate(x, evals)
    planted = np.arange(len(pool), len(x))
    assert not result.keep[planted].any()
    np.testing.assert_array_equal(result.nearest_eval[planted], sources)
    assert (result.reason[planted] == "eval_contamination").all()
    exact = x @ evals.T  # brute force: drop exactly the rows whose best cosine is ≥ 0.45
    np.testing.assert_array_equal(result.keep, exact.max(axis=1) < 0.45)
    np.testing.assert_allclose(result.similarity, exact.max(axis=1), atol=1e-5)


def test_the_threshold_is_inclusive():
    evals = np.array([[1.0, 0.0]], np.float32)
    pool = np.array([[0.45, np.sqrt(1 - 0.45 ** 2)], [0.44, np.sqrt(1 - 0.44 ** 2)]], np.float32)
    result = decontaminate(pool, evals, DecontaminateConfig(threshold=0.449999))
    assert result.keep.tolist() == [False, True]


def test_an_empty_eval_set_and_a_dimension_mismatch_are_rejected_naming_the_argument():
    pool, _ = clustered(10, 8, 2)
    with pytest.raises(VectorInputError, match="eval_embeddings: is empty"):
        decontaminate(pool, np.zeros((0, 8), np.float32))
    with pytest.raises(VectorInputError, match="eval_embeddings: has dimension 4 but pool has 8"):
        decontaminate(pool, np.ones((3, 4), np.float32))
    with pytest.raises(VectorInputError, match="pool: is empty"):
        decontaminate(np.zeros((0, 8), np.float32), pool)
