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
from kvpolicy.errors import CheckpointError
from kvpolicy.rl.model import DecisionTransformer
from kvpolicy.rl.rollout import rollout
from kvpolicy.rl.train import normalised

HIDE_CUE_SUFFIX = ":hide-cue"

#: episodes per variant in a round: one of each cue
ROUND = 2

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


def _episode_row(variant: ControlVariant, seed: int, result: Any, references: dict[str, float]) -> dict[str, Any]:
    """One line of ``results.jsonl``."""
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
    }


def evaluate_control(
    model: DecisionTransformer,
    variants: list[ControlVariant],
    seeds: int,
    out: Path,
    *,
    steps: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every variant on episodes ``0 .. seeds-1`` (resuming from ``out/results.jsonl``) and
    return one summary row per variant. Episodes run in rounds of one cue pair (seeds 2k, 2k+1)
    for every variant, so a run stopped part-way leaves every row with the same episodes;
    each episode is deterministic and independent of the order (policies keep no state between
    attachments)."""
    store = EpisodeStore(Path(out) / "results.jsonl")
    references = model.metadata["reference_returns"]
    policies = {variant.label: variant.build() for variant in variants}
    for first in range(0, seeds, ROUND):  # a cue pair for every variant, then the next pair
        for variant in variants:
            for seed in range(first, min(first + ROUND, seeds)):
                if store.done(variant.label, seed):
                    continue
                result = rollout(
                    model,
                    seed=seed,
                    cue=cue_for(seed),
                    policy=policies[variant.label],
                    steps=steps,
                    hide_cue=variant.hide_cue,
                )
                row = _episode_row(variant, seed, result, references)
                store.add(row)
                log(
                    f"{variant.label} seed {seed} (cue {result.cue:+d}): normalised {row['normalised']:.1f}, "
                    f"final phase {result.final_return:.0f}, cache kept {result.kept_fraction:.1%}, "
                    f"cue kept {'-' if result.cue_kept is None else f'{result.cue_kept:.1%}'}"
                )
    return summarise(store.rows.values(), variants)


def _cue_kept(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over episodes of the cue kept at the final phase's start, overall and per layer (None
    where no episode read it: the bare model, episodes cut short, or rows from older runs)."""
    read = [r for r in runs if r.get("cue_kept") is not None]
    if not read:
        return {"cue_kept": None, "cue_kept_per_layer": None}
    per_layer = np.mean([r["cue_kept_per_layer"] for r in read], axis=0)
    return {"cue_kept": float(np.mean([r["cue_kept"] for r in read])), "cue_kept_per_layer": per_layer.tolist()}


def summarise(rows: Iterable[dict[str, Any]], variants: list[ControlVariant]) -> list[dict[str, Any]]:
    """Per variant: mean ± standard error of the normalised return, mean cache kept, cue recalled."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["policy"], []).append(row)
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
                **_cue_kept(runs),
            }
        )
    return summary


def markdown_table(summary: list[dict[str, Any]], final_start: int | None = None) -> str:
    """The summary as a Markdown table; ``final_start`` names the step the cue kept was read at."""
    at = f"step {final_start}" if final_start is not None else "the final phase's start"
    lines = [
        "| policy | cache kept (time-averaged) | cache kept at the end | normalised return | final phase right "
        f"| cue kept at {at} | cue kept per layer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        cue = row.get("cue_kept")
        layers = row.get("cue_kept_per_layer")
        lines.append(
            f"| {row['policy']} | {row['kept']:.1%} | {row['final_kept']:.1%} | "
            f"{row['normalised']:.1f} ± {row['sem']:.1f} | {row['cue_recalled'] * row['episodes']:.0f}/{row['episodes']} | "
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
