"""Questions about standard-library code read long before the question (for code models).

``code-default``: "what is the default value of parameter P of function F?" for a function
whose ``def`` lies in the first 5–60 % of the context. Qwen2.5-Coder has read the standard
library, so the default is changed in the context (a counterfactual edit: ``maxlen=80`` →
``maxlen=437``) and only a model that read *this* context answers right. New values are
drawn from split-disjoint ranges (``train`` 11–499, ``test`` 500–999). Metric: contains.

``code-next-line``: the question shows the first lines of a function defined early in the
context and asks for its next line; scored by edit similarity (normalised Levenshtein on the
stripped line). The target is a one-line statement of the body, unique in the context and found
in no module of the other split. Nothing is edited, so the closed-book score says how much of
it the weights already know (docs/tasks.md).

The context is whole standard-library modules (`kvpolicy.eval.stdlib_code`); the replies open
with "The default value is" or "Answer:" and never repeat the function, the parameter or the line.
"""

from __future__ import annotations

import ast
import functools
import random
from collections.abc import Callable
from typing import TypeVar

from kvpolicy.errors import SourceUnavailableError
from kvpolicy.eval.items import Item, Split
from kvpolicy.eval.sources import rng_for
from kvpolicy.eval.stdlib_code import (
    CODE_CHARS_PER_TOKEN,
    MODULES,
    CodeWindow,
    char_offset,
    code_window,
    functions,
    line_offsets,
    module_source,
)

DEFAULT = "code-default"
NEXT_LINE = "code-next-line"
DEPTH_RANGE = (0.05, 0.6)
NEW_DEFAULTS: dict[Split, tuple[int, int]] = {"train": (11, 499), "test": (500, 999)}
DEFAULT_PREFIX = "The default value is"
ANSWER_PREFIX = "Answer:"
MIN_LINE_CHARS = 16
MAX_SHOWN_LINES = 12
WINDOW_TRIES = 50
#: edit similarity of a non-blank line of the context picked at random instead of the answer:
#: 0.155 over 300 draws on ``train`` items (seeds 2000-2059, 8k), with `random_line_similarity`
NEXT_LINE_CHANCE = 0.16


def _chars(length: int) -> int:
    return int(length * CODE_CHARS_PER_TOKEN)


def _in_range(window: CodeWindow, offset: int) -> bool:
    lo, hi = DEPTH_RANGE
    return lo * len(window.context) <= offset <= hi * len(window.context)


#: a found int default: ``(start, end, function, parameter, value)``, offsets into the context
DefaultCandidate = tuple[int, int, str, str, int]
Candidate = TypeVar("Candidate")


def default_candidates(window: CodeWindow) -> list[DefaultCandidate]:
    """``(start, end, function, parameter, value)`` of every int default, as context offsets,
    in functions defined once in the context within `DEPTH_RANGE`."""
    found = []
    for placed in window.modules:
        source = module_source(placed.name)
        offsets = line_offsets(source)
        for qualname, node in functions(placed.name):
            if window.context.count(f"def {node.name}(") != 1:
                continue
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if not (isinstance(default, ast.Constant) and type(default.value) is int):
                    continue
                start = placed.start + char_offset(source, offsets, default.lineno, default.col_offset)
                end = placed.start + char_offset(source, offsets, default.end_lineno or 0, default.end_col_offset or 0)
                if _in_range(window, start) and end <= len(window.context) and start >= 0:
                    found.append((start, end, qualname, arg.arg, default.value))
    return found


def window_with(
    rng: random.Random, split: Split, length: int, find: Callable[[CodeWindow], list[Candidate]]
) -> tuple[CodeWindow, list[Candidate]]:
    """A window and its candidates, redrawing the window (same rng) while it has none."""
    for _ in range(WINDOW_TRIES):
        window = code_window(rng, split, _chars(length))
        candidates = find(window)
        if candidates:
            return window, candidates
    raise SourceUnavailableError(f"no {split} code window of {length} tokens has a usable function")


def make_default(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(DEFAULT, split, seed, length)
    window, candidates = window_with(rng, split, length, default_candidates)
    start, end, function, parameter, old = rng.choice(candidates)
    new = rng.choice([v for v in range(NEW_DEFAULTS[split][0], NEW_DEFAULTS[split][1] + 1) if v != old])
    context = window.context[:start] + str(new) + window.context[end:]
    kind = "method" if "." in function else "function"
    return Item(
        task=DEFAULT,
        split=split,
        seed=seed,
        length=length,
        context=context,
        question=f"In the code above, what is the default value of the parameter `{parameter}` of the {kind} "
        f"`{function}`? Reply with the value only.",
        answer_prefix=DEFAULT_PREFIX,
        answers=(str(new),),
        max_new_tokens=8,
        metric="contains",
        sources=window.sources(split),
        depth=start / len(context),
    )


@functools.cache
def _lines_of(split: Split) -> frozenset[str]:
    return frozenset(line.strip() for name in MODULES[split] for line in module_source(name).splitlines())


def _other(split: Split) -> Split:
    return "test" if split == "train" else "train"


def _next_line_candidates(window: CodeWindow, split: Split) -> list[tuple[int, int, int, str]]:
    """``(def offset, shown start, shown end, answer)``: a function's text from its ``def`` up to
    a one-line body statement (the answer), for statements unique in the context."""
    other = _lines_of(_other(split))
    found = []
    for placed in window.modules:
        source = module_source(placed.name)
        offsets = line_offsets(source)
        lines = source.splitlines()
        for _, node in functions(placed.name):
            first = node.lineno
            def_at = placed.start + offsets[first - 1]
            if not _in_range(window, def_at):
                continue
            for statement in ast.walk(node):
                if statement is node or not isinstance(statement, ast.stmt) or statement.lineno != statement.end_lineno:
                    continue
                if isinstance(statement, ast.Expr | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    continue
                number = statement.lineno
                answer = lines[number - 1].strip()
                if not 1 < number - first <= MAX_SHOWN_LINES or len(answer) < MIN_LINE_CHARS or answer in other:
                    continue
                if window.context.count(answer) != 1 or placed.start + offsets[number] > len(window.context):
                    continue
                found.append((def_at, def_at, placed.start + offsets[number - 1], answer))
    return found


def make_next_line(split: Split, seed: int, length: int) -> Item:
    rng = rng_for(NEXT_LINE, split, seed, length)
    window, candidates = window_with(rng, split, length, lambda w: _next_line_candidates(w, split))
    def_at, shown_start, shown_end, answer = rng.choice(candidates)
    shown = window.context[shown_start:shown_end].rstrip("\n")
    return Item(
        task=NEXT_LINE,
        split=split,
        seed=seed,
        length=length,
        context=window.context,
        question="A function of the code above begins:\n\n" + shown + "\n\nWhat is the next line of this "
        "function, exactly as written above? Reply with that one line only.",
        answer_prefix=ANSWER_PREFIX,
        answers=(answer,),
        max_new_tokens=40,
        metric="edit_sim",
        sources=window.sources(split),
        depth=def_at / len(window.context),
    )


def random_line_similarity(item: Item, rng: random.Random) -> float:
    """Edit similarity of a random non-blank context line to the answer (to estimate chance)."""
    from kvpolicy.eval.metrics import edit_similarity

    lines = [line for line in item.context.splitlines() if line.strip()]
    return edit_similarity(rng.choice(lines), item.answers)
