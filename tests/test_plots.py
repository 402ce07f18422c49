"""Figures of what the search found, from hand-made gradients (no training)."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import chain_specs

from experiments.plots import assignment_figure, similarity_figure
from search import SearchResult, search_clusters, searched_plan
from superweights import Budget, cluster_coefficients, initial_clusters, make_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The ends of the heatmap's RdBu_r colour map: cosine +1 and -1.
DARK_RED = np.array([0.404, 0.0, 0.122])
DARK_BLUE = np.array([0.020, 0.188, 0.380])


def search_plan(layers, bins):
    clusters = initial_clusters(layers, bins)
    coefficients = cluster_coefficients(clusters, layers)
    return make_plan(layers, [], clusters, coefficients, Budget(fraction=1.0), fill=False)


def two_members():
    """`big`: three 3x3 layers and a 1x1 one; `small`: two 3x3 layers and a 1x1 one.

    Two initial clusters with one bin: the 1x1 layers (one of `big`'s: a panel of a single
    layer), then the 3x3 layers.
    """
    big = chain_specs("big", [((3, 3), 8, 8), ((3, 3), 8, 8), ((3, 3), 8, 16), ((1, 1), 8, 16)])
    small = chain_specs("small", [((3, 3), 4, 4), ((3, 3), 4, 8), ((1, 1), 4, 8)])
    return big + small


def gradients(layers, seed=0):
    """big's l0 and l1 agree, l2 opposes them; every other layer takes a crop of one tensor."""
    rng = np.random.default_rng(seed)
    kernel = {(3, 3): rng.normal(size=(3, 3, 8, 16)), (1, 1): rng.normal(size=(1, 1, 8, 16))}
    grads = {}
    for layer in layers:
        *_, cin, cout = layer.shape
        sign = -1.0 if layer.id == "big:l2.kernel" else 1.0
        grads[layer.id] = sign * kernel[layer.spatial][..., :cin, :cout]
    return grads


@pytest.fixture(scope="module")
def found():
    layers = two_members()
    plan = search_plan(layers, bins=1)
    return plan, search_clusters(plan, gradients(layers))


def read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    return matplotlib.image.imread(path)


def has_colour(image: np.ndarray, colour: np.ndarray, tolerance=0.02, half=0) -> bool:
    """Whether the left half (`half=0`: the first panel) or the right one has `colour`.

    The right half is read without its last fifth, where the colour bar is.
    """
    width = image.shape[1] // 2
    part = image[:, half * width : half * width + (width if half == 0 else 4 * width // 5), :3]
    return bool((np.abs(part - colour).max(-1) < tolerance).any())


def test_the_hand_made_search_splits_the_opposed_layer(found):
    plan, result = found
    assert [c.name for c in plan.clusters] == ["c0", "c1"]
    assert [len(s.layers) for s in result.similarities] == [1, 3]
    assigned = result.cluster_of
    assert assigned["big:l0.kernel"] == assigned["big:l1.kernel"] != assigned["big:l2.kernel"]
    assert assigned["big:l3.kernel"] == assigned["small:l2.kernel"] == "c0"


def test_similarity_figure_writes_one_heatmap_per_initial_cluster(found, tmp_path):
    _, result = found
    target = tmp_path / "similarity.png"
    assert similarity_figure(result, str(target)) == target
    image = read_png(target)
    # Two panels side by side: 2 x 6.5 by 5.6 inches at 110 dpi.
    assert image.shape[:2] == (616, 1430)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20
    # The 1x1 panel is one layer (+1); the 3x3 panel has its diagonal (+1) and the opposed
    # pair (-1): the ends of the colour map.
    assert has_colour(image, DARK_RED) and not has_colour(image, DARK_BLUE)
    assert has_colour(image, DARK_RED, half=1)
    assert has_colour(image, DARK_BLUE, half=1)


def test_similarity_figure_of_a_json_round_trip_is_the_same_picture(found, tmp_path):
    _, result = found
    again = SearchResult.from_json(result.to_json())
    first = read_png(similarity_figure(result, tmp_path / "a.png"))
    second = read_png(similarity_figure(again, tmp_path / "b.png"))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "layers, bins, size",
    [
        # One member with a single layer: one 1x1 panel.
        (chain_specs("solo", [((3, 3), 8, 8)]), 1, (616, 715)),
        # Four single-layer panels: three columns, two rows, the sixth axis left blank.
        (chain_specs("net", [((3, 3), 8, 8)] * 4), 4, (1232, 2145)),
    ],
    ids=["one-layer", "four-panels"],
)
def test_similarity_figure_of_single_layer_panels(layers, bins, size, tmp_path):
    plan = search_plan(layers, bins)
    result = search_clusters(plan, gradients(layers))
    assert all(len(s.layers) == 1 for s in result.similarities)
    image = read_png(similarity_figure(result, tmp_path / "single.png"))
    assert image.shape[:2] == size
    assert has_colour(image, DARK_RED)  # each panel's one cell: cosine 1
    assert not has_colour(image, DARK_BLUE)


def test_assignment_figure_of_the_initial_and_the_searched_plan(found, tmp_path):
    plan, result = found
    final = searched_plan(plan, result)
    assert len(final.clusters) == 3
    images = []
    for name, figure_plan in (("initial.png", plan), ("searched.png", final)):
        target = tmp_path / name
        assert assignment_figure(figure_plan, target) == target
        images.append(read_png(target))
    assert len(np.unique(images[1].reshape(-1, images[1].shape[-1]), axis=0)) > 20
    # Same layout (members x depth), different colours: the cluster of big's l2 changed.
    assert images[0].shape == images[1].shape
    assert not np.array_equal(images[0], images[1])


def test_assignment_figure_of_one_member_with_one_layer(tmp_path):
    plan = search_plan(chain_specs("solo", [((3, 3), 8, 8)]), bins=1)
    image = read_png(assignment_figure(plan, tmp_path / "one.png"))
    assert image.shape[0] > 50 and image.shape[1] > 200
