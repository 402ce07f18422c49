"""One training run from its settings: `run_training(config)`.

    check the settings -> load the data -> build the members -> open the run
    directory -> find where to resume -> train (dense, or search + final model)
    -> ensemble curves -> the dense comparison -> summary

Budgeted runs go through the NPAS pipeline (`experiments.npas`);
`config.search.search=False` keeps the initial clusters; `config.dense` trains
the full model instead. Everything a run writes goes through its `RunDir`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from experiments import augment, distributed
from experiments.checkpoint import Checkpoints, Interrupted, Position, stop_requests
from experiments.config import RunConfig, check, members_of
from experiments.data import Dataset, load_dataset, subset
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
from experiments.models import build_budgeted, build_dense, compute_dtype
from experiments.npas import run_npas, unshares
from experiments.pipeline import Loader
from experiments.plots import assignment_figure, similarity_figure
from experiments.rundir import RunDir
from experiments.settings import DEFAULT_AUGMENTATION
from experiments.train import (
    NO_SAVING,
    Phase,
    Saving,
    TrainState,
    abstract_train_state,
    loader_of,
    make_eval_step,
    predict,
    split_exits,
    train,
)
from search import SearchResult
from superweights import Budget, Plan, SharingRule, from_plan
from superweights.plan import describe_bins


class ResumePoint(NamedTuple):
    """Where an interrupted phase goes on: its model, state and position, and the meta."""

    model: Any
    state: TrainState
    position: Position
    meta: dict


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every phase of a run is built from."""

    config: RunConfig
    dataset: Dataset
    modules: dict
    sample: jax.Array


def augmentation_name(config: RunConfig) -> str:
    """The augmentation `config` names, "auto" resolved for its data set."""
    if config.augmentation == "auto":
        return DEFAULT_AUGMENTATION[config.dataset]
    return config.augmentation


def load_data(config: RunConfig) -> Dataset:
    folder = {}
    if config.dataset == "image_folder":
        folder = {
            "image_size": config.image_size,
            "augmentation": augment.preset(augmentation_name(config)),
            "bad_images": config.bad_images,
        }
    dataset = load_dataset(config.dataset, config.data_dir, **folder)
    if config.train_size is not None or config.test_size is not None:
        dataset = subset(dataset, config.train_size, config.test_size)
    return dataset


def with_augmentation(config: RunConfig, dataset: Dataset) -> RunConfig:
    """`config` with its augmentation named ("auto" resolved) and what of it the train step
    does on the device set in its loop (an image folder's is done as images are read)."""
    name = augmentation_name(config)
    on_device = dataset.device_augmentation(augment.preset(name))
    loop = dataclasses.replace(config.loop, augmentation=on_device)
    return dataclasses.replace(config, augmentation=name, loop=loop)


def setting_for(config: RunConfig, dataset: Dataset) -> Setting:
    height, width, channels = dataset.image_shape
    modules = members_of(
        config.arch,
        config.exits,
        num_classes=dataset.num_classes,
        in_channels=channels,
        seed=config.loop.seed,
        dtype=config.dtype,
    )
    return Setting(config, dataset, modules, jnp.zeros((1, height, width, channels), jnp.float32))


def resume_point(
    checkpoints: Checkpoints | None, setting: Setting, log, phase: str
) -> ResumePoint | None:
    """The newest readable checkpoint of a phase, or None."""
    if checkpoints is None or not checkpoints.steps():
        return None
    config, models = setting.config, {}

    def abstract_state(meta: dict):
        if config.dense:
            models["model"] = build_dense(setting.modules)
        else:
            plan = Plan.from_json(meta["plan"])
            models["model"] = from_plan(
                plan,
                setting.modules,
                sample_input=setting.sample,
                dtype=compute_dtype(config.dtype),
            )
        return abstract_train_state(models["model"], setting.dataset, config.loop, config.optim)

    restored = checkpoints.restore_latest(abstract_state, log=log)
    if restored is None:
        log(f"no readable checkpoint in {checkpoints.directory}; starting over")
        return None
    state, position, meta = restored
    log(
        f"resuming {phase} from step {int(state.step)} (epoch {position.epoch}, "
        f"{position.batches_done} batches into it)"
    )
    return ResumePoint(models["model"], state, position, meta)


def searches(config: RunConfig) -> bool:
    """The run has a search phase (a budgeted run with the search on)."""
    return config.search.search and not config.dense


def resume_points(run_dir: RunDir, setting: Setting, log) -> dict[str, ResumePoint | None]:
    """`{"training": ..., "search": ...}`: the final training's, else the search phase's."""
    training = resume_point(run_dir.checkpoints("training"), setting, log, "training")
    searching = None
    if training is None and searches(setting.config):
        searching = resume_point(run_dir.checkpoints("search"), setting, log, "the search phase")
    return {"training": training, "search": searching}


def saving_for(run_dir: RunDir, config: RunConfig, phase: str, should_stop) -> Saving:
    return Saving(
        checkpoints=run_dir.checkpoints(phase),
        every_epochs=config.checkpoint_every,
        every_steps=config.checkpoint_steps,
        should_stop=should_stop,
    )


def train_dense(setting: Setting, resumed: ResumePoint | None, saving: Saving, hooks) -> tuple:
    """The full model, no sharing: `(model, state, metrics, summary fields)`."""
    config = setting.config
    model = resumed.model if resumed else build_dense(setting.modules)
    hooks.log(f"{config.arch} (dense, no sharing): {model.trainable_params:,} trainable parameters")
    phase = Phase(resume=resumed[1:3] if resumed else None)
    state, metrics = train(
        model,
        setting.dataset,
        config.loop,
        config.optim,
        phase=phase,
        saving=saving,
        on_epoch=hooks.on_epoch,
        progress=hooks.progress,
    )
    return model, state, metrics, {"trainable_params": model.trainable_params}


def train_budgeted(
    setting: Setting, resumed: dict, savings: dict[str, Saving], run_dir: RunDir, hooks
) -> tuple:
    """Search (or not) and the final model: `(model, state, metrics, summary fields)`."""
    config = setting.config
    budget = Budget.parse(config.budget, config.scope)
    initial = build_budgeted(
        setting.modules,
        budget,
        setting.sample,
        bins=config.bins,
        share_dense=config.share_dense,
        sublayer_templates=config.sublayer_templates,
        fill=config.fill,
        reserve_unsharing=unshares(config.search, config.loop),
        dtype=config.dtype,
    )
    hooks.log(
        f"{config.arch} at budget {budget.describe()}; initial clusters\n"
        f"({describe_bins(initial.plan.layers, config.bins)}):\n{initial.report()}\n"
    )

    def on_search(result, final) -> None:
        del final
        run_dir.write_text("search.json", result.to_json())
        if run_dir.writes:
            similarity_figure(result, run_dir.file("similarity.png"))

    training, searching = resumed["training"], resumed["search"]
    run = run_npas(
        setting.modules,
        setting.dataset,
        budget,
        setting.sample,
        config.loop,
        config.optim,
        config.search,
        bins=config.bins,
        rule=SharingRule(share_dense=config.share_dense),
        sublayer_templates=config.sublayer_templates,
        dtype=compute_dtype(config.dtype),
        fill=config.fill,
        log=hooks.log,
        on_epoch=hooks.on_epoch,
        on_search=on_search,
        progress=hooks.progress,
        saving=savings["training"],
        search_saving=savings.get("search", NO_SAVING),
        resume=training[:3] if training else None,
        resumed_unshare=training.meta.get("unshare") if training else None,
        search_resume=searching[:3] if searching else None,
    )
    model, result = run["model"], run["search"]
    saved_search = run_dir.read_text("search.json")
    if result is None and training and saved_search:
        result = SearchResult.from_json(saved_search)
    if result is not None:
        hooks.log(search_summary(result, model.plan))
        hooks.log(f"final model:\n{model.report()}")
    run_dir.write_text("plan.json", model.plan.to_json())
    run_dir.write_text("report.txt", model.report() + "\n")
    if run_dir.writes:
        assignment_figure(model.plan, run_dir.file("clusters.png"))
    fields = {
        "budget": budget.describe(),
        "search": result is not None,
        "trainable_params": model.plan.trainable_params,
        "unshare": run["unshare"],
        "tau": None if result is None else result.tau,
        "clusters": len(model.plan.clusters),
    }
    return model, run["state"], run["metrics"], fields


@dataclasses.dataclass(frozen=True)
class Hooks:
    """How a run talks: its log, its progress bar, and where each epoch's metrics go."""

    log: Any = print
    progress: bool = True
    on_epoch: Any = None


def run_training(config: RunConfig, *, progress: bool = True, log=print) -> dict:
    """Trains the configured model; returns the summary it prints and saves.

    SIGTERM and SIGINT are heard from the start: before the first step the run
    stops saving nothing, after it with a checkpoint (`Interrupted` either way).
    The run directory is locked from before the data is loaded to the end.
    """
    with stop_requests() as should_stop:
        check(config)
        stop_if_asked(should_stop, "before loading the data")
        mesh = distributed.data_mesh()
        distributed.check_batch(config.loop.batch_size, mesh)
        distributed.check_batch(config.loop.eval_batch_size, mesh, "eval batch size")
        with RunDir.open(config.output_dir, config.keep_checkpoints, log=log) as run_dir:
            return train_in(config, run_dir, should_stop, progress, log)


def stop_if_asked(should_stop, where: str) -> None:
    """Raises `Interrupted` if a stop was asked for before training began (nothing to save)."""
    if should_stop():
        raise Interrupted(
            f"stopped {where}, before the first step; nothing was saved: run the same "
            "command again to start"
        )


def train_in(config: RunConfig, run_dir: RunDir, should_stop, progress: bool, log) -> dict:
    """The run of a checked `config` in its open, locked `run_dir`."""
    dataset = load_data(config)
    config = with_augmentation(config, dataset)
    setting = setting_for(config, dataset)
    run_dir.check_same_config(config)
    resumed = resume_points(run_dir, setting, log)
    stop_if_asked(should_stop, "while loading the data and the checkpoints")
    run_dir.start(config, resumed["training"].position.epoch if resumed["training"] else 1)
    hooks = Hooks(log, progress, run_dir.append_metrics)
    log(
        f"training on {dataset.name}: {dataset.train_size:,} train / "
        f"{dataset.test_size:,} test images, {config.loop.epochs} epochs, "
        f"{jax.device_count()} {jax.default_backend()} device(s), computing in {config.dtype}"
    )
    skipped = getattr(dataset, "skipped", ())
    if skipped:
        log(f"skipped {len(skipped):,} files that are not images (--bad-images skip): {skipped[0]}")
    summary = {"arch": config.arch, "dataset": dataset.name, "dense": config.dense, "budget": None}
    phases = ("training", "search") if searches(config) else ("training",)
    savings = {p: saving_for(run_dir, config, p, should_stop) for p in phases}
    if config.dense:
        trained = train_dense(setting, resumed["training"], savings["training"], hooks)
    else:
        trained = train_budgeted(setting, resumed, savings, run_dir, hooks)
    model, state, metrics, fields = trained
    summary.update(fields)
    summary.update(metrics)
    if len(setting.modules) > 1 or config.exits:
        summary.update(
            ensemble_summary(
                model,
                state,
                dataset,
                config.loop.eval_batch_size,
                loader_of(config.loop, dataset),
                run_dir,
                log,
            )
        )
    if config.compare_dense and not config.dense and len(setting.modules) > 1:
        summary.update(compare_with_dense(config, summary, run_dir, progress, log))
    run_dir.finish(summary)
    log(
        f"final test accuracy: {metrics['test_accuracy']:.2%} "
        f"(train loss {metrics['train_loss']:.4f}, {metrics['time']:.1f}s)"
    )
    return summary


def compare_with_dense(config: RunConfig, summary: dict, run_dir: RunDir, progress, log) -> dict:
    """Trains the fully-parameterized ensemble the same way; the table of both."""
    log("\ntraining the fully-parameterized ensemble the same way, for comparison")
    dense = run_training(
        dataclasses.replace(
            config,
            dense=True,
            compare_dense=False,
            output_dir=str(run_dir.path / "dense") if run_dir.path else None,
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
    table = comparison_table(rows)
    log("\n" + table)
    run_dir.write_text("comparison.md", table + "\n")
    return {"comparison": table}


def search_summary(result, plan) -> str:
    """A few lines on what the search found: tau, the rule's verdicts and each cluster's
    layers."""
    lines = [
        f"search ({result.measure}): tau {result.tau:.2f}; {len(result.similarities)} initial "
        f"clusters -> {len(result.clusters)} clusters (minimum budget {result.minimum_budget:,})"
    ]
    if result.refused:
        first = result.refused[0]
        lines.append(
            f"  {len(result.refused)} thresholds refused first; at tau {first.tau:.2f}: "
            f"{first.reason}"
        )
    if result.tried:
        lines.append(f"  taken: {result.tried[-1].reason}")
    for cluster in plan.clusters:
        layers = [i.split(":", 1)[-1].removesuffix(".kernel") for i in cluster.layers]
        shown = ", ".join(layers[:6]) + (f", ... ({len(layers)} layers)" if len(layers) > 6 else "")
        lines.append(f"  {cluster.name}: {shown}")
    return "\n".join(lines)


def ensemble_summary(
    model, state, dataset, batch_size: int, loader: Loader, run_dir: RunDir, log
) -> dict:
    """Diversity, anytime curves (members cheapest first, and each member's early exits,
    against FLOPs) and parameter saving.

    FLOPs are XLA's estimate for one batch of `batch_size` test images; a budgeted
    ensemble pays the composition of its weights once per batch on top.
    """
    eval_step = make_eval_step(model)
    test = dataset.split("test")
    logits = predict(eval_step, state.params, state.model_state, test, batch_size, loader)
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
    if run_dir.writes:
        anytime_figure(curves, run_dir.file("anytime.png"))
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
