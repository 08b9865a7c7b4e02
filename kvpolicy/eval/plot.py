"""The comparison figure: score against MEASURED cache fraction, and per-layer retention.

Policies are compared at the cache size they actually kept (from the integration's
`CacheReport`), not at the budget they were given, since protected tokens, schedules and
thresholds make the two differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvpolicy.atomic import atomic_path


def comparison_figure(runs: Sequence[tuple[str, str, float, float, float, Sequence[float]]], path: str | Path) -> None:
    """Write a PNG. ``runs``: ``(policy, label, kept_fraction, normalised, normalised_se,
    per_layer_retention)``; runs of one policy are joined by a line across budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    policies = list(dict.fromkeys(run[0] for run in runs))
    for policy in policies:
        mine = sorted((r for r in runs if r[0] == policy), key=lambda r: r[2])
        left.errorbar(
            [r[2] * 100 for r in mine],
            [r[3] * 100 for r in mine],
            yerr=[r[4] * 100 for r in mine],
            marker="o",
            capsize=3,
            label=policy,
        )
    left.set_xlabel("cache kept, measured (% of tokens seen)")
    left.set_ylabel("score, % of full cache (mean over tasks)")
    left.set_title("score vs measured cache size")
    left.grid(alpha=0.3)
    left.legend()
    for _, label, _, _, _, layers in runs:
        if layers:
            right.plot(range(len(layers)), [x * 100 for x in layers], marker=".", label=label)
    right.set_xlabel("layer")
    right.set_ylabel("cache kept (%)")
    right.set_title("per-layer retention")
    right.grid(alpha=0.3)
    if len(runs) <= 12:  # beyond that a legend hides the plot; the table names every run
        right.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
