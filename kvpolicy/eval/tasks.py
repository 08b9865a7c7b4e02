"""The task registry and suite builder: names → item generators, and reproducible suites.

A suite is every ``(task, length, seed)`` combination for one split. Seeds are independent per
split; disjointness of train and test comes from their source material, not from the seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval import (
    code_tasks,
    genealogy,
    hardkeys,
    multikey,
    needle,
    passages,
    perplexity,
    quote,
    shared_context,
    twohop,
    variables,
)
from kvpolicy.eval.items import Item, Split, check_split

ItemMaker = Callable[[Split, int, int], Item]


@attrs.frozen
class Task:
    """A task family: its name, the generator of its items, what it measures, and the score a
    guess gets (``chance``), so a comparison can say how much of the full cache's *skill* a
    policy keeps: ``(score − chance) / (full − chance)``."""

    name: str
    make: ItemMaker
    metric: str
    description: str
    chance: float = 0.0
    #: ``easy``: the answer prefix repeats the key, a cue at the prompt's end; ``hard``: it does not
    group: str = "easy"
    #: items asking about one context (consecutive seeds; `kvpolicy.eval.shared_context`)
    questions_per_context: int = 1


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("needle", needle.make_item, "contains", "one fact hidden at a depth of essays (NIAH)"),
        Task("multikey", multikey.make_multikey, "contains", "one of four same-template needles (RULER MK-NIAH)", 0.25),
        Task("multivalue", multikey.make_multivalue, "f1", "all three values of one key (RULER MV-NIAH)", 1 / 3),
        Task("passages", passages.make_item, "exact", "which passage holds a quoted sentence (LongBench PR)", 1 / 6),
        Task("variables", variables.make_item, "contains", "follow a chain of variable assignments (RULER VT)", 0.5),
        Task("quote", quote.make_item, "rouge_l", "complete a sentence of the document (Rouge-L)"),
        Task("perplexity", perplexity.make_item, "likelihood", "1/perplexity of a KJV continuation"),
        # the `hard` group: no answer prefix repeats the key (docs/tasks.md)
        Task(
            hardkeys.MULTIKEY,
            hardkeys.make_multikey,
            "contains",
            "one of 8-16 same-template needles, answered after a neutral prefix",
            hardkeys.MULTIKEY_CHANCE,
            group="hard",
        ),
        Task(
            hardkeys.MULTIVALUE,
            hardkeys.make_multivalue,
            "f1",
            "the 3-4 values of one key among two other keys' values, no cue",
            hardkeys.MULTIVALUE_CHANCE,
            group="hard",
        ),
        Task(
            genealogy.NAME,
            genealogy.make_item,
            "contains",
            "who fathered whom in renamed KJV genealogies (a fact of the text, not a needle)",
            genealogy.CHANCE,
            group="hard",
        ),
        Task(
            code_tasks.DEFAULT,
            code_tasks.make_default,
            "contains",
            "a counterfactually edited default of a stdlib function read long before",
            group="hard",
        ),
        Task(
            code_tasks.NEXT_LINE,
            code_tasks.make_next_line,
            "edit_sim",
            "the next line of a stdlib function whose first lines are shown",
            code_tasks.NEXT_LINE_CHANCE,
            group="hard",
        ),
        Task(
            shared_context.MULTIKEY,
            shared_context.make_multikey,
            "contains",
            "one of four same-template needles; four questions per context (run context-first)",
            shared_context.CHANCE,
            questions_per_context=shared_context.QUESTIONS_PER_CONTEXT,
        ),
        Task(
            shared_context.NEEDLE,
            shared_context.make_needle,
            "contains",
            "four needles of four templates; four questions per context (run context-first)",
            shared_context.CHANCE,
            questions_per_context=shared_context.QUESTIONS_PER_CONTEXT,
        ),
        Task(
            twohop.NAME,
            twohop.make_item,
            "contains",
            "a late fact naming an early one (two hops)",
            twohop.CHANCE,
            group="hard",
        ),
    )
}

EASY_TASKS = tuple(name for name, task in TASKS.items() if task.group == "easy")
HARD_TASKS = tuple(name for name, task in TASKS.items() if task.group == "hard")

MIN_LENGTH = 256
#: the longest context any shipped model takes (Qwen2.5-Coder: 32k positions); a model with fewer
#: positions (SmolLM2: 8k) is refused an item that does not fit when the run starts (`kvpolicy.eval.run`)
MAX_LENGTH = 32768


def check_tasks(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InvalidConfigError(f"unknown task(s) {', '.join(unknown)}; tasks are {', '.join(TASKS)}")
    if not names:
        raise InvalidConfigError(f"no tasks given; tasks are {', '.join(TASKS)}")
    return names


def make_item(task: str, split: Split, seed: int, length: int) -> Item:
    """The item of ``task`` for ``(split, seed, length)``; same arguments → same bytes."""
    check_tasks([task])
    check_split(split)
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise InvalidConfigError(f"length {length} is outside the supported {MIN_LENGTH}..{MAX_LENGTH} tokens")
    if seed < 0:
        raise InvalidConfigError(f"seed must be >= 0, got {seed}")
    return TASKS[task].make(split, seed, length)


def build_suite(tasks: Sequence[str], split: Split, lengths: Sequence[int], seeds: Sequence[int]) -> list[Item]:
    """Every item of ``tasks × lengths × seeds`` for one split, in a stable order."""
    return [make_item(t, split, s, n) for t in check_tasks(tasks) for n in lengths for s in seeds]
