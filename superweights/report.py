"""What a plan spends, part by part: a dict for code and a table for people."""

from __future__ import annotations

from superweights.plan import Plan


def budget_summary(plan: Plan) -> dict:
    """Totals of every part of the budget, in parameters."""
    kinds: dict[str, int] = {}
    for param in plan.unshared:
        kinds[param.kind] = kinds.get(param.kind, 0) + param.size
    return {
        "budget": plan.budget.describe(),
        "budget_params": plan.budget_params,
        "scope": plan.budget.scope,
        "minimum_budget": plan.minimum_budget,
        "full_size_minimum": plan.full_size_minimum,
        "sublayer_banks": sum(b.sublayer for b in plan.banks),
        "spent": plan.spent,
        "leftover": plan.leftover,
        "reserved_for_unsharing": plan.reserved,
        "utilisation": plan.spent / plan.budget_params,
        "templates": plan.template_params,
        "coefficients": plan.coefficient_params,
        "unshared": kinds,
        "trainable": plan.trainable_params,
        "dense_model": plan.dense_params,
        "fraction_of_dense_model": plan.trainable_params / plan.dense_params,
        "shared_layers": len(plan.layers),
        "clusters": len(plan.clusters),
        "banks": len(plan.banks),
        "cropped_entries": sum(lv.cropped for c in plan.clusters for lv in c.levels),
        "kept_out_of_sharing": {
            f"{p.member}:{p.path}": p.reason for p in plan.unshared if p.reason
        },
    }


def kept_out(plan: Plan, listed: int = 6) -> str:
    """Lines naming the kernels kept per member, grouped by why."""
    reasons: dict[str, list[str]] = {}
    for param in plan.unshared:
        if param.reason:
            shape = "x".join(map(str, param.shape))
            reasons.setdefault(param.reason, []).append(f"{param.member}:{param.path} [{shape}]")
    lines = []
    for reason, names in reasons.items():
        more = f" and {len(names) - listed} more" if len(names) > listed else ""
        lines.append(f"  {reason}: {', '.join(names[:listed])}{more}")
    return "Kernels kept out of sharing\n" + "\n".join(lines) if lines else ""


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def budget_report(plan: Plan) -> str:
    """Per cluster and level: shape, piece and template sizes, blocks, templates, params; totals.

    `geometry` is `full` where a template holds the whole piece (the paper's) and
    `sub-layer` where the piece is built from `blocks` template-sized blocks.
    """
    rows = []
    for cluster in plan.clusters:
        kernel = "x".join(map(str, cluster.spatial)) or "dense"
        for w, level in enumerate(cluster.levels):
            bank = plan.bank[cluster.name, w]
            templates = str(bank.templates)
            if bank.partial:
                templates += f"+{bank.partial}/{bank.piece_size}"
            paper_k = plan.paper_templates[plan.banks.index(bank)] or "-"
            rows.append(
                [
                    cluster.name,
                    kernel,
                    w,
                    "x".join(map(str, level.target)),
                    bank.piece_size,
                    "sub-layer" if bank.sublayer else "full",
                    bank.size,
                    bank.blocks,
                    bank.users,
                    len(bank.groups),
                    templates,
                    paper_k,
                    bank.template_params,
                    bank.coefficient_params,
                    level.cropped,
                ]
            )
    header = [
        "cluster",
        "kernel",
        "level",
        "out x in",
        "L",
        "geometry",
        "T",
        "blocks",
        "layers",
        "coef rows",
        "templates",
        "paper k",
        "template params",
        "coef params",
        "cropped",
    ]
    summary = budget_summary(plan)
    parts = [
        ("templates (banks)", summary["templates"]),
        ("coefficients", summary["coefficients"]),
        *((f"per-member {kind}", n) for kind, n in sorted(summary["unshared"].items())),
        ("total trainable", summary["trainable"]),
    ]
    if plan.reserve_unsharing:
        parts.append(("reserved for unsharing", summary["reserved_for_unsharing"]))
    parts.append(("dense model (no sharing)", summary["dense_model"]))
    reserve = (
        f"reserved {summary['reserved_for_unsharing']:,} for coefficient unsharing, "
        if plan.reserve_unsharing
        else ""
    )
    totals = "\n".join(f"  {name:<26}{n:>14,}" for name, n in parts)
    kept = kept_out(plan)
    return (
        _table(header, rows)
        + (f"\n\n{kept}" if kept else "")
        + "\n\nParameters\n"
        + totals
        + f"\n\nBudget {summary['budget']}: {summary['budget_params']:,}; "
        f"spent {summary['spent']:,} ({summary['utilisation']:.2%}), {reserve}"
        f"left over {summary['leftover']:,}; the smallest feasible budget is "
        f"{summary['minimum_budget']:,}, and full-size templates in every bank need "
        f"{summary['full_size_minimum']:,}.\n"
        f"Trainable parameters are {summary['fraction_of_dense_model']:.2%} of the dense model's; "
        f"{summary['cropped_entries']:,} composed entries are cropped away."
    )
