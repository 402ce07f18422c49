"""Figures of what the search found (PNG, drawn without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from superweights import Plan  # noqa: E402


def _short(layer_id: str) -> str:
    """`'wrn-16-2:stages.1.0.conv1.kernel'` -> `'stages.1.0.conv1'`."""
    return layer_id.split(":", 1)[-1].removesuffix(".kernel")


def similarity_figure(result, path: str | Path) -> Path:
    """One heatmap per initial cluster: the leader's gradient cosines, found clusters framed.

    Layers are grouped by the cluster the search put them in (depth order within
    a cluster); each found cluster is a framed diagonal block, and the strip at
    the left colours the layers by cluster.
    """
    panels = [s for s in result.similarities if s.layers]
    columns = min(len(panels), 3)
    rows = int(np.ceil(len(panels) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(6.5 * columns, 5.6 * rows), squeeze=False, layout="constrained"
    )
    assignment = result.cluster_of
    image = None
    for ax, panel in zip(axes.flat, panels, strict=False):
        found = [assignment[i] for i in panel.layers]
        names = list(dict.fromkeys(found))
        order = sorted(range(len(found)), key=lambda i: (names.index(found[i]), i))
        matrix = panel.array[np.ix_(order, order)]
        codes = np.array([names.index(found[i]) for i in order])
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        for code, name in enumerate(names):
            members = np.flatnonzero(codes == code)
            start, size = members[0] - 0.5, len(members)
            ax.add_patch(
                plt.Rectangle((start, start), size, size, fill=False, lw=2, edgecolor="black")
            )
            ax.text(start + size, start - 0.1, name, fontsize=7, ha="right", va="bottom")
        ax.scatter(
            np.full(len(codes), -1.0),
            np.arange(len(codes)),
            c=codes,
            cmap="tab10",
            vmin=0,
            vmax=9,
            marker="s",
            s=30,
            clip_on=False,
        )
        ax.set_xlim(-1.5, len(codes) - 0.5)
        labels = [_short(panel.layers[i]) for i in order]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(f"initial cluster {panel.cluster}: {len(names)} found", fontsize=9)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="gradient cosine")
    fig.suptitle(
        f"Gradient similarity of the largest member's layers (tau = {result.tau:.2f}); "
        "framed blocks share banks"
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def assignment_figure(plan: Plan, path: str | Path) -> Path:
    """Layer -> cluster across members: one row per member, layers in depth order."""
    members = list(dict.fromkeys(layer.member for layer in plan.layers))
    clusters = [c.name for c in plan.clusters]
    depth = max(layer.depth for layer in plan.layers) + 1
    grid = np.full((len(members), depth), np.nan)
    for layer in plan.layers:
        grid[members.index(layer.member), layer.depth] = clusters.index(
            plan.cluster_of[layer.id].name
        )
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * depth + 2), 1.0 + 0.6 * len(members)))
    cmap = plt.get_cmap("tab20", max(len(clusters), 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(clusters) - 0.5, aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(column, row, clusters[int(value)], ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(members)), members)
    ax.set_xlabel("shared layer, in forward order")
    ax.set_title(f"Cluster of every layer ({len(clusters)} clusters)")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
