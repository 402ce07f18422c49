import dataclasses

import pytest

from experiments import presets
from experiments.config import RunConfig, arch_list
from experiments.data import DATA_SHAPES, DATASET_NAMES
from superweights import Budget

PAPER = [name for name in presets.names() if name.startswith("cifar")]
IMAGENET = [name for name in presets.names() if name.startswith("imagenet")]


def test_names_are_sorted_unique_and_cover_both_kinds():
    names = presets.names()
    assert names == sorted(set(names)) and len(names) == len(presets.PRESETS)
    for percent in (15, 25, 50):
        assert f"cifar100-wrn-28-10-b{percent}" in names
        assert f"cifar10-wrn-28-10-b{percent}" in names
    assert {"cifar100-ensemble-18m", "cifar100-multiwidth-18m"} <= set(names)
    assert {"digits-wrn-28-1-b25", "digits-ensemble"} <= set(names)
    assert any(name.startswith("fashion_mnist-") for name in names)
    assert [f"imagenet-resnet-50-b{p}" for p in (15, 25, 50)] == IMAGENET


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_a_valid_run_config(name):
    config = presets.get(name)
    assert isinstance(config, RunConfig)
    assert config.dataset in DATASET_NAMES
    assert config.dataset in DATA_SHAPES or config.dataset == "image_folder"
    assert arch_list(config.arch)
    Budget.parse(config.budget, config.scope)
    assert config.data_dir is None  # given by the user (digits needs none)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = "1%"


def test_unknown_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown preset 'cifar1000'") as info:
        presets.get("cifar1000")
    for name in presets.names():
        assert name in str(info.value)


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_use_the_paper_recipe(name):
    config = presets.get(name)
    assert config.dataset in ("cifar10", "cifar100")
    assert (config.loop.epochs, config.loop.batch_size) == (200, 128)
    optim = config.optim
    assert (optim.learning_rate, optim.momentum, optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert optim.milestones == (0.3, 0.6, 0.8) and optim.decay == 0.2
    assert [round(m * 200) for m in optim.milestones] == [60, 120, 160]
    assert config.search.search and config.search.search_epochs == 20
    assert config.search.unshare_epoch == 10
    assert config.augmentation == "auto" and not config.dense
    assert config.train_size is None and config.test_size is None


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_presets_are_resnet_50_on_the_standard_recipe(name):
    config = presets.get(name)
    assert (config.arch, config.dataset, config.image_size) == (
        "resnet-50-imagenet",
        "image_folder",
        224,
    )
    assert config.augmentation == "auto"  # an image folder's: random resized crop and flip
    assert (config.loop.epochs, config.loop.batch_size) == (90, 256)
    optim = config.optim
    assert (optim.learning_rate, optim.momentum, optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert [round(m * 90) for m in optim.milestones] == [30, 60, 80] and optim.decay == 0.1
    assert (config.search.search_epochs, config.search.unshare_epoch) == (9, 5)
    assert config.budget == name.rsplit("-b", 1)[1] + "%" and not config.fill


def test_imagenet_presets_plan_resnet_50_with_a_thousand_classes():
    # ResNet-50's convolution kernels, by hand: stem 7*7*3*64 = 9,408; per bottleneck
    # 1x1 (c_in -> w), 3x3 (w -> w), 1x1 (w -> 4w), and a 1x1 projection on each stage's
    # first block; stages (w, blocks) = (64, 3), (128, 4), (256, 6), (512, 3).
    shared, c_in = 7 * 7 * 3 * 64, 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shared += c_in * width + 9 * width * width + width * 4 * width
            if block == 0:
                shared += c_in * 4 * width
            c_in = 4 * width
    assert shared == 23_454_912
    minimum, full = presets.minimum_budget(presets.get("imagenet-resnet-50-b25"))
    assert full == shared
    params, _ = presets.budget_params(presets.get("imagenet-resnet-50-b25"))
    assert params == int(0.25 * shared)


def test_every_preset_is_what_npas_train_preset_gives():
    from experiments.cli import config_from_args, parse_args

    for name in presets.names():
        assert config_from_args(parse_args(["train", "--preset", name])) == presets.get(name)
    args = ["train", "--preset", "imagenet-resnet-50-b25", "--data-dir", "/data", "--epochs", "3"]
    config = config_from_args(parse_args([*args, "--search-epochs", "1"]))
    expected = presets.with_overrides(
        presets.get("imagenet-resnet-50-b25"),
        data_dir="/data",
        loop={"epochs": 3},
        search={"search_epochs": 1},
    )
    assert config == expected


def test_paper_ensembles_are_the_authors_banks_budget():
    ensemble = presets.get("cifar100-ensemble-18m")
    assert arch_list(ensemble.arch) == ["wrn-28-7", "wrn-28-4", "wrn-16-7", "wrn-16-4"]
    multi_width = presets.get("cifar100-multiwidth-18m")
    assert arch_list(multi_width.arch) == ["wrn-28-7", "wrn-28-4", "wrn-28-3"]
    for config in (ensemble, multi_width):
        # the authors' 18M counts the shared banks, and their allocation does not fill
        assert (config.scope, config.budget, config.fill, config.bins) == (
            "banks",
            "18M",
            False,
            4,
        )


@pytest.mark.parametrize("name", presets.names())
def test_budgets_are_feasible(name):
    """Planned on abstract shapes with the data set's image shape: no weights, no data."""
    params, minimum = presets.budget_params(presets.get(name))
    assert params >= minimum


def test_wrn_28_10_minimum_is_below_the_paper_budgets():
    # One full-size template per cluster and level is 23.9% of WRN-28-10's shared kernels
    # with the authors' 5 initial clusters; sub-layer templates go below 0.1%.
    minimum, full = presets.minimum_budget(presets.get("cifar100-wrn-28-10-b15"))
    assert minimum / full < 0.001
    for percent in presets.PAPER_BUDGETS:
        params, _ = presets.budget_params(presets.get(f"cifar100-wrn-28-10-b{percent}"))
        assert params >= minimum


def test_minimum_budget_rises_above_an_infeasible_budget():
    config = presets.with_overrides(presets.get("digits-wrn-28-1-b15"), budget="0.5%")
    params, minimum = presets.budget_params(config)
    assert params < minimum


def test_with_overrides_replaces_fields_and_merges_nested_configs():
    base = presets.get("cifar100-wrn-28-10-b25")
    config = presets.with_overrides(base, data_dir="/data", loop={"epochs": 3})
    assert config.data_dir == "/data" and config.loop.epochs == 3
    assert config.loop.batch_size == base.loop.batch_size  # the rest of the loop is kept
    assert base.data_dir is None and base.loop.epochs == 200  # the preset is untouched
    same = presets.with_overrides(base, optim=base.optim)
    assert same == base


def test_with_overrides_rejects_unknown_fields():
    with pytest.raises(ValueError, match="epochs"):
        presets.with_overrides(presets.get("digits-ensemble"), epochs=3)
    with pytest.raises(ValueError, match="lr"):
        presets.with_overrides(presets.get("digits-ensemble"), optim={"lr": 0.1})


def test_low_budget_presets_plan_sub_layer_templates():
    for percent in presets.LOW_BUDGETS:
        config = presets.get(f"cifar100-wrn-28-10-b{percent}")
        assert (config.budget, config.loop) == (f"{percent}%", presets.PAPER_LOOP)
        params, minimum = presets.budget_params(config)
        assert minimum <= params < 0.138 * presets.minimum_budget(config)[1]
