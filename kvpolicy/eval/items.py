"""The evaluation item: one prompt with its gold answers, generated deterministically from a seed.

An item is plain data (frozen attrs, JSON round trip) so a suite is reproducible byte for byte:
the same ``(task, split, length, seed)`` always yields the same item. ``split`` is ``train``
(material a policy may be evolved on) or ``test`` (material it is reported on); the two are built
from disjoint source texts and disjoint needle vocabularies, so they never overlap.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import attrs

from kvpolicy.errors import InvalidConfigError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
Template = Literal["chat", "raw"]
#: ``validation`` items are train material from this seed on, which no evolution config draws
VALIDATION_SEED = 1000


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise InvalidConfigError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return split  # type: ignore[return-value]


@attrs.frozen
class Item:
    """One long-context prompt and how to score the answer.

    Attributes
    ----------
    task, split, seed, length:
        What generated it: task name, ``train``/``test``, seed and nominal context length in
        tokens (the measured count is recorded by the harness).
    context, question, answer_prefix:
        The prompt is ``context`` then ``question`` (one user turn of the chat template when
        ``template == "chat"``; plain text for ``raw``), then ``answer_prefix`` opening the
        model's reply so that a small model answers in the expected form.
    answers:
        Gold answers; the metric takes the best match over them. ``answers[0]`` is the one
        whose teacher-forced log-likelihood is measured.
    max_new_tokens:
        Greedy decoding budget; 0 for tasks scored by likelihood alone (perplexity).
    metric:
        Name of the metric in `kvpolicy.eval.metrics.METRICS`.
    sources:
        Identifiers of the source material used (essay titles, Bible books, needle pool), so
        that split disjointness can be checked.
    depth:
        Where the key fact sits in the context (0 = start, 1 = end), when the task has one.
    """

    task: str
    split: Split = attrs.field(validator=attrs.validators.in_(SPLITS))
    seed: int
    length: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...] = attrs.field(converter=tuple)
    max_new_tokens: int
    metric: str
    template: Template = "chat"
    sources: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    depth: float | None = None

    @property
    def uid(self) -> str:
        """Stable identifier, unique within a suite."""
        return f"{self.task}/{self.split}/{self.length}/{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(attrs.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @property
    def fingerprint(self) -> str:
        """sha256 of the item's JSON: two items with the same fingerprint are byte-identical."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def context_id(self) -> str:
        """sha256 (16 hex digits) of the context: the items asking about one context share it."""
        return hashlib.sha256(self.context.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidConfigError(f"not an evaluation item: {exc}") from exc
