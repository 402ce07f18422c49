"""Command line: `npas train` trains a budgeted model, `npas report` shows its budget.

npas train                                   # WRN on the embedded digits, 25% budget
npas train --arch wrn-28-10 --dataset cifar100 --data-dir ~/data --budget 10%
npas report --arch wrn-28-10 --num-classes 100 --image-shape 32,32,3 --budget 5M
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import archs
from experiments import augment, distributed
from experiments.checkpoint import Checkpoints, Interrupted, stop_requests
from experiments.data import DATASET_NAMES, load_dataset, subset
from experiments.ensemble import (
    anytime_curve,
    anytime_figure,
    comparison_table,
    compose_flops,
    ensemble_metrics,
    exit_curve,
    exit_flops,
    flops_per_member,
    parameter_saving,
)
from experiments.models import build_budgeted, build_dense, create_members
from experiments.npas import SearchConfig, run_npas, unshares
from experiments.plots import assignment_figure, similarity_figure
from experiments.train import (
    LoopConfig,
    OptimConfig,
    abstract_train_state,
    make_eval_step,
    predict,
    split_exits,
    train,
)
from search import SearchResult
from superweights import Budget, BudgetError, Plan, SharingRule, from_plan
from superweights.budget import SUBLAYER_TEMPLATES
from superweights.plan import describe_bins

DEFAULT_AUGMENTATION = {
    "cifar10": "cifar",
    "cifar100": "cifar",
    "mnist": "mnist",
    "fashion_mnist": "mnist",
    "digits": "digits",
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, as the command line describes it."""

    arch: str = "wrn-28-1"
    exits: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    budget: str = "25%"
    scope: str = "banks"
    bins: int = 4
    sublayer_templates: int = SUBLAYER_TEMPLATES
    fill: bool = True
    share_dense: bool = False
    dense: bool = False
    train_size: int | None = None
    test_size: int | None = None
    augmentation: str = "auto"
    output_dir: str | None = None
    checkpoint_every: int = 1
    checkpoint_steps: int = 0
    keep_checkpoints: int = 3
    compare_dense: bool = False
    loop: LoopConfig = LoopConfig(epochs=15)
    optim: OptimConfig = OptimConfig()
    search: SearchConfig = SearchConfig()


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        default=RunConfig.arch,
        help=f"model name ({', '.join(archs.available())}); a comma-separated list trains an "
        "ensemble of members from one bank (repeat a name for identical members)",
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
    parser = argparse.ArgumentParser(prog="npas", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("train", help="train a budgeted model and report test accuracy")
    _add_model_args(run)
    run.add_argument("--dataset", default=RunConfig.dataset, choices=DATASET_NAMES)
    run.add_argument("--data-dir", default=None, help="directory holding the data set's files")
    run.add_argument("--dense", action="store_true", help="train the full model, no sharing")
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
    run.add_argument("--augment", default="auto", choices=("auto", *augment.PRESETS))
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
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuses options that cannot make a run, before anything is built or compiled."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in ("epochs", "batch_size", "bins", "search_epochs", "gradient_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1")
    for name in ("eval_every", "checkpoint_every", "checkpoint_steps", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"{flag(name)} must not be negative")
    if args.sublayer_templates < 0:
        raise ValueError("--sublayer-templates must not be negative (0: full-size only)")
    if args.keep_checkpoints < 1:
        raise ValueError("--keep-checkpoints must be at least 1")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not -1 <= args.tau <= 1:
        raise ValueError(f"--tau is a cosine similarity, in [-1, 1]; got {args.tau}")
    if not args.no_search and not args.dense and (args.search_epochs or 0) > args.epochs:
        raise ValueError(
            f"--search-epochs ({args.search_epochs}) must be at most --epochs ({args.epochs}): "
            "the search phase runs on the same learning-rate schedule"
        )
    if args.unshare_epoch is not None and not 0 <= args.unshare_epoch < args.epochs:
        raise ValueError(
            f"--unshare-epoch must be in [0, {args.epochs - 1}] (0: never), "
            f"got {args.unshare_epoch}"
        )
    if args.compare_dense and (args.dense or len(arch_list(args.arch)) < 2):
        raise ValueError("--compare-dense needs a budgeted ensemble: several --arch names")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    check_args(args)
    return RunConfig(
        arch=args.arch,
        exits=args.exits,
        dataset=args.dataset,
        data_dir=args.data_dir,
        budget=args.budget,
        scope=args.scope,
        bins=args.bins,
        sublayer_templates=args.sublayer_templates,
        fill=args.fill,
        share_dense=args.share_dense,
        dense=args.dense,
        train_size=args.train_size,
        test_size=args.test_size,
        augmentation=args.augment,
        output_dir=args.output_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_steps=args.checkpoint_steps,
        keep_checkpoints=args.keep_checkpoints,
        compare_dense=args.compare_dense,
        loop=LoopConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            eval_every=args.eval_every,
        ),
        optim=dataclasses.replace(
            OptimConfig(), learning_rate=args.lr, weight_decay=args.weight_decay
        ),
        search=SearchConfig(
            search=not args.no_search,
            search_epochs=(
                min(SearchConfig.search_epochs, args.epochs)
                if args.search_epochs is None
                else args.search_epochs
            ),
            gradient_batches=args.gradient_batches,
            tau=args.tau,
            warm_start=args.warm_start,
            unshare_epoch=(
                max(1, round(0.05 * args.epochs))
                if args.unshare_epoch is None
                else args.unshare_epoch
            ),
        ),
    )


def search_summary(result, plan) -> str:
    """A few lines on what the search found: tau and each new cluster's layers."""
    lines = [
        f"search: tau {result.tau:.2f}; {len(result.similarities)} initial clusters -> "
        f"{len(result.clusters)} clusters (minimum budget {result.minimum_budget:,})"
    ]
    if result.refused:
        first = result.refused[0]
        lines.append(
            f"  {len(result.refused)} thresholds refused first; at tau {first.tau:.2f}: "
            f"{first.reason}"
        )
    for cluster in plan.clusters:
        layers = [i.split(":", 1)[-1].removesuffix(".kernel") for i in cluster.layers]
        shown = ", ".join(layers[:6]) + (f", ... ({len(layers)} layers)" if len(layers) > 6 else "")
        lines.append(f"  {cluster.name}: {shown}")
    return "\n".join(lines)


def run_training(config: RunConfig, *, progress: bool = True, log=print) -> dict:
    """Trains the configured model; returns the summary it prints and saves.

    Budgeted runs go through the NPAS pipeline (search, final model, unsharing);
    `config.search.search=False` keeps the initial clusters; `config.dense`
    trains the full model instead.
    """
    budget = Budget.parse(config.budget, config.scope)
    mesh = distributed.data_mesh()
    distributed.check_batch(config.loop.batch_size, mesh)
    distributed.check_batch(config.loop.eval_batch_size, mesh, "eval batch size")
    dataset = load_dataset(config.dataset, config.data_dir)
    if config.train_size is not None or config.test_size is not None:
        dataset = subset(dataset, config.train_size, config.test_size)
    height, width, channels = dataset.image_shape
    modules = members_of(
        config.arch,
        config.exits,
        num_classes=dataset.num_classes,
        in_channels=channels,
        seed=config.loop.seed,
    )
    sample = jnp.zeros((1, height, width, channels), jnp.float32)
    name = config.augmentation
    if name == "auto":
        name = DEFAULT_AUGMENTATION[dataset.name]
    loop = dataclasses.replace(config.loop, augmentation=augment.preset(name))
    config = dataclasses.replace(config, augmentation=name, loop=loop)

    out = Path(config.output_dir) if config.output_dir else None
    files = out if jax.process_index() == 0 else None  # one host writes the results
    checkpoints, resumed, search_checkpoints, search_resumed = None, None, None, None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints = Checkpoints(out / "checkpoints", keep=config.keep_checkpoints)
        if not config.dense and config.search.search:
            search_checkpoints = Checkpoints(
                out / "search_checkpoints", keep=config.keep_checkpoints
            )
        if checkpoints.steps() or (search_checkpoints and search_checkpoints.steps()):
            check_same_config(config, out)
        setting = (config, modules, sample, dataset, loop, log)
        resumed = resume_point(checkpoints, *setting)
        if resumed is None and search_checkpoints is not None:
            search_resumed = resume_point(search_checkpoints, *setting, phase="the search phase")
    if files:
        write_atomically(files / "config.json", json.dumps(dataclasses.asdict(config), indent=1))
        first_epoch = resumed[2].epoch if resumed else 1
        kept = []
        if resumed and (files / "metrics.jsonl").exists():
            lines = (files / "metrics.jsonl").read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["epoch"] < first_epoch]
        (files / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))

    def on_epoch(metrics: dict) -> None:
        if files:
            with (files / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")

    def on_search(result, final) -> None:
        if files:
            (files / "search.json").write_text(result.to_json())
            similarity_figure(result, files / "similarity.png")

    log(
        f"training on {dataset.name}: {len(dataset.train_images):,} train / "
        f"{len(dataset.test_images):,} test images, {loop.epochs} epochs, "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    summary = {"arch": config.arch, "dataset": dataset.name, "dense": config.dense, "budget": None}
    with stop_requests() as should_stop:
        common = dict(
            progress=progress,
            on_epoch=on_epoch,
            checkpoints=checkpoints,
            checkpoint_every=config.checkpoint_every,
            checkpoint_steps=config.checkpoint_steps,
            should_stop=should_stop,
        )
        if config.dense:
            model = resumed[0] if resumed else build_dense(modules)
            summary["trainable_params"] = model.trainable_params
            log(
                f"{config.arch} (dense, no sharing): {model.trainable_params:,} trainable "
                "parameters"
            )
            state, metrics = train(
                model,
                dataset,
                loop,
                config.optim,
                resume=resumed[1:] if resumed else None,
                **common,
            )
        else:
            rule = SharingRule(share_dense=config.share_dense)
            # Validate the budget against the initial clusters before any training.
            initial = build_budgeted(
                modules,
                budget,
                sample,
                bins=config.bins,
                share_dense=config.share_dense,
                sublayer_templates=config.sublayer_templates,
                fill=config.fill,
                reserve_unsharing=unshares(config.search, loop),
            )
            log(
                f"{config.arch} at budget {budget.describe()}; initial clusters\n"
                f"({describe_bins(initial.plan.layers, config.bins)}):\n"
                f"{initial.report()}\n"
            )
            run = run_npas(
                modules,
                dataset,
                budget,
                sample,
                loop,
                config.optim,
                config.search,
                bins=config.bins,
                rule=rule,
                sublayer_templates=config.sublayer_templates,
                fill=config.fill,
                log=log,
                on_search=on_search,
                resume=resumed,
                search_checkpoints=search_checkpoints,
                search_resume=search_resumed,
                **common,
            )
            model, state, metrics = run["model"], run["state"], run["metrics"]
            result = run["search"]
            if result is None and out and (out / "search.json").exists() and resumed:
                result = SearchResult.from_json((out / "search.json").read_text())
            if result is not None:
                log(search_summary(result, model.plan))
                log(f"final model:\n{model.report()}")
            summary.update(
                budget=budget.describe(),
                search=result is not None,
                trainable_params=model.plan.trainable_params,
                unshare=run["unshare"],
                tau=None if result is None else result.tau,
                clusters=len(model.plan.clusters),
            )
            if files:
                (files / "plan.json").write_text(model.plan.to_json())
                (files / "report.txt").write_text(model.report() + "\n")
                assignment_figure(model.plan, files / "clusters.png")
    summary.update(metrics)
    if len(modules) > 1 or config.exits:
        summary.update(ensemble_summary(model, state, dataset, loop.eval_batch_size, files, log))
    if config.compare_dense and not config.dense and len(modules) > 1:
        log("\ntraining the fully-parameterized ensemble the same way, for comparison")
        dense = run_training(
            dataclasses.replace(
                config,
                dense=True,
                compare_dense=False,
                output_dir=str(out / "dense") if out else None,
            ),
            progress=progress,
            log=log,
        )
        rows = {
            name: {
                "params": run["trainable_params"],
                "accuracy": run["test_accuracy"],
                "nll": run["ensemble_nll"],
                "diversity": run["diversity"],
            }
            for name, run in (
                ("SuperWeight ensemble", summary),
                ("fully-parameterized ensemble", dense),
            )
        }
        summary["comparison"] = comparison_table(rows)
        log("\n" + summary["comparison"])
        if files:
            (files / "comparison.md").write_text(summary["comparison"] + "\n")
    if files:
        (files / "summary.json").write_text(json.dumps(summary, indent=1))
        write_csv(files / "metrics.jsonl", files / "metrics.csv")
    log(
        f"final test accuracy: {metrics['test_accuracy']:.2%} "
        f"(train loss {metrics['train_loss']:.4f}, {metrics['time']:.1f}s)"
    )
    return summary


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` so that a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_csv(jsonl: Path, csv_path: Path) -> None:
    """The per-epoch metrics as CSV, one column per metric seen in any epoch."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


WHERE_AND_WHEN_SAVED = ("output_dir", "checkpoint_every", "checkpoint_steps", "keep_checkpoints")
"""Settings a resumed run may change: they do not change its results."""


def check_same_config(config, out: Path) -> None:
    """Refuses to resume, in `out`, a run made with another configuration."""
    saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    for where in WHERE_AND_WHEN_SAVED:
        saved.pop(where, None)
        current.pop(where)
    if saved != current:
        changed = sorted(k for k in current if saved.get(k) != current[k])
        raise ValueError(
            f"{out} holds checkpoints of a run with other settings ({', '.join(changed)}); "
            "use the same options to resume it, or another --output-dir"
        )


def resume_point(checkpoints, config, modules, sample, dataset, loop, log, phase="training"):
    """`(model, state, position)` from the newest readable checkpoint, or None."""
    if not checkpoints.steps():
        return None

    def model_for(meta: dict):
        if config.dense:
            return build_dense(modules)
        return from_plan(Plan.from_json(meta["plan"]), modules, sample_input=sample)

    models = {}

    def abstract_state(meta: dict):
        models["model"] = model_for(meta)
        return abstract_train_state(models["model"], dataset, loop, config.optim)

    restored = checkpoints.restore_latest(abstract_state, log=log)
    if restored is None:
        log(f"no readable checkpoint in {checkpoints.directory}; starting over")
        return None
    state, position, _ = restored
    log(
        f"resuming {phase} from step {int(state.step)} (epoch {position.epoch}, "
        f"{position.batches_done} batches into it)"
    )
    return models["model"], state, position


def ensemble_summary(model, state, dataset, batch_size: int, out: Path | None, log) -> dict:
    """Diversity, anytime curves (members cheapest first, and each member's early exits,
    against FLOPs) and parameter saving.

    FLOPs are XLA's estimate for one batch of `batch_size` test images; a budgeted
    ensemble pays the composition of its weights once per batch on top.
    """
    logits = predict(
        make_eval_step(model), state.params, state.model_state, dataset.test_images, batch_size
    )
    finals, _ = split_exits(logits)
    metrics = ensemble_metrics(finals, dataset.test_labels)
    budgeted = hasattr(model, "plan")
    member_params = jax.jit(model.member_params)(state.params) if budgeted else state.params
    batch = jax.ShapeDtypeStruct((batch_size, *dataset.image_shape), jnp.float32)
    flops = flops_per_member(model.members, member_params, state.model_state, batch)
    compose_cost = compose_flops(model.plan) if budgeted else 0
    curve = anytime_curve(finals, dataset.test_labels, flops, compose_cost=compose_cost)
    params = model.plan.trainable_params if budgeted else model.trainable_params
    full = model.plan.dense_params if budgeted else model.trainable_params
    lines = [
        f"ensemble of {len(finals)}: accuracy {metrics['accuracy']:.2%}, "
        f"NLL {metrics['nll']:.3f}, diversity {metrics['diversity']:.3f}; "
        f"{params:,} parameters, {parameter_saving(params, full):.1f}% fewer than the "
        f"fully-parameterized ensemble ({full:,})",
        f"anytime (batch of {batch_size}; composing the weights: {compose_cost:,} FLOPs, "
        "counted once per batch):",
    ]
    lines += [
        f"  {' + '.join(e['members'])}: {e['flops']:,} FLOPs, accuracy {e['accuracy']:.2%}"
        for e in curve
    ]
    curves = {"SuperWeight ensemble" if budgeted else "ensemble": curve}
    exits = {}
    for member in model.members:
        if logits[member.name].ndim == 3:
            costs = exit_flops(
                member.apply_fn, member_params[member.name], state.model_state[member.name], batch
            )
            exits[member.name] = exit_curve(
                logits[member.name], dataset.test_labels, costs, compose_cost=compose_cost
            )
            curves[f"{member.name} exits"] = exits[member.name]
            lines += [
                f"  {member.name}, {e['members'][0]}: {e['flops']:,} FLOPs, "
                f"accuracy {e['accuracy']:.2%}"
                for e in exits[member.name]
            ]
    log("\n".join(lines))
    if out:
        anytime_figure(curves, out / "anytime.png")
    return {
        "anytime_exits": {
            name: [dict(e, members=list(e["members"])) for e in curve]
            for name, curve in exits.items()
        },
        "diversity": metrics["diversity"],
        "ensemble_nll": metrics["nll"],
        "member_accuracy": {name: metrics[f"accuracy/{name}"] for name in finals},
        "fully_parameterized_params": full,
        "parameter_saving_percent": parameter_saving(params, full),
        "member_flops": flops,
        "compose_flops": compose_cost,
        "anytime": [dict(e, members=list(e["members"])) for e in curve],
    }


def arch_list(text: str, exits: bool = False) -> list[str]:
    """`"wrn-16-2,wrn-10-2"` -> `["wrn-16-2", "wrn-10-2"]`, checked against the registry."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"--arch {text!r} has an empty member name")
    if exits and not all(name.startswith("wrn-") for name in names):
        raise ValueError("--exits needs Wide ResNet members (wrn-<depth>-<width>)")
    return names


def members_of(arch: str, exits: bool, *, num_classes: int, in_channels: int, seed: int):
    """`{member name: module}` for a `--arch` list, with early exits when asked."""
    return create_members(
        arch_list(arch, exits),
        num_classes=num_classes,
        in_channels=in_channels,
        seed=seed,
        **({"exits": True} if exits else {}),
    )


def run_report(args: argparse.Namespace, log=print) -> None:
    shape = tuple(int(x) for x in args.image_shape.split(","))
    if len(shape) != 3:
        raise ValueError("--image-shape takes height,width,channels, e.g. 32,32,3")
    modules = nnx.eval_shape(  # shapes only: no memory spent on weights
        lambda: members_of(
            args.arch, args.exits, num_classes=args.num_classes, in_channels=shape[2], seed=0
        )
    )
    sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    model = build_budgeted(
        modules,
        Budget.parse(args.budget, args.scope),
        sample,
        bins=args.bins,
        share_dense=args.share_dense,
        sublayer_templates=args.sublayer_templates,
        fill=args.fill,
    )
    log(
        f"{args.arch} at budget {model.plan.budget.describe()}\n"
        f"{describe_bins(model.plan.layers, args.bins)}\n{model.report()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    except (BudgetError, ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"npas: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
