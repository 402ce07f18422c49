"""Named run configurations: the paper's CIFAR settings, ImageNet's, and small CPU ones.

    from experiments import presets
    from experiments.run import run_training

    config = presets.with_overrides(presets.get("cifar100-wrn-28-10-b25"), data_dir="~/data")
    run_training(config)

or `npas train --preset cifar100-wrn-28-10-b25 --data-dir ~/data`. Paper presets (method.md
section 9) and ImageNet's need `data_dir`; the small ones (digits, embedded, and
Fashion-MNIST subsets) run in minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.config import initial_plan
from experiments.settings import LoopConfig, OptimConfig, RunConfig, SearchConfig
from superweights import Budget

PAPER_LOOP = LoopConfig(epochs=200, batch_size=128)
PAPER_OPTIM = OptimConfig(
    learning_rate=0.1, momentum=0.9, weight_decay=5e-4, milestones=(0.3, 0.6, 0.8), decay=0.2
)
PAPER_SEARCH = SearchConfig(search_epochs=20, unshare_epoch=10)
PAPER_BUDGETS = (15, 25, 50)
"""Percent of WRN-28-10's shared kernels (banks scope). With the authors' 5 initial clusters
(4 bins) the full-size floor is 23.9%: 25% and 50% have the paper's geometry, 15% uses
sub-layer templates."""
LOW_BUDGETS = (1, 2, 5, 10)
"""Percent of WRN-28-10's shared kernels in the regime of Shapeshifter Networks (down to 1%),
below the full-size floor: sub-layer templates."""

IMAGENET_LOOP = LoopConfig(epochs=90, batch_size=256, eval_batch_size=256)
IMAGENET_OPTIM = OptimConfig(
    learning_rate=0.1, momentum=0.9, weight_decay=1e-4, milestones=(1 / 3, 2 / 3, 8 / 9), decay=0.1
)
"""The standard ResNet-50 ImageNet recipe: 90 epochs, batch 256, the rate divided by 10 at
epochs 30, 60 and 80."""
IMAGENET_SEARCH = SearchConfig(search_epochs=9, unshare_epoch=5)
"""The CIFAR recipe's proportions (search 10%, unshare at 5% of the epochs)."""
IMAGENET_CLASSES = 1000

ENSEMBLE = "wrn-28-7,wrn-28-4,wrn-16-7,wrn-16-4"
MULTI_WIDTH = "wrn-28-7,wrn-28-4,wrn-28-3"
DIGITS_ENSEMBLE = "wrn-28-1,wrn-22-1,wrn-16-1,wrn-10-1"
DIGITS_MULTI_WIDTH = "wrn-16-3,wrn-16-2,wrn-16-1"

SMALL_LOOP = LoopConfig(epochs=15, batch_size=128)
SMALL_SEARCH = SearchConfig(search_epochs=3, unshare_epoch=1)
FASHION_SIZES = {"train_size": 6000, "test_size": 2000}


def paper(dataset: str, arch: str, budget: str, scope: str = "banks") -> RunConfig:
    """The paper's CIFAR recipe: 200 epochs, search 20, unshare at 10; `data_dir` left to you.

    Planned as the authors' code plans: 4 bins by their rule, and what the
    allocation rule leaves over stays unspent (`fill=False`).
    """
    return RunConfig(
        arch=arch,
        dataset=dataset,
        data_dir=None,
        budget=budget,
        scope=scope,
        fill=False,
        loop=PAPER_LOOP,
        optim=PAPER_OPTIM,
        search=PAPER_SEARCH,
    )


def imagenet(budget: str, arch: str = "resnet-50-imagenet") -> RunConfig:
    """ResNet-50 on ImageNet's folder layout (`data_dir`: the folder holding `train/` and
    `val/`), 224-pixel crops, planned as the paper presets are."""
    return RunConfig(
        arch=arch,
        dataset="image_folder",
        image_size=224,
        budget=budget,
        fill=False,
        loop=IMAGENET_LOOP,
        optim=IMAGENET_OPTIM,
        search=IMAGENET_SEARCH,
    )


def small(dataset: str, arch: str, budget: str, scope: str = "banks", **sizes) -> RunConfig:
    """The same recipe shortened to 15 epochs (search 3, unshare at 1) for a CPU."""
    return RunConfig(
        arch=arch,
        dataset=dataset,
        budget=budget,
        scope=scope,
        loop=SMALL_LOOP,
        optim=PAPER_OPTIM,
        search=SMALL_SEARCH,
        **sizes,
    )


def _presets() -> dict[str, RunConfig]:
    configs = {}
    for dataset in ("cifar100", "cifar10"):
        for percent in LOW_BUDGETS + PAPER_BUDGETS:
            configs[f"{dataset}-wrn-28-10-b{percent}"] = paper(dataset, "wrn-28-10", f"{percent}%")
    for percent in PAPER_BUDGETS:
        configs[f"imagenet-resnet-50-b{percent}"] = imagenet(f"{percent}%")
    configs["cifar100-ensemble-18m"] = paper("cifar100", ENSEMBLE, "18M")
    configs["cifar100-multiwidth-18m"] = paper("cifar100", MULTI_WIDTH, "18M")
    for percent in (15, 25, 50):
        configs[f"digits-wrn-28-1-b{percent}"] = small("digits", "wrn-28-1", f"{percent}%")
    configs["digits-ensemble"] = small("digits", DIGITS_ENSEMBLE, "83%", scope="model")
    configs["digits-multiwidth"] = small("digits", DIGITS_MULTI_WIDTH, "50%", scope="model")
    configs["fashion_mnist-wrn-16-1-b50"] = small(
        "fashion_mnist", "wrn-16-1", "50%", **FASHION_SIZES
    )
    configs["fashion_mnist-ensemble"] = small(
        "fashion_mnist", "wrn-16-1,wrn-10-1", "90%", scope="model", **FASHION_SIZES
    )
    return configs


PRESETS: dict[str, RunConfig] = _presets()


def names() -> list[str]:
    """Every preset's name, sorted."""
    return sorted(PRESETS)


def get(name: str) -> RunConfig:
    """The preset called `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    return PRESETS[name]


def with_overrides(config: RunConfig, **overrides: Any) -> RunConfig:
    """`config` with fields replaced; a nested config field also takes a dict of its fields.

    with_overrides(config, data_dir="~/data", loop={"epochs": 10})
    """
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; {type(config).__name__} has {sorted(fields)}")
    changes = {}
    for name, value in overrides.items():
        current = getattr(config, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = with_overrides(current, **value)
        changes[name] = value
    return dataclasses.replace(config, **changes)


def minimum_budget(config: RunConfig) -> tuple[int, int]:
    """`(smallest feasible budget, full size)` of `config`'s model(s), in its scope."""
    # the whole model is a feasible budget: only the minimum is read
    plan = initial_plan(
        dataclasses.replace(config, fill=False),
        Budget(fraction=1.0, scope=config.scope),
        data=data_without_files(config),
    )
    full = plan.dense_params - (plan.unshared_params if config.scope == "banks" else 0)
    return plan.minimum_budget, full


def data_without_files(config: RunConfig) -> tuple | None:
    """`(image shape, classes)` of an image-folder preset taken as ImageNet's, so that it
    plans with no folder at hand; None for the data sets whose shapes are known."""
    if config.dataset != "image_folder" or config.data_dir is not None:
        return None
    return (config.image_size, config.image_size, 3), IMAGENET_CLASSES


def budget_params(config: RunConfig) -> tuple[int, int]:
    """`(budget in parameters, smallest feasible budget)` of `config`, in its scope."""
    minimum, full = minimum_budget(config)
    return Budget.parse(config.budget, config.scope).resolve(full), minimum
