"""A run's settings as plain frozen dataclasses, importable without jax.

The command line builds its parser from these defaults and names, so that
`npas train --help` and argument errors answer before jax, flax or any data
is imported. The modules that act on a setting re-export it
(`experiments.train.LoopConfig`, `experiments.npas.SearchConfig`,
`experiments.config.RunConfig`, `experiments.augment.Augmentation`).
"""

from __future__ import annotations

import dataclasses

DATASET_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder")
"""The data sets `RunConfig.dataset` may name (`experiments.data.load_dataset`); an
`image_folder` is any folder in ImageNet's layout (`train/<class>/*.jpg`, `val/<class>/*`)."""

BAD_IMAGES = ("refuse", "skip")
"""What an image folder's files that are not images get (`RunConfig.bad_images`)."""

SIMILARITIES = ("gradients", "weights")
"""What the search may compare layers by (`SearchConfig.similarity`)."""

DTYPES = ("float32", "bfloat16")
"""What the members may compute in (`RunConfig.dtype`)."""


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What to apply to a training batch.

    Attributes:
      crop_padding: random crop after zero-padding this many pixels (0 = none).
      flip: random horizontal flip.
      cutout: side of a square zeroed at a random centre (0 = none).
      resized_crop: random resized crop (scale 8-100%, aspect 3/4-4/3) to the
        image size, ImageNet's recipe; image folders only, done with the flip
        as images are decoded (the others are done on the device).
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    resized_crop: bool = False


AUGMENTATIONS = {
    "none": Augmentation(),
    "cifar": Augmentation(crop_padding=4, flip=True, cutout=16),
    "mnist": Augmentation(crop_padding=2),
    "digits": Augmentation(crop_padding=1),
    "imagenet": Augmentation(flip=True, resized_crop=True),
}
"""Named augmentations (`--augment`)."""

DEFAULT_AUGMENTATION = {
    "cifar10": "cifar",
    "cifar100": "cifar",
    "mnist": "mnist",
    "fashion_mnist": "mnist",
    "digits": "digits",
    "image_folder": "imagenet",
}
"""The augmentation `--augment auto` picks for each data set."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The paper's CIFAR recipe (method.md section 9), scaled to any run length.

    Attributes:
      learning_rate: initial learning rate.
      momentum: Nesterov momentum.
      weight_decay: L2 added to the gradient of every param but coefficients.
      milestones: fractions of training at which the rate is multiplied by
        `decay` (the paper's epochs 60, 120, 160 of 200).
      decay: the factor at each milestone.
    """

    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    decay: float = 0.2


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length, batching and reading of a run.

    `workers` are the processes that read and transform batches (None: none
    for data held in memory, up to 8 for image folders); `prefetch` the
    batches kept on the devices ahead of the step.
    """

    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 256
    eval_every: int = 0
    seed: int = 0
    augmentation: Augmentation = Augmentation()
    workers: int | None = None
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How sharing is searched for and refined (method.md sections 6-7).

    Attributes:
      search: run the gradient-conflict search; False keeps the initial clusters.
      search_epochs: epochs of the search phase (paper: 20 of 200).
      gradient_batches: batches averaged for the per-layer gradients.
      similarity: what the layers are compared by: `"gradients"` (dL/dW after the
        search phase, the paper's measure) or `"weights"` (the trained kernels
        themselves, the measure of SSN-style methods; each layer then owns its
        coefficients in the search phase, so that the kernels can differ).
      tau: starting similarity threshold of the clustering.
      tau_step: how much tau drops while the clusters do not fit the budget.
      warm_start: start the final model from the search phase's per-member
        params (norms, heads, statistics) and from its templates wherever a
        bank kept its shape; otherwise the final model starts fresh.
      unshare_epoch: epoch of the final run after which coefficients are
        unshared (0: never; paper: 10 of 200).
      unshare_threshold: cosine at or below which sharers are split off.
      unshare_batches: batches averaged for the coefficient gradients.
    """

    search: bool = True
    search_epochs: int = 3
    gradient_batches: int = 8
    similarity: str = "gradients"
    tau: float = 0.1
    tau_step: float = 0.05
    warm_start: bool = False
    unshare_epoch: int = 2
    unshare_threshold: float = 0.9
    unshare_batches: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: model, budget, data, schedule, search and where it is written.

    `budget` is text as `Budget.parse` reads it ("10%", "250k"); `output_dir`
    None keeps nothing on disk. `dtype` is what the members compute in
    ("float32" or "bfloat16"); params and optimizer state are float32 either way.
    `sublayer_templates` is `superweights.budget.SUBLAYER_TEMPLATES`'s value.
    `image_size` and `bad_images` concern image folders: the side their images
    are cropped to, and whether files that are not images are refused or skipped.
    """

    arch: str = "wrn-28-1"
    exits: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    budget: str = "25%"
    scope: str = "banks"
    bins: int = 4
    sublayer_templates: int = 1
    fill: bool = True
    share_dense: bool = False
    dense: bool = False
    dtype: str = "float32"
    train_size: int | None = None
    test_size: int | None = None
    augmentation: str = "auto"
    image_size: int = 224
    bad_images: str = "refuse"
    output_dir: str | None = None
    checkpoint_every: int = 1
    checkpoint_steps: int = 0
    keep_checkpoints: int = 3
    compare_dense: bool = False
    loop: LoopConfig = LoopConfig(epochs=15)
    optim: OptimConfig = OptimConfig()
    search: SearchConfig = SearchConfig()
