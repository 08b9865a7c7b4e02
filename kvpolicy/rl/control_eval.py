"""Normalised return against measured cache kept, for every policy, on the cue task.

Each (policy, budget) runs the same episodes — env seeds ``0 .. seeds-1``, cue +1 on even seeds
and -1 on odd ones — and is reported as the mean normalised return (random data = 0, expert
data = 100) with its standard error over episodes, the time-averaged cache kept, and how often
the final phase went the right way (its return > 0: the cue was remembered).

Policies whose preset evicts once after the prompt (SnapKV, the shipped NAMM) never evict again
in a stream with no prompt; here they run every `STREAMING_EVERY` tokens instead, with their
components, weights and budgets unchanged. FastGen is left out: it classifies *token ids*
(special, punctuation), which a Decision Transformer fed embeddings does not have.

Results are appended one line per episode to ``results.jsonl`` (a torn last line from a killed
run is dropped and that episode rerun), so rerunning the command resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import numpy as np

import kvpolicy
from kvpolicy.atomic import atomic_path, atomic_write_text
from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.rl.model import DecisionTransformer
from kvpolicy.rl.rollout import rollouts
from kvpolicy.rl.train import normalised

HIDE_CUE_SUFFIX = ":hide-cue"

#: episodes run together as one batch (see `evaluate_control`)
DEFAULT_BATCH = 10

#: tokens between eviction passes for presets that evict once after the prompt (SnapKV, the shipped NAMM)
STREAMING_EVERY = 64


@attrs.frozen
class ControlVariant:
    """A preset at one budget (``None``: the preset's own); ``hide_cue``: the model never sees
    the cue (the control that measures what the cue is worth, see `rollout`)."""

    preset: str
    budget: int | float | None = None
    hide_cue: bool = False

    @property
    def label(self) -> str:
        label = self.preset
        if self.budget is not None:
            label += "@" + (f"{self.budget * 100:g}%" if isinstance(self.budget, float) else str(self.budget))
        return label + (HIDE_CUE_SUFFIX if self.hide_cue else "")

    @property
    def curve(self) -> str:
        """The plot's curve this variant belongs to."""
        return self.preset + (HIDE_CUE_SUFFIX if self.hide_cue else "")

    @classmethod
    def parse(cls, text: str) -> ControlVariant:
        """``preset``, ``preset@256``, ``preset@25%``, each optionally ending in ``:hide-cue``."""
        hide_cue = text.endswith(HIDE_CUE_SUFFIX)
        text = text.removesuffix(HIDE_CUE_SUFFIX)
        if "@" not in text:
            return cls(text, None, hide_cue)
        preset, budget = text.split("@", 1)
        value = float(budget.rstrip("%")) / 100 if budget.endswith("%") else int(budget)
        return cls(preset, value, hide_cue)

    def build(self) -> kvpolicy.Policy:
        overrides: dict[str, Any] = {}
        if self.budget is not None:
            overrides["budget"] = self.budget
        base = kvpolicy.build(self.preset)
        if base.schedule.kind == "after_prefill":
            overrides["every"] = STREAMING_EVERY
        return kvpolicy.build(self.preset, **overrides)


#: token budgets for the budgeted reference presets, ratios for the presets sized by a ratio
TOKEN_BUDGETS = (128, 512, 1024)
RATIO_BUDGETS = (0.1, 0.25, 0.5)
TOKEN_PRESETS = ("h2o", "tova", "l2", "snapkv", "streaming_llm", "random")
RATIO_PRESETS = ("snapkv-span", "namm-bam-smollm2")


def default_variants(token_budgets: Iterable[int] = TOKEN_BUDGETS, ratios: Iterable[float] = RATIO_BUDGETS) -> list:
    """The full cache, every reference preset at each token budget, the ratio presets at each ratio."""
    variants = [ControlVariant("full"), ControlVariant("full", hide_cue=True)]
    variants += [ControlVariant(p, b) for p in TOKEN_PRESETS for b in token_budgets]
    variants += [ControlVariant(p, float(r)) for p in RATIO_PRESETS for r in ratios]
    return variants


class EpisodeStore:
    """``results.jsonl``: one JSON line per finished episode, appended and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == len(lines):  # torn last line of a killed run: rerun that episode
                    atomic_write_text(self.path, "\n".join(lines[: number - 1]) + "\n")
                    break
                raise CheckpointError(f"{self.path}:{number} is not a JSON line ({exc})") from exc
            self.rows[(row["policy"], row["seed"])] = row

    def done(self, label: str, seed: int) -> bool:
        return (label, seed) in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[(row["policy"], row["seed"])] = row


def cue_for(seed: int) -> int:
    return 1 if seed % 2 == 0 else -1


def _episode_row(
    variant: ControlVariant, seed: int, result: Any, references: dict[str, float], batch: int
) -> dict[str, Any]:
    """One line of ``results.jsonl`` (``batch``: the size of the batch the episode ran in)."""
    return {
        "policy": variant.label,
        "preset": variant.preset,
        "budget": variant.budget,
        "hide_cue": variant.hide_cue,
        "seed": seed,
        "cue": result.cue,
        "return": result.episode_return,
        "final_return": result.final_return,
        "normalised": normalised(result.episode_return, references),
        "kept_fraction": result.kept_fraction,
        "final_kept_fraction": result.final_kept_fraction,
        "cue_kept": result.cue_kept,
        "cue_kept_per_layer": None if result.cue_kept_per_layer is None else list(result.cue_kept_per_layer),
        "batch": batch,
    }


def evaluate_control(
    model: DecisionTransformer,
    variants: list[ControlVariant],
    seeds: int,
    out: Path,
    *,
    batch: int = DEFAULT_BATCH,
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every variant on episodes ``0 .. seeds-1`` (resuming from ``out/results.jsonl``) and
    return one summary row per variant.

    Episodes run as the rows of one batch (`rollouts`), ``batch`` consecutive seeds at a time:
    block ``0 .. batch-1`` for every variant, then the next block, so a run stopped part-way
    leaves every row with the same episodes. A row's result does not depend on the others in its
    batch, but batched arithmetic differs from a batch of one in the last bits, which the task's
    dynamics amplify: an episode is reproducible given its batch size (``batch`` in its record),
    and a block with an episode missing is rerun whole so that the missing one gets it too.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidConfigError(f"batch must be a whole number >= 1, got {batch!r}")
    store = EpisodeStore(Path(out) / "results.jsonl")
    references = model.metadata["reference_returns"]
    policies = {variant.label: variant.build() for variant in variants}
    for first in range(0, seeds, batch):
        block = list(range(first, min(first + batch, seeds)))
        for variant in variants:
            if all(store.done(variant.label, seed) for seed in block):
                continue
            results = rollouts(
                model,
                seeds=block,
                cues=[cue_for(seed) for seed in block],
                policy=policies[variant.label],
                steps=steps,
                hide_cue=variant.hide_cue,
            )
            for seed, result in zip(block, results, strict=True):
                if not store.done(variant.label, seed):
                    store.add(_episode_row(variant, seed, result, references, len(block)))
            log(_block_line(variant, block, results, references))
    return summarise(store.rows.values(), variants)


def _block_line(variant: ControlVariant, block: list[int], results: list[Any], references: dict[str, float]) -> str:
    scores = [normalised(r.episode_return, references) for r in results]
    cue = [r.cue_kept for r in results if r.cue_kept is not None]
    return (
        f"{variant.label} seeds {block[0]}-{block[-1]}: normalised {np.mean(scores):.1f}, final phase right "
        f"{sum(r.final_return > 0 for r in results)}/{len(results)}, cache kept "
        f"{np.mean([r.kept_fraction for r in results]):.1%}, cue kept {np.mean(cue) if cue else float('nan'):.1%}"
    )


def _cue_kept(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over episodes of the cue kept at the final phase's start, overall and per layer (None
    where no episode read it: the bare model, episodes cut short, or rows from older runs)."""
    read = [r for r in runs if r.get("cue_kept") is not None]
    if not read:
        return {"cue_kept": None, "cue_kept_per_layer": None}
    per_layer = np.mean([r["cue_kept_per_layer"] for r in read], axis=0)
    return {"cue_kept": float(np.mean([r["cue_kept"] for r in read])), "cue_kept_per_layer": per_layer.tolist()}


def _paired(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Normalised return minus the full cache's on the same env seeds (same cue, same start):
    mean ± standard error of the per-seed differences, which removes the spread the seeds share."""
    full = {r["seed"]: r["normalised"] for r in reference}
    differences = np.array([r["normalised"] - full[r["seed"]] for r in runs if r["seed"] in full])
    if len(differences) == 0:
        return {"vs_full": None, "vs_full_sem": None, "paired_episodes": 0}
    sem = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else 0.0
    return {"vs_full": float(differences.mean()), "vs_full_sem": sem, "paired_episodes": len(differences)}


def _right_by_cue(runs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per cue: [episodes whose final phase went the right way, episodes]."""
    return {
        f"{cue:+d}": [sum(r["final_return"] > 0 for r in runs if r["cue"] == cue), sum(r["cue"] == cue for r in runs)]
        for cue in (1, -1)
    }


def summarise(rows: Iterable[dict[str, Any]], variants: list[ControlVariant]) -> list[dict[str, Any]]:
    """Per variant: mean ± standard error of the normalised return, its paired difference to the
    full cache, mean cache kept, final phase right (overall and per cue), cue kept."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["policy"], []).append(row)
    reference = by_label.get(ControlVariant("full").label, [])
    summary = []
    for variant in variants:
        runs = by_label.get(variant.label, [])
        if not runs:
            continue
        scores = np.array([r["normalised"] for r in runs])
        sem = float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0
        summary.append(
            {
                "policy": variant.label,
                "preset": variant.preset,
                "curve": variant.curve,
                "budget": variant.budget,
                "episodes": len(runs),
                "normalised": float(scores.mean()),
                "sem": sem,
                "kept": float(np.mean([r["kept_fraction"] for r in runs])),
                "final_kept": float(np.mean([r["final_kept_fraction"] for r in runs])),
                "cue_recalled": float(np.mean([r["final_return"] > 0 for r in runs])),
                "right_by_cue": _right_by_cue(runs),
                **_paired(runs, reference),
                **_cue_kept(runs),
            }
        )
    return summary


def _signed(value: float | None, sem: float | None) -> str:
    return "–" if value is None or sem is None else f"{value:+.1f} ± {sem:.1f}"


def markdown_table(summary: list[dict[str, Any]], final_start: int | None = None) -> str:
    """The summary as a Markdown table; ``final_start`` names the step the cue kept was read at."""
    at = f"step {final_start}" if final_start is not None else "the final phase's start"
    lines = [
        "| policy | cache kept (time-averaged) | cache kept at the end | normalised return | vs full (paired) "
        f"| final phase right | cue kept at {at} | cue kept per layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        cue = row.get("cue_kept")
        layers = row.get("cue_kept_per_layer")
        lines.append(
            f"| {row['policy']} | {row['kept']:.1%} | {row['final_kept']:.1%} | "
            f"{row['normalised']:.1f} ± {row['sem']:.1f} | {_signed(row.get('vs_full'), row.get('vs_full_sem'))} | "
            f"{row['cue_recalled'] * row['episodes']:.0f}/{row['episodes']} | "
            f"{'–' if cue is None else f'{cue:.1%}'} | "
            f"{'–' if layers is None else ' / '.join(f'{x:.0%}' for x in layers)} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Normalised return against cache kept, one curve per preset, standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    presets: dict[str, list[dict[str, Any]]] = {}
    for row in summary:
        presets.setdefault(row.get("curve", row["preset"]), []).append(row)
    for preset, rows in presets.items():
        rows = sorted(rows, key=lambda r: r["kept"])
        x = [100 * r["kept"] for r in rows]
        y = [r["normalised"] for r in rows]
        err = [r["sem"] for r in rows]
        if preset == "full":
            style = {"marker": "*", "markersize": 14, "color": "black", "linestyle": "none"}
        elif preset == "full" + HIDE_CUE_SUFFIX:
            style = {"marker": "X", "markersize": 11, "color": "black", "markerfacecolor": "white", "linestyle": "none"}
        else:
            style = {"marker": "o"}
        ax.errorbar(x, y, yerr=err, label=preset, capsize=3, **style)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("cache kept, time-averaged (% of the full cache, log scale)")
    ax.set_ylabel("normalised return (random 0, expert data 100)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
