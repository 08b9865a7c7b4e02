"""Plot a run from its log: fitness (members, mean, held-out mean) and cache kept over generations."""

from __future__ import annotations

from pathlib import Path

from kvpolicy.atomic import atomic_path
from kvpolicy.errors import CheckpointError
from kvpolicy.evolve import log


def plot_log(log_path: Path, out_path: Path) -> Path:
    """Write a PNG with two panels (fitness; kept fraction of the cache) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [r for r in log.read(Path(log_path)) if r.get("type") == "generation"]
    if not records:
        raise CheckpointError(f"{log_path} holds no generation records to plot")
    gens = [r["generation"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in records:
        top.scatter([r["generation"]] * len(r["member_fitness"]), r["member_fitness"], s=6, color="0.7")
    top.plot(gens, [r["mean_fitness"] for r in records], marker="o", label="mean (train items)")
    held = [(r["generation"], r["heldout_fitness"]) for r in records if r.get("heldout_fitness") is not None]
    if held:
        top.plot(*zip(*held, strict=True), marker="s", label="mean (held-out items)")
    top.axhline(1.0, color="k", linewidth=0.6, linestyle="--", label="full cache")
    top.set_ylabel("fitness (score ÷ full cache)")
    top.legend(loc="best", fontsize=8)
    bottom.plot(gens, [r["mean_kept_fraction"] for r in records], marker="o", label="mean")
    bottom.plot(gens, [sum(r["member_kept_fraction"]) / len(r["member_kept_fraction"]) for r in records],
                marker=".", label="members (average)")  # fmt: skip
    bottom.set_ylabel("cache kept (fraction)")
    bottom.set_xlabel("generation")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="best", fontsize=8)
    for r0, r1 in zip(records, records[1:], strict=False):
        if r1["stage"] != r0["stage"]:
            for axis in (top, bottom):
                axis.axvline(r1["generation"] - 0.5, color="0.5", linewidth=0.6)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out_path)
