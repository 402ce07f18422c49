"""The paper's presets build the authors' bank, cluster for cluster and level for level.

Every expected table below is worked out by hand from the method, not read off the
library:

1. Initial clusters (method.md section 5, the authors' rule). The largest member's shared
   layers are split by kernel kind; a kind with n of its `depth` layers gets
   max(1, round(bins * n / depth)) contiguous depth bins. A WRN-28 has 28 shared layers:
   25 3x3 (the stem and 2 per block in 12 blocks) and 3 1x1 shortcuts, so bins=4 gives
   round(3.57) = 4 3x3 bins and max(1, round(0.43)) = 1 1x1 bin. The 25 3x3 layers split
   7, 6, 6, 6 (earlier bins take the excess); a WRN-16 member's 13 split 4, 3, 3, 3. The 1x1
   bin is numbered first (c0), then the 3x3 bins by depth (c1..c4).
2. Levels (section 3). A cluster's distinct shapes, ordered by size, are its levels; the
   piece of level r holds the entries of its target (out, in) not covered by the previous
   target: (out_r * in_r - min(out_r, out_{r-1}) * min(in_r, in_{r-1})) * kh * kw.
   A level's users are the layers whose shape is that level's or a later one.
3. Templates (section 4, `fill=False`). One template per bank; then 7 round-robin passes
   over the banks in cluster-then-level order, adding a template to a bank with fewer
   templates than users if its piece fits in what is left; then 7 more adding one to every
   bank below 8. The rest is left over.
"""

from __future__ import annotations

from experiments import presets
from experiments.config import initial_plan

# (cluster, level, target (out, in), piece L, users, templates)
ENSEMBLE_BANKS = [
    # c0: the 1x1 shortcuts, 3 per member: 16->4k, 4k->8k, 8k->16k for k = 7, 4, 7, 4
    ("c0", 0, (64, 16), 1024, 12, 8),
    ("c0", 1, (112, 16), 768, 10, 8),
    ("c0", 2, (128, 64), 6400, 8, 8),
    ("c0", 3, (224, 112), 16896, 6, 6),
    ("c0", 4, (256, 128), 7680, 4, 4),
    ("c0", 5, (448, 224), 67584, 2, 2),
    # c1: stem + first 6 3x3 layers of each WRN-28 (7 each), stem + 3 of each WRN-16
    ("c1", 0, (16, 3), 432, 22, 8),
    ("c1", 1, (64, 16), 8784, 18, 8),
    ("c1", 2, (112, 16), 6912, 16, 8),
    ("c1", 3, (64, 64), 27648, 14, 7),
    ("c1", 4, (112, 112), 76032, 7, 7),
    # c2: WRN-28 layers 7-12 (6 each), WRN-16 layers 4-6 (3 each)
    ("c2", 0, (64, 64), 36864, 18, 6),
    ("c2", 1, (128, 64), 36864, 15, 6),
    ("c2", 2, (112, 112), 48384, 13, 6),
    ("c2", 3, (128, 128), 34560, 10, 6),
    ("c2", 4, (224, 112), 96768, 6, 6),
    ("c2", 5, (224, 224), 225792, 4, 4),
    # c3: WRN-28 layers 13-18, WRN-16 layers 7-9
    ("c3", 0, (128, 128), 147456, 18, 6),
    ("c3", 1, (256, 128), 147456, 12, 6),
    ("c3", 2, (224, 224), 193536, 10, 5),
    ("c3", 3, (256, 256), 138240, 4, 4),
    ("c3", 4, (448, 224), 387072, 3, 3),
    ("c3", 5, (448, 448), 903168, 1, 1),
    # c4: WRN-28 layers 19-24, WRN-16 layers 10-12 (the 64k-wide stage only)
    ("c4", 0, (256, 256), 589824, 18, 5),
    ("c4", 1, (448, 448), 1216512, 9, 5),
]
ENSEMBLE_TEMPLATES, ENSEMBLE_LEFTOVER = 17_997_568, 2_432  # of 18,000,000

# WRN-28-10 at 25% of its 36,454,832 shared kernel entries: 9,113,708.
WRN_28_10_BANKS = [
    ("c0", 0, (160, 16), 2560, 3, 5),  # shortcuts 16->160, 160->320, 320->640
    ("c0", 1, (320, 160), 48640, 2, 2),
    ("c0", 2, (640, 320), 153600, 1, 1),
    ("c1", 0, (16, 3), 432, 7, 8),  # stem + the first 3 blocks
    ("c1", 1, (160, 16), 22608, 6, 6),
    ("c1", 2, (160, 160), 207360, 5, 2),
    ("c2", 0, (160, 160), 230400, 6, 1),  # block 4, then blocks 1-2 of the 320 stage
    ("c2", 1, (320, 160), 230400, 4, 1),
    ("c2", 2, (320, 320), 460800, 3, 1),
    ("c3", 0, (320, 320), 921600, 6, 1),  # blocks 3-4 of 320, block 1 of 640
    ("c3", 1, (640, 320), 921600, 2, 1),
    ("c3", 2, (640, 640), 1843200, 1, 1),
    ("c4", 0, (640, 640), 3686400, 6, 1),  # blocks 2-4 of the 640 stage
]
WRN_28_10_TEMPLATES, WRN_28_10_LEFTOVER = 9_111_904, 1_804


def by_hand_pieces(banks, kernel_entries):
    """Step 2: each level's piece from its own target and the previous one."""
    pieces, previous = [], {}
    for cluster, _, (out, fan_in), _, _, _ in banks:
        k = kernel_entries[cluster]
        last = previous.get(cluster)
        covered = min(out, last[0]) * min(fan_in, last[1]) if last else 0
        pieces.append((out * fan_in - covered) * k)
        previous[cluster] = (out, fan_in)
    return pieces


def by_hand_templates(banks, budget, cap=8, passes=7):
    """Step 3: the two round-robin phases over (piece, users), in table order."""
    counts = [1] * len(banks)
    left = budget - sum(b[3] for b in banks)
    below_users = lambda i: counts[i] < banks[i][4]  # noqa: E731
    below_cap = lambda i: counts[i] < cap  # noqa: E731
    for may_grow in (below_users, below_cap):
        for _ in range(passes):
            for i, bank in enumerate(banks):
                if may_grow(i) and bank[3] <= left:
                    counts[i] += 1
                    left -= bank[3]
    return counts, left


def library_banks(plan):
    clusters = {c.name: c for c in plan.clusters}
    return [
        (
            b.cluster,
            b.level,
            clusters[b.cluster].levels[b.level].target,
            b.piece_size,
            b.users,
            b.templates,
        )
        for b in plan.banks
    ]


def check_against_the_authors(name, expected, templates, leftover):
    plan = initial_plan(presets.get(name))
    # the table is consistent with the rules it was worked out from
    kernel_entries = {row[0]: 1 if row[0] == "c0" else 9 for row in expected}
    assert by_hand_pieces(expected, kernel_entries) == [row[3] for row in expected]
    counts, left = by_hand_templates(expected, plan.budget_params)
    assert counts == [row[5] for row in expected]
    assert sum(row[3] * row[5] for row in expected) == templates
    assert left == leftover
    # and the library's plan is that table
    assert library_banks(plan) == expected
    assert [c.spatial for c in plan.clusters] == [(1, 1)] + [(3, 3)] * 4
    assert all(not b.sublayer and b.partial == 0 for b in plan.banks)
    assert (plan.template_params, plan.leftover) == (templates, leftover)
    assert plan.template_params + plan.leftover == plan.budget_params
    return plan


def test_the_authors_readme_ensemble_bank_for_bank():
    plan = check_against_the_authors(
        "cifar100-ensemble-18m", ENSEMBLE_BANKS, ENSEMBLE_TEMPLATES, ENSEMBLE_LEFTOVER
    )
    # the authors build 5 groups and 25 levels for these four members
    assert (len(plan.clusters), len(plan.banks)) == (5, 25)
    assert plan.budget_params == 18_000_000
    assert set(plan.members) == {"wrn-28-7", "wrn-28-4", "wrn-16-7", "wrn-16-4"}


def test_the_paper_wrn_28_10_bank_for_bank():
    plan = check_against_the_authors(
        "cifar100-wrn-28-10-b25", WRN_28_10_BANKS, WRN_28_10_TEMPLATES, WRN_28_10_LEFTOVER
    )
    assert plan.budget_params == int(0.25 * 36_454_832)
    assert sum(layer.size for layer in plan.layers) == 36_454_832
