"""The hard task group: no cue in the answer prefix, answers in the (edited) context, sizes, splits."""

from __future__ import annotations

import argparse
import json
import re

import pytest

import kvpolicy
from kvpolicy.cli.eval import add_arguments, run_from_args, suite_items
from kvpolicy.errors import ContextTooLongError, SourceUnavailableError
from kvpolicy.eval import genealogy, stdlib_code
from kvpolicy.eval.closed_book import closed_book
from kvpolicy.eval.code_tasks import DEFAULT, NEXT_LINE
from kvpolicy.eval.items import Item
from kvpolicy.eval.metrics import edit_similarity, levenshtein, score_text
from kvpolicy.eval.profiles import PROFILES
from kvpolicy.eval.prompting import prompt_text
from kvpolicy.eval.run import run_suite
from kvpolicy.eval.sources import CHARS_PER_TOKEN
from kvpolicy.eval.tasks import TASKS, make_item

HARD = ("multikey-hard", "multivalue-hard", "genealogy", "two-hop", DEFAULT, NEXT_LINE)
CODE = (DEFAULT, NEXT_LINE)


@pytest.mark.parametrize("task", HARD)
def test_same_arguments_same_fingerprint(task: str) -> None:
    assert make_item(task, "train", 1000, 4096).fingerprint == make_item(task, "train", 1000, 4096).fingerprint
    assert make_item(task, "train", 1001, 4096).fingerprint != make_item(task, "train", 1000, 4096).fingerprint


@pytest.mark.parametrize("task", HARD)
@pytest.mark.parametrize("seed", [0, 5, 1003])
def test_train_and_test_material_is_disjoint(task: str, seed: int) -> None:
    train, test = make_item(task, "train", seed, 4096), make_item(task, "test", seed, 4096)
    assert train.sources and test.sources
    assert not set(train.sources) & set(test.sources)
    assert not set(train.answers) & set(test.answers)


#: what the question asks about (the key), per task
KEY_IN_QUESTION = {
    "multikey-hard": r"number for (\w+)",
    "multivalue-hard": r"numbers for (\w+)",
    "genealogy": r"father of (\w+)",
    "two-hop": r"vault code of the ([\w ]+)\?",
    DEFAULT: r"parameter `(\w+)`",
    NEXT_LINE: r"begins:\n\n\s*(.+)",
}
NEEDLE_WORDS = ("magic", "special", "locker", "vault", "begat", "def ")


@pytest.mark.parametrize("task", HARD)
@pytest.mark.parametrize("seed", range(6))
def test_the_answer_prefix_gives_no_cue(task: str, seed: int) -> None:
    item = make_item(task, "test", seed, 4096)
    key = re.search(KEY_IN_QUESTION[task], item.question).group(1)
    assert key and key not in item.answer_prefix
    assert not any(word in item.answer_prefix.lower() for word in NEEDLE_WORDS)
    for answer in item.answers:
        for part in answer.split(", "):
            assert part not in item.answer_prefix


@pytest.mark.parametrize("task", ["multikey-hard", "multivalue-hard", "two-hop", "genealogy"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gold_value_is_in_the_context(task: str, split: str) -> None:
    for seed in range(4):
        item = make_item(task, split, seed, 2048)
        for value in item.answers[0].split(", "):
            assert value in item.context


def test_multikey_hard_draws_8_to_16_keys_and_chance_is_their_mean_inverse() -> None:
    counts = {make_item("multikey-hard", "train", s, 2048).context.count("special magic number") for s in range(40)}
    assert min(counts) >= 8 and max(counts) <= 16 and len(counts) > 3
    assert 1 / 16 < TASKS["multikey-hard"].chance < 1 / 8


@pytest.mark.parametrize("split", ["train", "test"])
def test_genealogy_names_are_counterfactual(split: str) -> None:
    invented = set(genealogy.invented_names(split))
    for seed in range(4):
        item = make_item("genealogy", split, seed, 4096)
        facts = genealogy._facts(item.context)
        assert facts and all(father in invented and son in invented for father, son in facts)
        assert item.answers[0] in invented
        son = re.search(r"father of (\w+)\?", item.question).group(1)
        assert f"{item.answers[0]} begat {son}" in item.context or f"begat {son}" in item.context


@pytest.mark.parametrize("split", ["train", "test"])
def test_code_default_is_edited_in_the_context(split: str) -> None:
    for seed in range(4):
        item = make_item(DEFAULT, split, seed, 4096)
        parameter, function = re.search(r"parameter `(\w+)` of the \w+ `([\w.]+)`", item.question).groups()
        name = function.rsplit(".", 1)[-1]
        edited = item.context[item.context.index(f"def {name}(") :].split("):", 1)[0]
        assert re.search(rf"\b{parameter}\s*=\s*{item.answers[0]}\b", edited)
        modules = [s.split(":", 1)[1] for s in item.sources if s.startswith("stdlib-python")]
        original = next(
            stdlib_code.module_source(m)[stdlib_code.module_source(m).index(f"def {name}(") :].split("):", 1)[0]
            for m in modules
            if f"def {name}(" in stdlib_code.module_source(m)
        )
        assert not re.search(rf"\b{parameter}\s*=\s*{item.answers[0]}\b", original)


def test_code_next_line_answer_is_the_line_after_the_shown_ones() -> None:
    for seed in range(4):
        item = make_item(NEXT_LINE, "train", seed, 4096)
        shown = item.question.split("begins:\n\n", 1)[1].rsplit("\n\nWhat is the next line", 1)[0]
        assert item.context.count(item.answers[0]) == 1
        assert item.context[item.context.index(shown) + len(shown) :].lstrip().startswith(item.answers[0])


def test_a_missing_stdlib_module_is_a_named_error(monkeypatch) -> None:
    monkeypatch.setitem(stdlib_code.MODULES, "train", ("no_such_module_xyz",))
    stdlib_code.module_source.cache_clear()
    with pytest.raises(SourceUnavailableError, match="no_such_module_xyz"):
        make_item(DEFAULT, "train", 0, 1024)


@pytest.mark.parametrize("task", HARD)
@pytest.mark.parametrize("length", [4096, 8192])
def test_length_is_within_15_percent(task: str, length: int) -> None:
    per_token = stdlib_code.CODE_CHARS_PER_TOKEN if task in CODE else CHARS_PER_TOKEN
    for seed in range(3):
        item = make_item(task, "train", seed, length)
        assert 0.85 < len(item.context) / per_token / length < 1.15


def test_memory_profiles_hold_validated_tasks_and_easy_profiles_are_unchanged() -> None:
    assert set(PROFILES["hard-qwen"].tasks) <= set(HARD)
    assert not set(PROFILES["memory-smollm2"].tasks) & set(HARD)  # SmolLM2 passed no hard task
    assert max(PROFILES["memory-smollm2"].lengths) <= 6144
    assert not set(PROFILES["full"].tasks) & set(HARD)


def test_closed_book_empties_only_the_context(tiny_tokenizer) -> None:
    item = make_item("two-hop", "test", 3, 1024)
    blank = closed_book(item)
    assert blank.context == "" and blank.question == item.question and blank.answers == item.answers
    text = prompt_text(blank, tiny_tokenizer)
    assert "<|user|>" + item.question in text and "\n\n" not in text
    raw = Item(**{**blank.to_dict(), "template": "raw"})
    assert prompt_text(raw, None) == f"{item.question}\n{item.answer_prefix}"


def test_closed_book_flag_blanks_items_and_labels_the_run(tmp_path, tiny_model, tiny_tokenizer) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--policy", "full", "--tasks", "two-hop", "--lengths", "1024", "--seeds", "2", "--closed-book"]
    args = parser.parse_args([*argv, "--reference-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "out")])
    items = suite_items(args)
    assert len(items) == 2 and all(item.context == "" for item in items)
    args.no_progress = True
    summary = run_from_args(args, kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, out=args.out, label="full")
    assert summary.label == "full+closed-book"
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["closed_book"] is True
    assert (tmp_path / "ref" / "closed-book").is_dir()


def test_an_item_longer_than_the_model_is_refused(tmp_path, tiny_model, tiny_tokenizer) -> None:
    item = make_item("two-hop", "train", 0, 16384)
    with pytest.raises(ContextTooLongError, match="8192 positions"):
        run_suite(
            kvpolicy.build("full"), [item], tiny_model, tiny_tokenizer, out=tmp_path, label="full", model_name="x"
        )
    assert not (tmp_path / "results.jsonl").exists()


def test_edit_similarity() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert edit_similarity("  x = 1  \nmore", ["x = 1"]) == 1.0
    assert edit_similarity("```python\nx = 2", ["x = 1"]) == pytest.approx(0.8)
    assert edit_similarity("", ["abc"]) == 0.0
    assert score_text("edit_sim", "abcd", ["abce"]) == pytest.approx(0.75)
