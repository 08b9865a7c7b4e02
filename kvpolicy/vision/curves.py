"""Accuracy against the cache kept, for every preset, on the shipped digit-video model (zero-shot).

``python -m kvpolicy.vision curves --out docs/vision`` streams the same held-out videos
(`kvpolicy.vision.task.test_videos`) through every registered preset — budgeted ones at each
budget (a share of the video's tokens), budget-free ones (the full cache, the threshold NAMMs) at
their own setting — and writes ``records.jsonl`` (one line per video and policy: the answer, the
cache kept, what it kept of the asked frame), ``summary.json``, ``summary.md`` and
``accuracy_vs_cache.png``. A preset that cannot run on the model is listed with the reason. Learned
presets run zero-shot (made for SmolLM2, transferred as they are). Rerunning resumes: points
already in ``records.jsonl`` are kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import kvpolicy
from kvpolicy.atomic import atomic_path, atomic_write_text
from kvpolicy.errors import KVPolicyError, UnsupportedModelError
from kvpolicy.vision import evaluate, task
from kvpolicy.vision import model as vision_model

DEFAULT_BUDGETS = (0.05, 0.125, 0.25, 0.5)
BATCH = 25
THIRDS = ("first", "middle", "last")


def _policy(name: str, budget: float | None) -> Any:
    policy = kvpolicy.build(name) if budget is None else kvpolicy.build(name, budget=budget)
    policy.transfer = True  # zero-shot: a learned preset runs on this model as shipped, by choice
    return policy


def _points(presets: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float | None]]:
    points = []
    for name in presets:
        if kvpolicy.build(name).needs_budget:
            points += [(name, budget) for budget in budgets]
        else:
            points.append((name, None))
    return points


def _label(name: str, budget: float | None) -> str:
    return name if budget is None else f"{name}@{budget:g}"


def run_point(model: torch.nn.Module, name: str, budget: float | None, videos: list[task.DigitVideo]) -> list[dict]:
    """Per-video records of one preset at one budget."""
    records = []
    for start in range(0, len(videos), BATCH):
        batch = videos[start : start + BATCH]
        answers = evaluate.answer_batch(model, _policy(name, budget), batch)
        for offset, video in enumerate(batch):
            per_frame = answers.kept_per_frame[offset]
            thirds = per_frame.tensor_split(3)
            records.append(
                {
                    "policy": _label(name, budget),
                    "preset": name,
                    "budget": budget,
                    "item": start + offset,
                    "asked": video.asked,
                    "answer": video.answer,
                    "predicted": answers.predicted[offset],
                    "correct": answers.predicted[offset] == video.answer,
                    "kept": round(answers.kept_fraction[offset], 5),
                    "kept_asked_frame": round(float(per_frame[video.asked]), 5),
                    "frames_touched": int((per_frame > 0).sum()),
                    **{f"kept_{part}_third": round(float(t.mean()), 5) for part, t in zip(THIRDS, thirds, strict=True)},
                }
            )
    return records


def _accuracy(records: list[dict]) -> float | None:
    return sum(r["correct"] for r in records) / len(records) if records else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per policy: accuracy ± standard error, mean cache kept, what it kept of the asked frame.

    Rows come grouped by preset, budgets rising (budget-free runs first), whatever order the
    records were written in: a resumed grid reads like one run."""
    rows = []
    for label in dict.fromkeys(r["policy"] for r in records):
        mine = [r for r in records if r["policy"] == label]
        n = len(mine)
        accuracy = sum(r["correct"] for r in mine) / n
        kept_any = [r for r in mine if r["kept_asked_frame"] > 0]
        lost = [r for r in mine if r["kept_asked_frame"] == 0]
        rows.append(
            {
                "policy": label,
                "preset": mine[0]["preset"],
                "budget": mine[0]["budget"],
                "items": n,
                "accuracy": accuracy,
                "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
                # whether anything of the asked frame survived, and what each case scores: separates
                # "the frame was evicted" from "it was kept but too little of it to read"
                "asked_frame_survived": len(kept_any) / n,
                "accuracy_when_survived": _accuracy(kept_any),
                "accuracy_when_lost": _accuracy(lost),
                **{
                    key: sum(r[key] for r in mine) / n
                    for key in ("kept", "kept_asked_frame", "frames_touched") + tuple(f"kept_{p}_third" for p in THIRDS)
                },
            }
        )
    return sorted(rows, key=lambda r: (r["preset"], -1.0 if r["budget"] is None else r["budget"]))


def _table(rows: list[dict], unsupported: dict[str, str]) -> str:
    lines = [
        "| policy | cache kept | accuracy | kept of the asked frame | frames with a token kept | "
        "kept: first / middle / last third | asked frame survived | accuracy when it survived / was lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        thirds = " / ".join(f"{100 * r[f'kept_{p}_third']:.0f}%" for p in THIRDS)
        split = " / ".join(
            "—" if r[key] is None else f"{100 * r[key]:.1f}" for key in ("accuracy_when_survived", "accuracy_when_lost")
        )
        lines.append(
            f"| {r['policy']} | {100 * r['kept']:.1f}% | {100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} | "
            f"{100 * r['kept_asked_frame']:.1f}% | {r['frames_touched']:.1f} | {thirds} | "
            f"{100 * r['asked_frame_survived']:.1f}% | {split} |"
        )
    lines += [f"| {name} | — | not run: {reason} | | | | | |" for name, reason in unsupported.items()]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["kept"])
        axis.plot([100 * r["kept"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=preset)
    axis.axhline(10, color="grey", linestyle=":", label="chance")
    axis.set_xscale("log")
    axis.set_xlabel("video cache kept (%, log scale)")
    axis.set_ylabel("accuracy (%)")
    axis.set_title("digit video, 96 frames (1,536 image tokens): accuracy vs cache kept")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def _load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_curves(
    out: str | Path,
    items: int = 200,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    presets: Sequence[str] | None = None,
    model_path: str | Path | None = None,
    log: Any = print,
) -> list[dict]:
    """Evaluate ``presets`` (default: every registered one) at ``budgets``; write the outputs under ``out``."""
    torch.set_num_threads(1)  # one thread is fastest on a shared CPU (no spinning workers)
    out = Path(out)
    model = vision_model.load(model_path)
    videos = task.test_videos(items)
    names = list(presets) if presets else list(kvpolicy.default_registry().preset_names())
    records_path = out / "records.jsonl"
    records = [r for r in _load_records(records_path) if r["item"] < items]
    done = {(r["preset"], r["budget"]) for r in records}
    unsupported: dict[str, str] = {}
    for name, budget in _points(names, budgets):
        if (name, budget) in done:
            continue
        try:
            point = run_point(model, name, budget, videos)
        except UnsupportedModelError as error:
            unsupported[name] = str(error)
            log(f"{name}: not supported here: {error}")
            continue
        except KVPolicyError as error:
            unsupported[name] = f"{type(error).__name__}: {error}"
            log(f"{_label(name, budget)}: failed: {error}")
            continue
        records += point
        atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
        row = summarize(point)[0]
        log(f"{row['policy']}: accuracy {row['accuracy']:.3f}, cache kept {row['kept']:.3f}")
    rows = summarize(records)
    summary = {"items": items, "frames": task.DEFAULT_FRAMES, "rows": rows, "unsupported": unsupported}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", _table(rows, unsupported) + "\n")
    _plot(rows, out / "accuracy_vs_cache.png")
    log(_table(rows, unsupported))
    return rows
