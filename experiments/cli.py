"""Command line: `npas train` trains a budgeted model, `npas report` shows its budget.

npas train                                   # WRN on the embedded digits, 25% budget
npas train --arch wrn-28-10 --dataset cifar100 --data-dir ~/data --budget 10%
npas report --arch wrn-28-10 --num-classes 100 --image-shape 32,32,3 --budget 5M
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

# Only the settings are imported before parsing: `--help` and argument errors
# answer without loading jax (the rest is imported where it is used).
from experiments.settings import (
    AUGMENTATIONS,
    BAD_IMAGES,
    DATASET_NAMES,
    DTYPES,
    SIMILARITIES,
    LoopConfig,
    OptimConfig,
    RunConfig,
    SearchConfig,
)

ARCH_HELP = (
    "model name: wrn-<depth>-<width> (any depth 6n+4, width > 0, e.g. wrn-28-10, wrn-16-0.5), "
    "resnet-18, resnet-34, resnet-50 (CIFAR stem), resnet-18-imagenet, resnet-34-imagenet, "
    "resnet-50-imagenet, vit-tiny, or a name given to archs.register"
)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        default=RunConfig.arch,
        help=f"{ARCH_HELP}; a comma-separated list trains an ensemble of members from one bank "
        "(repeat a name for identical members)",
    )
    parser.add_argument(
        "--exits", action="store_true", help="early-exit heads after each stage (WRN members)"
    )
    parser.add_argument(
        "--budget",
        default=RunConfig.budget,
        help="fraction (0.1), percentage (10%%) or count (250k, 1.5M)",
    )
    parser.add_argument(
        "--scope",
        default=RunConfig.scope,
        choices=("banks", "model"),
        help="count shared banks only (the paper) or every trainable param",
    )
    parser.add_argument(
        "--bins",
        type=int,
        default=RunConfig.bins,
        help="depth bins of the initial clusters: each kernel kind (1x1, 3x3) of the largest "
        "member gets max(1, round(bins * its layers / all its shared layers)) contiguous bins, "
        "as in the authors' code (4 on a WRN-28: one 1x1 bin and four 3x3 bins)",
    )
    parser.add_argument(
        "--sublayer-templates",
        type=int,
        default=RunConfig.sublayer_templates,
        help="templates per bank below one full-size template per bank (0: refuse such "
        "budgets, the paper's geometry only)",
    )
    parser.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="leave what the paper's allocation rule does not spend unspent (the authors' "
        "code); by default it goes to more templates and one partial template",
    )
    parser.add_argument("--share-dense", action="store_true", help="share dense kernels too")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's arguments; with `train --preset NAME` the preset's settings are the
    defaults, which the flags given beside it override."""
    parser, run = _parsers()
    preset = _preset_name(sys.argv[1:] if argv is None else argv)
    if preset is not None:
        run.set_defaults(**defaults_of(_preset_config(run, preset)))
    return parser.parse_args(argv)


def _preset_name(argv: list[str]) -> str | None:
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--preset")
    known, _ = probe.parse_known_args(argv)
    return known.preset if argv[:1] == ["train"] else None


def _preset_config(parser: argparse.ArgumentParser, name: str) -> RunConfig:
    from experiments import presets  # plans budgets: imports jax

    try:
        return presets.get(name)
    except ValueError as error:
        parser.error(str(error))


def defaults_of(config: RunConfig) -> dict:
    """`npas train`'s argument values that give `config` (`config_from_args`' inverse)."""
    loop, optim, search = config.loop, config.optim, config.search
    return {
        **{name: getattr(config, name) for name in MODEL_SETTINGS},
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "image_size": config.image_size,
        "bad_images": config.bad_images,
        "dense": config.dense,
        "dtype": config.dtype,
        "compare_dense": config.compare_dense,
        "train_size": config.train_size,
        "test_size": config.test_size,
        "augment": config.augmentation,
        "output_dir": config.output_dir,
        "checkpoint_every": config.checkpoint_every,
        "checkpoint_steps": config.checkpoint_steps,
        "keep_checkpoints": config.keep_checkpoints,
        "epochs": loop.epochs,
        "batch_size": loop.batch_size,
        "seed": loop.seed,
        "eval_every": loop.eval_every,
        "workers": loop.workers,
        "lr": optim.learning_rate,
        "weight_decay": optim.weight_decay,
        "no_search": not search.search,
        "search_epochs": search.search_epochs,
        "gradient_batches": search.gradient_batches,
        "similarity": search.similarity,
        "tau": search.tau,
        "warm_start": search.warm_start,
        "unshare_epoch": search.unshare_epoch,
    }


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser and its `train` subparser."""
    parser = argparse.ArgumentParser(prog="npas", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("train", help="train a budgeted model and report test accuracy")
    run.add_argument(
        "--preset",
        default=None,
        help="start from a named configuration of experiments/presets.py (e.g. "
        "imagenet-resnet-50-b25, cifar100-wrn-28-10-b25, digits-ensemble); the other flags "
        "given override it",
    )
    _add_model_args(run)
    run.add_argument("--dataset", default=RunConfig.dataset, choices=DATASET_NAMES)
    run.add_argument(
        "--data-dir",
        default=None,
        help="directory holding the data set's files (image_folder: the folder holding "
        "train/<class>/ and val/<class>/, ImageNet's layout)",
    )
    run.add_argument(
        "--image-size",
        type=int,
        default=RunConfig.image_size,
        help="image_folder: the side images are cropped to (evaluation: resized to 8/7 of it, "
        "centre-cropped)",
    )
    run.add_argument(
        "--bad-images",
        default=RunConfig.bad_images,
        choices=BAD_IMAGES,
        help="image_folder: refuse a folder holding files that are not images, or skip them "
        "(counted in the log)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=LoopConfig.workers,
        help="processes that read and augment batches (default: 0 for data held in memory, "
        "up to 8 for image folders)",
    )
    run.add_argument("--dense", action="store_true", help="train the full model, no sharing")
    run.add_argument(
        "--dtype",
        default=RunConfig.dtype,
        help=f"what the members compute in: {' or '.join(DTYPES)} (params, bank and optimizer "
        "state stay float32)",
    )
    run.add_argument(
        "--compare-dense",
        action="store_true",
        help="ensembles: then train the fully-parameterized ensemble the same way and set "
        "both side by side",
    )
    run.add_argument("--epochs", type=int, default=RunConfig.loop.epochs)
    run.add_argument("--batch-size", type=int, default=LoopConfig.batch_size)
    run.add_argument("--lr", type=float, default=OptimConfig.learning_rate)
    run.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay)
    run.add_argument("--augment", default="auto", choices=("auto", *AUGMENTATIONS))
    run.add_argument("--train-size", type=int, default=None, help="use the first N train images")
    run.add_argument("--test-size", type=int, default=None, help="use the first N test images")
    run.add_argument("--eval-every", type=int, default=0, help="test every N epochs (0: at end)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default=None, help="write plan, metrics and summary here")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--coordinator",
        default=None,
        help="multi-host: address:port of process 0 (or NPAS_COORDINATOR)",
    )
    run.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="multi-host: number of processes (or NPAS_NUM_PROCESSES)",
    )
    run.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="multi-host: this process's index (or NPAS_PROCESS_ID)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=RunConfig.checkpoint_every,
        help="save a checkpoint every N epochs (with --output-dir; 0: at the end)",
    )
    run.add_argument(
        "--checkpoint-steps",
        type=int,
        default=RunConfig.checkpoint_steps,
        help="also save one every N steps, mid-epoch included (0: not by steps)",
    )
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        default=RunConfig.keep_checkpoints,
        help="how many checkpoints to keep",
    )
    npas = run.add_argument_group("search and unsharing (budgeted models)")
    npas.add_argument(
        "--no-search",
        action="store_true",
        help="keep the initial depth-binned clusters (the no-search baseline)",
    )
    npas.add_argument(
        "--search-epochs",
        type=int,
        default=None,
        help=f"epochs of the search phase (default {SearchConfig.search_epochs}, at most --epochs)",
    )
    npas.add_argument(
        "--gradient-batches",
        type=int,
        default=SearchConfig.gradient_batches,
        help="batches averaged for the search gradients",
    )
    npas.add_argument(
        "--similarity",
        default=SearchConfig.similarity,
        help=f"what the search compares layers by: {' or '.join(SIMILARITIES)} (the paper's "
        "measure is the loss gradients; SSN-style methods compare the trained weights)",
    )
    npas.add_argument(
        "--tau", type=float, default=SearchConfig.tau, help="starting similarity threshold"
    )
    npas.add_argument(
        "--warm-start",
        action="store_true",
        help="start the final model from the search phase's weights",
    )
    npas.add_argument(
        "--unshare-epoch",
        type=int,
        default=None,
        help="epoch after which coefficients are unshared "
        "(default: 5%% of the epochs, at least 1; 0: never)",
    )

    report = commands.add_parser("report", help="print the budget report of a model, no training")
    _add_model_args(report)
    report.add_argument("--num-classes", type=int, default=10)
    report.add_argument("--image-shape", default="32,32,3", help="height,width,channels")
    return parser, run


MODEL_SETTINGS = (
    "arch",
    "exits",
    "budget",
    "scope",
    "bins",
    "sublayer_templates",
    "fill",
    "share_dense",
)
"""The config fields of the options both commands share (`_add_model_args`)."""


def model_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in MODEL_SETTINGS}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run `npas train` describes (checked by the run, `experiments.config.check`); the
    settings no flag reaches are the preset's, or `RunConfig`'s defaults."""
    base = RunConfig()
    if getattr(args, "preset", None):
        from experiments import presets

        base = presets.get(args.preset)
    return dataclasses.replace(
        base,
        **model_settings(args),
        dataset=args.dataset,
        data_dir=args.data_dir,
        dense=args.dense,
        dtype=args.dtype,
        train_size=args.train_size,
        test_size=args.test_size,
        augmentation=args.augment,
        image_size=args.image_size,
        bad_images=args.bad_images,
        output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_steps=args.checkpoint_steps,
        keep_checkpoints=args.keep_checkpoints,
        compare_dense=args.compare_dense,
        loop=dataclasses.replace(
            base.loop,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            eval_every=args.eval_every,
            workers=args.workers,
        ),
        optim=dataclasses.replace(
            base.optim, learning_rate=args.lr, weight_decay=args.weight_decay
        ),
        search=dataclasses.replace(
            base.search,
            search=not args.no_search,
            search_epochs=(
                min(SearchConfig.search_epochs, args.epochs)
                if args.search_epochs is None
                else args.search_epochs
            ),
            gradient_batches=args.gradient_batches,
            similarity=args.similarity,
            tau=args.tau,
            warm_start=args.warm_start,
            unshare_epoch=(
                min(max(1, round(0.05 * args.epochs)), args.epochs - 1)
                if args.unshare_epoch is None
                else args.unshare_epoch
            ),
        ),
    )


def report_config(args: argparse.Namespace) -> RunConfig:
    """The planning settings of `npas report` (no unsharing reserve: no training follows)."""
    return RunConfig(
        **model_settings(args),
        search=SearchConfig(unshare_epoch=0),
    )


def run_report(args: argparse.Namespace, log=print) -> None:
    """Prints the budget report of `args`' model(s): shapes only, nothing trained."""
    from experiments.config import check_classes, check_sizes, initial_plan, parse_image_shape
    from superweights import Budget
    from superweights.plan import describe_bins
    from superweights.report import budget_report

    config = report_config(args)
    shape = parse_image_shape(args.image_shape)
    check_classes(args.num_classes)
    check_sizes(config)
    budget = Budget.parse(args.budget, args.scope)
    plan = initial_plan(config, budget, data=(shape, args.num_classes))
    log(
        f"{args.arch} at budget {plan.budget.describe()}\n"
        f"{describe_bins(plan.layers, args.bins)}\n{budget_report(plan)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from experiments import distributed
    from experiments.checkpoint import CheckpointError, Interrupted
    from experiments.config import ConfigError
    from experiments.run import run_training
    from superweights import BudgetError

    try:
        if args.command == "report":
            run_report(args)
        else:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            primary = jax.process_index() == 0  # the other hosts train silently
            run_training(
                config_from_args(args),
                progress=primary and not args.quiet,
                log=print if primary else lambda _: None,
            )
    except Interrupted as stopped:
        print(f"npas: {stopped}", file=sys.stderr)
        return 130
    except CheckpointError as error:
        print(f"npas: error: {error}", file=sys.stderr)
        return 1
    except (ConfigError, BudgetError, ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"npas: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
