"""The whole NPAS pipeline: search phase, cluster split, final model, unsharing.

search model (initial clusters, one coefficient vector per cluster and level)
  -- train `search_epochs` at the full learning rate
  -- average dL/dW over `gradient_batches` batches
  -- split clusters by gradient conflict under the budget  (search.search_clusters)
final model (found clusters; the largest member's layers own coefficients)
  -- train from scratch (or warm start)
  -- at `unshare_epoch`: split coefficient vectors whose users disagree
     (search.coefficient_gradient_groups), copying values and optimizer state
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

import search
from experiments import pipeline
from experiments.checkpoint import Position
from experiments.data import Dataset
from experiments.settings import SearchConfig
from experiments.train import (
    NO_SAVING,
    LoopConfig,
    OptimConfig,
    Phase,
    Saving,
    TrainState,
    cross_entropy,
    train,
)
from superweights import Budget, BudgetedModel, BudgetError, budgeted
from superweights.budget import SUBLAYER_TEMPLATES


def members_loss(logits: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
    """The training loss of several members: the sum of their mean cross-entropies."""
    return sum(cross_entropy(out, labels) for out in logits.values())


def gradient_batches(dataset: Dataset, batch_size: int, count: int, seed: int):
    """The first `count` training batches shuffled with `seed`, not augmented (an image
    folder's centre crops); whole on every process."""
    return pipeline.sample_batches(dataset.split("train"), batch_size, count, seed)


def warm_start_params(final: BudgetedModel, params, key) -> dict:
    """Fresh final params, with everything the search phase trained that still fits."""
    fresh, _ = final.init(key)
    bank = fresh["bank"]
    for part in ("templates", "partial"):
        for name, value in params["bank"][part].items():
            if name in bank[part] and bank[part][name].shape == value.shape:
                bank[part][name] = value
    return {"bank": bank, "unshared": params["unshared"]}


def unshare_intervention(
    dataset: Dataset, loop: LoopConfig, config: SearchConfig, log: Callable[[str], None], record
) -> Callable[[BudgetedModel, TrainState], tuple[BudgetedModel, TrainState]]:
    """The step that splits disagreeing coefficient vectors mid-training."""

    def intervene(model: BudgetedModel, state: TrainState):
        sample = gradient_batches(dataset, loop.batch_size, config.unshare_batches, loop.seed + 2)
        grads = search.weight_gradients(
            model, state.params, state.model_state, sample, members_loss
        )
        coefficient_grads = search.layer_coefficient_gradients(
            model.plan, state.params["bank"], grads
        )
        coefficients = search.coefficient_gradient_groups(
            model.plan, coefficient_grads, config.unshare_threshold
        )
        try:
            new_plan = search.unshare_plan(model.plan, coefficients)
        except BudgetError as error:  # model scope: the plan already spends the whole budget
            log(f"unsharing skipped: {error}")
            record["unshare"] = {"skipped": str(error)}
            return model, state
        before = sum(len(b.groups) for b in model.plan.banks)
        after = sum(len(b.groups) for b in new_plan.banks)
        log(f"unsharing: {before} coefficient vectors -> {after}")
        record["unshare"] = {"vectors_before": before, "vectors_after": after}
        if new_plan == model.plan:  # nothing split: the same model, its compiled step kept
            return model, state
        record["plan"] = new_plan
        params = dict(state.params)
        params["bank"] = search.expand_coefficients(model.plan, new_plan, state.params["bank"])
        opt_state = search.expand_optimizer_state(
            model.plan, new_plan, state.params, state.opt_state
        )
        new_model = dataclasses.replace(model, plan=new_plan)
        return new_model, state._replace(params=params, opt_state=opt_state)

    return intervene


def unshares(config: SearchConfig, loop: LoopConfig) -> bool:
    """Whether the final training unshares coefficients (and so plans room for it)."""
    return 0 < config.unshare_epoch < loop.epochs


def run_search(
    modules: Mapping[str, Any],
    dataset: Dataset,
    budget: Budget,
    sample_input,
    loop: LoopConfig,
    optim: OptimConfig,
    config: SearchConfig,
    *,
    bins: int = 4,
    rule=None,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
    dtype=None,
    fill: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    saving: Saving = NO_SAVING,
    resume: tuple[BudgetedModel, TrainState, Position] | None = None,
) -> tuple[BudgetedModel, search.SearchResult, TrainState]:
    """Search phase: train the hard-shared model briefly, then split its clusters.

    Its training saves as `saving` says (at its end and when stopped too);
    `resume=(model, state, position)` goes on from such a checkpoint. The
    clustering itself is quick and deterministic, so it is redone from the last
    checkpoint rather than saved.
    """
    if resume is not None:
        searcher, resume_point = resume[0], resume[1:]
    else:
        searcher = budgeted(
            modules,
            budget,
            sample_input=sample_input,
            bins=bins,
            rule=rule,
            shared_coefficients=config.similarity == "gradients",
            sublayer_templates=sublayer_templates,
            dtype=dtype,
            fill=fill,
        )
        resume_point = None
    log(f"search phase: {config.search_epochs} epochs on the initial clusters")
    state, _ = train(
        searcher,
        dataset,
        loop,
        optim,
        phase=Phase(resume=resume_point, stop_after=config.search_epochs, evaluate=False),
        saving=saving,
        progress=progress,
    )
    if config.similarity == "weights":
        signals = search.layer_weights(searcher, state.params)
    else:
        sample = gradient_batches(dataset, loop.batch_size, config.gradient_batches, loop.seed + 1)
        signals = search.weight_gradients(
            searcher, state.params, state.model_state, sample, members_loss
        )
    result = search.search_clusters(
        searcher.plan,
        signals,
        budget,
        tau=config.tau,
        step=config.tau_step,
        reserve_unsharing=unshares(config, loop),
        fill=fill,
        measure=config.similarity,
    )
    return searcher, result, state


def run_npas(
    modules: Mapping[str, Any],
    dataset: Dataset,
    budget: Budget,
    sample_input,
    loop: LoopConfig,
    optim: OptimConfig,
    config: SearchConfig,
    *,
    bins: int = 4,
    rule=None,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
    dtype=None,
    fill: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict], None] | None = None,
    on_search: Callable[[search.SearchResult, BudgetedModel], None] | None = None,
    saving: Saving = NO_SAVING,
    search_saving: Saving = NO_SAVING,
    resume: tuple[BudgetedModel, TrainState, Position] | None = None,
    resumed_unshare: dict | None = None,
    search_resume: tuple[BudgetedModel, TrainState, Position] | None = None,
) -> dict:
    """Search (unless `config.search` is off), then train the final model.

    `dtype` is the dtype the members get their composed kernels in
    (`BudgetedModel.dtype`; None: their own). `on_search(result, final_model)` is
    called as soon as the search is done.
    The final training saves as `saving` says, its checkpoints holding the
    unsharing record too; `resume=(model, state, position)` skips the search
    and continues that final training where it stopped, with
    `resumed_unshare` the record its checkpoint kept. The search phase saves
    as `search_saving` says, and `search_resume` continues it (then the search
    and the final training follow as usual).

    Returns `{"model", "state", "metrics", "search" (SearchResult or None),
    "searcher", "initial_plan", "unshare"}`; `model` is the final one, after
    unsharing.
    """
    result, searcher, initial, resume_point = None, None, None, None
    if resume is not None:
        final, resume_point = resume[0], resume[1:]
    elif not config.search:
        final = budgeted(
            modules,
            budget,
            sample_input=sample_input,
            bins=bins,
            rule=rule,
            sublayer_templates=sublayer_templates,
            dtype=dtype,
            fill=fill,
            reserve_unsharing=unshares(config, loop),
        )
    else:
        searcher, result, search_state = run_search(
            modules,
            dataset,
            budget,
            sample_input,
            loop,
            optim,
            config,
            bins=bins,
            rule=rule,
            sublayer_templates=sublayer_templates,
            dtype=dtype,
            fill=fill,
            progress=progress,
            log=log,
            saving=search_saving,
            resume=search_resume,
        )
        plan = search.searched_plan(
            searcher.plan, result, budget, fill=fill, reserve_unsharing=unshares(config, loop)
        )
        final = dataclasses.replace(searcher, plan=plan)
        log(
            f"search: tau {result.tau:.2f}, {len(searcher.plan.clusters)} initial clusters -> "
            f"{len(result.clusters)}"
        )
        if on_search:
            on_search(result, final)
        if config.warm_start:
            params = warm_start_params(final, search_state.params, jax.random.key(loop.seed))
            initial = (params, search_state.model_state)
    record: dict = {} if resumed_unshare is None else {"unshare": resumed_unshare}
    interventions = {}
    if unshares(config, loop):
        interventions[config.unshare_epoch] = unshare_intervention(
            dataset, loop, config, log, record
        )
    state, metrics = train(
        final,
        dataset,
        loop,
        optim,
        phase=Phase(initial=initial, resume=resume_point, interventions=interventions),
        saving=dataclasses.replace(saving, extra=lambda: {"unshare": record.get("unshare")}),
        on_epoch=on_epoch,
        progress=progress,
    )
    model = dataclasses.replace(final, plan=record["plan"]) if "plan" in record else final
    return {
        "model": model,
        "state": state,
        "metrics": metrics,
        "search": result,
        "searcher": searcher,
        "initial_plan": final.plan,
        "unshare": record.get("unshare"),
    }
