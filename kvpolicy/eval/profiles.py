"""Named suite sizes: ``ci`` for tests (minutes on a laptop CPU), ``full`` for reported numbers.

``full`` has 102 items per task (34 seeds × 1k, 2k and 4k tokens): a 0/1 metric then has a
standard error of at most 0.5/√102 < 5 points per task. It stops at 4k because an 8k item costs
more than a 1k, a 2k and a 4k item together (≈40 s against ≈25 s on one CPU core), so 8k would
multiply the run by about 2.6; 8k items are one flag away (``--lengths 8192``). The full cache and one
budgeted policy take about 100 minutes of one core, under an hour on a 2-core CPU split over two
processes (``--tasks``; docs/evaluation.md).
``small`` (2k tokens, 8 items per task) is the largest run that fits a few minutes per policy.
These three run the ``easy`` group: tasks whose answer prefix repeats the key, so a policy that
keeps the end of the prompt still sees a cue.

The ``hard`` group asks for memory, not a cue (no answer prefix repeats the key; docs/tasks.md).
A task enters a model's memory profile only where it passed the keep rule on validation items
(the full cache ≥ 25 points above chance, a closed-book run ≤ 10 points above it;
``python -m kvpolicy.eval.keep_rule docs/task-validation``). ``hard-qwen`` holds the hard tasks
Qwen2.5-Coder-0.5B passed, at 8k and 16k tokens. SmolLM2-135M passed none of them (below chance
or too near it with a full cache), so ``memory-smollm2`` holds the easy retrieval tasks it does
pass, at 4k and 6k tokens (its contexts stay under ~6.5k of its 8k positions, so KVzip's repeat
pass fits): run ``context-first``, their answer prefix never reaches an eviction pass, and a
policy has to keep the needle without knowing the question.
"""

from __future__ import annotations

import attrs

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.tasks import EASY_TASKS, TASKS, build_suite, check_tasks


@attrs.frozen
class Profile:
    """Which tasks, context lengths and seeds make a suite."""

    name: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    seeds: tuple[int, ...]
    description: str

    def items(
        self,
        split: Split,
        tasks: tuple[str, ...] | None = None,
        lengths: tuple[int, ...] | None = None,
        seeds: tuple[int, ...] | None = None,
    ) -> list[Item]:
        """The suite for ``split``, optionally narrowed or resized."""
        return build_suite(tasks or self.tasks, split, lengths or self.lengths, seeds or self.seeds)


#: Tasks the shipped SmolLM2-135M is at chance on even with a full cache (the ``full`` profile,
#: 102 items each): ``variables`` 52 ± 5 % where picking either chain's value gives 50 %,
#: ``multivalue`` F1 27 ± 2 where a numbered list of three of the six codes at random gives 33, and
#: ``passages`` 9 ± 5 % (34 items at 2k) where chance is 17 %. A task the model cannot do with a full cache says nothing about a policy, so
#: they are left out of the default suites and stay in the registry for larger models
#: (``--tasks``); docs/evaluation.md has the measurements.
AT_CHANCE_ON_SMOLLM2 = ("variables", "multivalue", "passages")
#: one question per context: the older suites' tasks (a shared-context task goes in a context-first profile)
DEFAULT_TASKS = tuple(t for t in EASY_TASKS if t not in AT_CHANCE_ON_SMOLLM2 and TASKS[t].questions_per_context == 1)
#: tasks that passed the keep rule per model on validation items (docs/tasks.md has the table)
MEMORY_SMOLLM2_TASKS: tuple[str, ...] = ("multikey-shared", "needle", "multikey")
HARD_QWEN_TASKS: tuple[str, ...] = ("code-default",)
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("ci", DEFAULT_TASKS, (1024,), (0, 1), "2 items per task at 1k tokens; a minute or two on CPU"),
        Profile(
            "small",
            DEFAULT_TASKS,
            (2048,),
            tuple(range(8)),
            "8 items per task at 2k tokens; a few minutes per policy on an idle CPU",
        ),
        Profile(
            "full",
            DEFAULT_TASKS,
            (1024, 2048, 4096),
            tuple(range(34)),
            "102 items per task at 1k-4k tokens; ~45 min per policy on one CPU core",
        ),
        Profile(
            "memory-smollm2",
            MEMORY_SMOLLM2_TASKS,
            (4096, 6144),
            tuple(range(16)),
            "retrieval SmolLM2-135M passes the keep rule on, for context-first tables: 16 items per task at 4k and 6k",
        ),
        Profile(
            "hard-qwen",
            HARD_QWEN_TASKS,
            (8192, 16384),
            tuple(range(16)),
            "hard tasks for Qwen2.5-Coder-0.5B (--model qwen2.5-coder-0.5b-instruct): 16 items per task at 8k and 16k",
        ),
    )
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise InvalidConfigError(f"unknown profile {name!r}; profiles are {', '.join(PROFILES)}")
    return PROFILES[name]


def parse_tasks(text: str | None) -> tuple[str, ...] | None:
    """``"needle,passages"`` → ("needle", "passages"); None/empty → None (the profile's)."""
    if not text:
        return None
    return check_tasks(t.strip() for t in text.split(",") if t.strip())
