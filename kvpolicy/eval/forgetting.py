"""What a policy forgets: the share of each token class that a compressed context still holds.

NAMM's paper reports that its memory drops whitespace and boilerplate in code first. This
measures it for any policy: each item's context is prefilled and compressed exactly as under
the ``context-first`` protocol (chunked, the policy's passes between chunks and after the
context, no question), then the cache is read (`kvpolicy.integrations.hf.report.kept_share`):
for each context token, the share of (layer, KV head) pairs that still hold it. Tokens are put
in classes by their text (`token_class`); a class's *kept share* is the mean over its tokens.
At a budget of 25 %, a class kept at 5 % is evicted first, one kept at 60 % is favoured.

``answer`` marks the context tokens that spell the gold answer where the context holds it
(the needle's value), so the table also says whether the answer itself survived.

``python -m kvpolicy.eval.forgetting --model qwen2.5-coder-0.5b-instruct --task code-default \\
--length 8192 --seeds 0 1 2 3 --presets namm-bam-smollm2 snapkv kvzip --budget 0.25 --out DIR``
writes ``records.jsonl`` (one line per item × policy: class shares and the kept share of every
layer's KV heads), ``summary.md``, ``forgetting.png`` (by class) and ``heads.png`` (by layer and
head: where a self-sized memory puts its cache).
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import kvpolicy
from kvpolicy.atomic import atomic_path, atomic_write_text
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import VALIDATION_SEED, Item, check_split
from kvpolicy.eval.labels import label_for_spec
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.tasks import check_tasks, make_item
from kvpolicy.integrations.hf.report import kept_share

#: token classes, in table order; code contexts use ``keyword``/``identifier``, text ``word``
CLASSES: tuple[str, ...] = (
    "answer", "special", "indentation", "whitespace", "punctuation", "number", "keyword", "identifier", "word", "other",
)  # fmt: skip
CODE_TASKS = ("code-default", "code-next-line")
_NUMBER = re.compile(r"^[0-9][0-9_.]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PUNCTUATION = frozenset(string.punctuation)


def token_class(piece: str, *, code: bool, after_newline: bool) -> str:
    """The class of one token's text. Whitespace that opens a line (a run of spaces or tabs after a
    newline, or a token holding the newline and the spaces after it) is ``indentation``."""
    core = piece.strip()
    if not core:
        tail = piece.rsplit("\n", 1)
        opens_line = (len(tail) == 2 and tail[1] != "") or (after_newline and "\n" not in piece)
        return "indentation" if opens_line and piece.strip("\n") != "" else "whitespace"
    if _NUMBER.match(core):
        return "number"
    if _NAME.match(core):
        if code:
            return "keyword" if keyword.iskeyword(core) or keyword.issoftkeyword(core) else "identifier"
        return "word"
    if all(ch in _PUNCTUATION for ch in core):
        return "punctuation"
    return "other"


def classify(ids: Sequence[int], tokenizer: Any, *, code: bool, answer: str | None = None) -> list[str]:
    """One class per token id. Offsets come from decoding the tokens one by one, so any tokenizer
    works; ``answer`` (a gold answer) marks every token overlapping one of its occurrences."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    pieces = [tokenizer.decode([int(i)]) for i in ids]
    classes: list[str] = []
    after_newline = True
    for token_id, piece in zip(ids, pieces, strict=True):
        classes.append(
            "special" if int(token_id) in special else token_class(piece, code=code, after_newline=after_newline)
        )
        if piece:
            after_newline = piece.endswith("\n")
    if answer and answer.strip():
        text = "".join(pieces)
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        for match in re.finditer(re.escape(answer.strip()), text):
            for t in range(len(pieces)):
                if starts[t] < match.end() and starts[t + 1] > match.start():
                    classes[t] = "answer"
    return classes


@attrs.frozen
class Compressed:
    """One item's context compressed by one policy: per token class ``(tokens, kept share)``, the
    share of the cache kept overall, and the kept share of each layer's KV heads (``[]`` for a layer
    the policy does not manage)."""

    item: str
    policy: str
    classes: dict[str, tuple[int, float]]
    cache_kept: float
    head_kept: list[list[float]]

    def as_record(self) -> dict[str, Any]:
        return attrs.asdict(self)


def compress_context(
    model: Any, policy: Any, context_ids: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, list[list[float]]]:
    """``([tokens], head_kept)``: the share of (layer, KV head) pairs holding each context token
    after the context alone was prefilled and compressed by ``policy`` (the ``context-first``
    protocol's compression: the same `Handle.feed` of the context, then nothing), and each
    layer's per-head share of the context kept."""
    with policy.attach(model) as handle:
        handle.feed(context_ids, chunk_size, last_only=True)
        report = handle.report()
        share = kept_share(handle.cache, context_ids.shape[1], report.evicting_layers)[0]
    evicting = set(report.evicting_layers) or set(range(len(report.kept)))
    heads = [[k / report.seen for k in layer] if i in evicting else [] for i, layer in enumerate(report.kept)]
    return share, heads


def compress_item(model: Any, tokenizer: Any, item: Item, label: str, policy: Any, chunk_size: int = 512) -> Compressed:
    """What one policy keeps of one item's context, by token class and by layer and head."""
    encoded = encode(item, tokenizer)
    if encoded.context_tokens < 1:
        raise InvalidConfigError(f"item {item.uid} has no context to compress")
    context = encoded.prompt_ids[:, : encoded.context_tokens]
    answer = item.answers[0] if item.answers and item.answers[0].strip() in item.context else None
    classes = classify(context[0].tolist(), tokenizer, code=item.task in CODE_TASKS, answer=answer)
    policy.bind_tokenizer(tokenizer)  # KVzip writes its repeat prompt with the model's tokenizer
    share, heads = compress_context(model, policy, context, chunk_size)
    by_class = {}
    for name in CLASSES:
        mask = torch.tensor([c == name for c in classes])
        if mask.any():
            by_class[name] = (int(mask.sum()), float(share[mask].mean()))
    return Compressed(item.uid, label, by_class, float(share.mean()), heads)


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy × class: tokens over the items, kept share weighted by tokens, and the share of
    the context the class makes up."""
    rows: dict[tuple[str, str], list[float]] = {}
    totals: dict[str, int] = {}
    cache: dict[str, list[float]] = {}
    for r in records:
        cache.setdefault(r["policy"], []).append(r["cache_kept"])
        for name, (tokens, kept) in r["classes"].items():
            cell = rows.setdefault((r["policy"], name), [0, 0.0])
            cell[0] += tokens
            cell[1] += kept * tokens
            totals[r["policy"]] = totals.get(r["policy"], 0) + tokens
    out = [
        {
            "policy": policy,
            "token_class": name,
            "tokens": int(tokens),
            "of_context": tokens / totals[policy],
            "kept": kept / tokens,
            "cache_kept": sum(cache[policy]) / len(cache[policy]),
        }
        for (policy, name), (tokens, kept) in rows.items()
    ]
    return sorted(out, key=lambda r: (r["policy"], CLASSES.index(r["token_class"])))


def head_map(records: Sequence[dict[str, Any]], policy: str) -> torch.Tensor:
    """``[layers, heads]``: a policy's kept share per layer and KV head, mean over its items (NaN
    for a layer it does not manage)."""
    maps = []
    for r in records:
        if r["policy"] == policy:
            width = max(len(layer) for layer in r["head_kept"])
            maps.append(torch.tensor([layer if layer else [float("nan")] * width for layer in r["head_kept"]]))
    return torch.stack(maps).mean(0)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per class, one column per policy (kept share, %), classes' share of the context."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["policy"], r["token_class"]): r for r in rows}
    names = [c for c in CLASSES if any((p, c) in by for p in policies)]
    first = {r["token_class"]: r for r in rows if r["policy"] == policies[0]}
    cache = {p: next(r["cache_kept"] for r in rows if r["policy"] == p) for p in policies}
    lines = [
        "| token class | of the context | " + " | ".join(policies) + " |",
        "|---|---:|" + "---:|" * len(policies),
        "| *all (cache kept)* | 100 % | " + " | ".join(f"{100 * cache[p]:.1f} %" for p in policies) + " |",
    ]
    for name in names:
        cells = [f"{100 * by[(p, name)]['kept']:.1f} %" if (p, name) in by else "—" for p in policies]
        share = f"{100 * first[name]['of_context']:.1f} %" if name in first else "—"
        lines.append(f"| {name} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    names = [c for c in CLASSES if any(r["token_class"] == c for r in rows)]
    by = {(r["policy"], r["token_class"]): r["kept"] for r in rows}
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(policies))
    for k, policy in enumerate(policies):
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(names))]
        axis.bar(xs, [100 * by.get((policy, n), 0.0) for n in names], width, label=policy)
    axis.set_xticks(range(len(names)), names, rotation=20)
    axis.set_ylabel("share of the class kept (%)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def plot_head_maps(records: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One heat map per policy: the share of the context each layer's KV heads keep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in records))
    figure, axes = plt.subplots(1, len(policies), figsize=(2.6 * len(policies) + 1, 5), squeeze=False)
    for axis, policy in zip(axes[0], policies, strict=True):
        shares = head_map(records, policy)
        image = axis.imshow(100 * shares.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=100)
        axis.set_title(policy, fontsize=9)
        axis.set_xlabel("KV head")
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label="context kept (%)")
    figure.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def layer_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: each policy's kept share per layer (mean over heads), min and max over heads."""
    policies = list(dict.fromkeys(r["policy"] for r in records))
    maps = {p: head_map(records, p) for p in policies}
    layers = max(m.shape[0] for m in maps.values())
    lines = ["| layer | " + " | ".join(policies) + " |", "|---:|" + "---:|" * len(policies)]
    for layer in range(layers):
        cells = []
        for p in policies:
            row = maps[p][layer]
            cells.append(
                "—"
                if bool(row.isnan().all())
                else f"{100 * float(row.mean()):.0f} ({100 * float(row.min()):.0f}–{100 * float(row.max()):.0f})"
            )
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(
    model_name: str,
    task: str,
    length: int,
    seeds: Sequence[int],
    presets: Sequence[str],
    budget: float,
    out: Path,
    split: str = "validation",
    chunk_size: int = 512,
) -> list[dict[str, Any]]:
    """Every preset on every item; resumable (an item × policy already in ``records.jsonl`` is skipped)."""
    from kvpolicy.models import load_named_model

    check_tasks([task])
    if split == "validation":  # train material no evolution pool draws, as in `kvpolicy eval --split validation`
        split, seeds = "train", [VALIDATION_SEED + s for s in seeds]
    split = check_split(split)
    if split == "test":
        raise InvalidConfigError(
            "forgetting tables read train or validation items; the test split is scored only through the frozen "
            "plan (kvpolicy compare --split test)"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    records = _done(path)
    done = {(r["item"], r["policy"]) for r in records}
    model, tokenizer = load_named_model(model_name)
    for seed in seeds:
        item = make_item(task, split, seed, length)
        for name in presets:
            policy = kvpolicy.build(name, budget=budget) if kvpolicy.build(name).needs_budget else kvpolicy.build(name)
            policy.transfer = True  # zero-shot on another model: a learned preset runs as shipped, by choice
            label = label_for_spec(name, f"{budget:g}" if policy.needs_budget else None)
            if (item.uid, label) in done:
                continue
            records.append(compress_item(model, tokenizer, item, label, policy, chunk_size).as_record())
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    rows = summarize(records)
    header = f"{task} at {length} tokens, {model_name}, {split} seeds {list(seeds)}, budget {budget:g}\n\n"
    per_layer = "\nContext kept per layer, mean over KV heads (min–max over heads), %:\n\n" + layer_table(records)
    atomic_write_text(out / "summary.md", header + table(rows) + per_layer)
    plot(rows, out / "forgetting.png", f"what each policy keeps: {task}, {model_name}, {length} tokens")
    plot_head_maps(records, out / "heads.png", f"context kept per layer and KV head: {task}, {model_name}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpolicy.eval.forgetting", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="counted from 1,000 in validation")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["namm-bam-smollm2", "snapkv", "kvzip"],
        help="preset names or saved policy files",
    )
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = run(
        args.model, args.task, args.length, args.seeds, args.presets, args.budget, args.out, args.split, args.chunk_size
    )
    print(table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
