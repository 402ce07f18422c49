import jax.numpy as jnp
import numpy as np
import pytest
from conftest import chain_specs

from search.similarity import common_crop, cosine_similarity, layer_gradients, similarity_matrix
from superweights import Budget, cluster_coefficients, initial_clusters, make_plan


def test_common_crop_takes_the_shared_top_left_block():
    a = np.arange(3 * 3 * 4 * 6).reshape(3, 3, 4, 6)
    b = np.ones((3, 3, 5, 2))
    crop_a, crop_b = common_crop(a, b)
    assert crop_a.shape == crop_b.shape == (3, 3, 4, 2)
    np.testing.assert_array_equal(crop_a, a[..., :4, :2])
    assert common_crop(np.ones((4, 6)), np.ones((2, 8)))[0].shape == (2, 6)


def test_common_crop_rejects_different_kernel_sizes():
    with pytest.raises(ValueError, match="spatial"):
        common_crop(np.ones((3, 3, 2, 2)), np.ones((1, 1, 2, 2)))


def test_cosine_compares_only_the_common_crop():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(3, 3, 2, 4))
    large = rng.normal(size=(3, 3, 5, 6))
    large[..., :2, :4] = 2.5 * small
    assert cosine_similarity(small, large) == pytest.approx(1.0)
    assert cosine_similarity(large, -small) == pytest.approx(-1.0)
    assert cosine_similarity(jnp.asarray(small), jnp.asarray(large)) == pytest.approx(1.0)


def test_cosine_of_zeros_is_zero():
    assert cosine_similarity(np.zeros((2, 2)), np.ones((2, 2))) == 0.0
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 0.0


def test_cosine_of_vectors_needs_equal_shapes():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(
        np.sqrt(0.5)
    )
    with pytest.raises(ValueError, match="shapes"):
        cosine_similarity(np.ones(2), np.ones(3))


def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(3, 3, i, o)) for i, o in [(2, 4), (4, 4), (4, 8), (8, 8)]]
    grads.append(np.zeros((3, 3, 2, 2)))
    matrix = similarity_matrix(grads)
    assert matrix.shape == (5, 5)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    assert np.all(np.abs(matrix) <= 1.0)
    assert matrix[1, 2] == pytest.approx(cosine_similarity(grads[2], grads[1]))
    assert similarity_matrix([]).shape == (0, 0)


def test_layer_gradients_picks_shared_kernels_by_id():
    layers = chain_specs("net", [((3, 3), 3, 4), ((3, 3), 4, 4)])
    clusters = initial_clusters(layers, 1)
    plan = make_plan(
        layers, [], clusters, cluster_coefficients(clusters, layers), Budget(fraction=1.0)
    )
    grads = {
        "net": {"l0": {"kernel": np.ones((3, 3, 3, 4))}, "l1": {"kernel": np.zeros((3, 3, 4, 4))}}
    }
    result = layer_gradients(plan, grads)
    assert list(result) == ["net:l0.kernel", "net:l1.kernel"]
    assert result["net:l0.kernel"].shape == (3, 3, 3, 4)
    grads["net"]["l1"]["kernel"] = np.zeros((3, 3, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        layer_gradients(plan, grads)
