"""A training run's settings, and the one place where they are checked.

`check(config)` refuses every setting that cannot make a run before any data
is loaded or anything compiled, for the command line and the library alike:

    config = RunConfig(arch="wrn-16-1", budget="10%", output_dir="runs/a")
    check(config)  # ConfigError or BudgetError, each one line
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import superweights
from experiments import augment
from experiments.data import DATA_SHAPES, check_files, held_images
from experiments.models import COMPUTE_DTYPES, create_members
from experiments.npas import unshares
from experiments.rundir import in_use_message, lock_holder, ownership_problem
from experiments.settings import (
    BAD_IMAGES,
    DATASET_NAMES,
    SIMILARITIES,
    RunConfig,
)
from superweights import Budget, SharingRule


class ConfigError(ValueError):
    """A setting that cannot make a run; the message names it and says what to give."""


def arch_list(text: str, exits: bool = False) -> list[str]:
    """`"wrn-16-2,wrn-10-2"` -> `["wrn-16-2", "wrn-10-2"]`."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"--arch {text!r} has an empty member name")
    if exits and not all(name.startswith("wrn-") for name in names):
        raise ConfigError("--exits needs Wide ResNet members (wrn-<depth>-<width>)")
    return names


def members_of(
    arch: str, exits: bool, *, num_classes: int, in_channels: int, seed: int, dtype="float32"
):
    """`{member name: module}` for an `--arch` list, with early exits when asked."""
    return create_members(
        arch_list(arch, exits),
        num_classes=num_classes,
        in_channels=in_channels,
        seed=seed,
        dtype=dtype,
        **({"exits": True} if exits else {}),
    )


def abstract_members(config: RunConfig, image_shape, num_classes: int) -> dict:
    """The run's members as shapes only (`nnx.eval_shape`): nothing is allocated."""
    return nnx.eval_shape(
        lambda: members_of(
            config.arch,
            config.exits,
            num_classes=num_classes,
            in_channels=image_shape[2],
            seed=config.loop.seed,
            dtype=config.dtype,
        )
    )


def initial_plan(
    config: RunConfig, budget: Budget | None = None, data: tuple | None = None
) -> superweights.Plan:
    """The plan of `config` on its initial clusters, from shapes alone (nothing is trained).

    `data`: `(image shape, classes)`, by default those of `config.dataset`.
    """
    shape, num_classes = data or data_shape(config)
    return superweights.budgeted(
        abstract_members(config, shape, num_classes),
        budget or Budget.parse(config.budget, config.scope),
        sample_input=jax.ShapeDtypeStruct((1, *shape), jnp.float32),
        bins=config.bins,
        rule=SharingRule(share_dense=config.share_dense),
        fill=config.fill,
        sublayer_templates=config.sublayer_templates,
        reserve_unsharing=unshares(config.search, config.loop),
    ).plan


def data_shape(config: RunConfig) -> tuple[tuple[int, int, int], int]:
    """`(image shape (h, w, c), classes)` of `config`'s data, without loading it (an image
    folder is listed: its classes are its folders, its images cropped to `image_size`)."""
    if config.dataset == "image_folder":
        classes = held_images(config.dataset, config.data_dir, config.bad_images)[2]
        return (config.image_size, config.image_size, 3), classes
    return DATA_SHAPES[config.dataset]


def parse_image_shape(text: str) -> tuple[int, int, int]:
    """`"32,32,3"` -> `(32, 32, 3)`: height, width and channels, each at least 1."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"--image-shape takes height,width,channels as positive whole numbers, e.g. "
            f"32,32,3; got {text!r}"
        )
    return shape


def check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ConfigError(f"--num-classes must be at least 2, got {num_classes}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(values: dict, minimum: int) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_flag(name)} must be a whole number, got {value!r}")
        if value < minimum:
            bound = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise ConfigError(f"{_flag(name)} {bound}, got {value}")


def _finite(name: str, value, *, positive: bool) -> None:
    bound = "positive" if positive else "zero or more"
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{_flag(name)} must be a finite number ({bound}), got {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{_flag(name)} must be {bound}, got {value}")


def check_directory(flag: str, path: str, must_exist: bool) -> None:
    """`path` is a directory, or could become one: named, no part of it a file or too long."""
    if not path.strip():
        raise ConfigError(
            f"{flag} is empty; give a directory name (e.g. runs/a), or leave the option out"
        )
    target = Path(path).expanduser()
    check_name_lengths(flag, path, target)
    try:
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a directory")
        if must_exist and not target.exists():
            raise ConfigError(f"{flag} {path} does not exist")
        for parent in target.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{flag} {path} lies under {parent}, which is a file")
                break
    except OSError as error:
        raise ConfigError(f"{flag} {path} cannot be used: {error.strerror or error}") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def name_limit(target: Path) -> int:
    """The longest file name the file system of `target`'s nearest existing parent takes."""
    existing = next((p for p in (target, *target.parents) if _exists(p)), Path("."))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_name_lengths(flag: str, path: str, target: Path) -> None:
    """Every component of `target` fits the file system's limit on a name."""
    limit = name_limit(target)
    for part in target.parts:
        if len(os.fsencode(part)) > limit:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise ConfigError(
                f"{flag} has a component {shown!r} of {len(os.fsencode(part))} bytes; the file "
                f"system takes names of at most {limit}: give a shorter path"
            )


def check_output_dir(path: str) -> None:
    """`path` can hold this run: a directory that is new, empty or an npas run of its own,
    that no other run holds (checked by the host that writes)."""
    check_directory("--output-dir", path, must_exist=False)
    target = Path(path).expanduser()
    problem = ownership_problem(target)
    if problem:
        raise ConfigError(problem)
    holder = lock_holder(target) if jax.process_index() == 0 else None
    if holder is not None:
        raise ConfigError(in_use_message(target, holder))


def check_sizes(config: RunConfig) -> None:
    """Counts, rates and ranges, each against what it can be."""
    loop, search = config.loop, config.search
    _at_least(
        {
            "epochs": loop.epochs,
            "batch_size": loop.batch_size,
            "eval_batch_size": loop.eval_batch_size,
            "bins": config.bins,
            "keep_checkpoints": config.keep_checkpoints,
            "train_size": config.train_size,
            "test_size": config.test_size,
            "search_epochs": search.search_epochs if search.search else None,
            "gradient_batches": search.gradient_batches,
            "prefetch": loop.prefetch,
            "image_size": config.image_size,
        },
        1,
    )
    _at_least(
        {
            "eval_every": loop.eval_every,
            "checkpoint_every": config.checkpoint_every,
            "checkpoint_steps": config.checkpoint_steps,
            "sublayer_templates": config.sublayer_templates,
            "unshare_epoch": search.unshare_epoch,
            "workers": loop.workers,
        },
        0,
    )
    _finite("lr", config.optim.learning_rate, positive=True)
    _finite("weight_decay", config.optim.weight_decay, positive=False)
    if search.similarity not in SIMILARITIES:
        raise ConfigError(
            f"--similarity must be one of {', '.join(SIMILARITIES)}; got {search.similarity!r}"
        )
    if not (isinstance(search.tau, int | float) and -1 <= search.tau <= 1):
        raise ConfigError(f"--tau is a cosine similarity, in [-1, 1]; got {search.tau}")
    budgeted = not config.dense
    if budgeted and search.search and search.search_epochs > loop.epochs:
        raise ConfigError(
            f"--search-epochs ({search.search_epochs}) must be at most --epochs ({loop.epochs}): "
            "the search phase runs on the same learning-rate schedule"
        )
    if search.unshare_epoch >= loop.epochs and search.unshare_epoch != 0:
        raise ConfigError(
            f"--unshare-epoch must be in [0, {loop.epochs - 1}] (0: never), "
            f"got {search.unshare_epoch}"
        )


def check_dtype(config: RunConfig) -> None:
    if config.dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {config.dtype!r}"
        )


def check_data(config: RunConfig) -> None:
    """The data set, its directory, and sizes against the images it holds."""
    if config.dataset not in DATASET_NAMES:
        raise ConfigError(
            f"unknown data set {config.dataset!r}; choose one of {', '.join(DATASET_NAMES)}"
        )
    if config.data_dir is not None:
        check_directory("--data-dir", config.data_dir, must_exist=False)
    if config.bad_images not in BAD_IMAGES:
        raise ConfigError(
            f"--bad-images must be one of {', '.join(BAD_IMAGES)}; got {config.bad_images!r}"
        )
    try:
        check_files(config.dataset, config.data_dir, config.bad_images)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error).replace("pass data_dir", "pass --data-dir")) from None
    check_augmentation(config)
    train_held, test_held, _ = held_images(config.dataset, config.data_dir, config.bad_images)
    for flag, size, held in (
        ("--train-size", config.train_size, train_held),
        ("--test-size", config.test_size, test_held),
    ):
        if size is not None and size > held:
            raise ConfigError(
                f"{flag} {size} is more than the {held:,} images {config.dataset} holds"
            )
    train_images = config.train_size or train_held
    if config.loop.batch_size > train_images:
        raise ConfigError(
            f"--batch-size {config.loop.batch_size} exceeds the {train_images:,} training "
            "images; lower --batch-size or raise --train-size"
        )


def check_augmentation(config: RunConfig) -> None:
    """A known augmentation, of a kind the data set can have: an image folder's are done as
    images are decoded (resized crop, flip), the others' on the device (crop, flip, cutout)."""
    if config.augmentation not in ("auto", *augment.PRESETS):
        raise ConfigError(
            f"unknown augmentation {config.augmentation!r}; choose auto or one of "
            f"{', '.join(augment.PRESETS)}"
        )
    if config.augmentation == "auto":
        return
    chosen = augment.preset(config.augmentation)
    folder = config.dataset == "image_folder"
    if folder and (chosen.crop_padding or chosen.cutout):
        raise ConfigError(
            f"--augment {config.augmentation} pads and crops or cuts out, which image folders "
            "do not do; use imagenet (random resized crop and flip) or none"
        )
    if not folder and chosen.resized_crop:
        raise ConfigError(
            f"--augment {config.augmentation} is a random resized crop, done as image folders "
            f"are decoded; {config.dataset} is held in memory: use auto, none or "
            f"{', '.join(n for n, a in augment.PRESETS.items() if not a.resized_crop)}"
        )


def check_model(config: RunConfig) -> None:
    """The members exist, and a budgeted run's budget fits them (planned on shapes)."""
    names = arch_list(config.arch, config.exits)
    shape, num_classes = data_shape(config)
    try:
        abstract_members(config, shape, num_classes)
    except ValueError as error:
        raise ConfigError(f"--arch {config.arch}: {error}") from error
    if config.compare_dense and (config.dense or len(names) < 2):
        raise ConfigError("--compare-dense needs a budgeted ensemble: several --arch names")
    if not config.dense:
        initial_plan(config)  # BudgetError: malformed, too small or above the model


def check(config: RunConfig) -> None:
    """Raises `ConfigError` or `BudgetError` unless `config` can make a run.

    Nothing is loaded, compiled or written: the budget is planned on the
    models' shapes.
    """
    check_sizes(config)
    check_dtype(config)
    check_data(config)
    if config.output_dir is not None:
        check_output_dir(config.output_dir)
    if not config.dense:
        Budget.parse(config.budget, config.scope)
    check_model(config)
