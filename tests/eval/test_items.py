"""Item generation: deterministic bytes, disjoint splits, valid items for every task."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.items import Item
from kvpolicy.eval.profiles import PROFILES, get_profile
from kvpolicy.eval.tasks import TASKS, build_suite, make_item
from kvpolicy.testing import examples

tasks = st.sampled_from(sorted(TASKS))
seeds = st.integers(min_value=0, max_value=10_000)
lengths = st.sampled_from([512, 1024, 2048])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_bytes(task: str) -> None:
    first, second = make_item(task, "test", 7, 1024), make_item(task, "test", 7, 1024)
    assert first.to_json().encode() == second.to_json().encode()
    assert first.fingerprint == second.fingerprint
    assert make_item(task, "test", 8, 1024).fingerprint != first.fingerprint


@pytest.mark.parametrize("task", sorted(TASKS))
def test_item_is_well_formed(task: str) -> None:
    item = make_item(task, "train", 3, 2048)
    assert item.task == task and item.split == "train" and item.length == 2048
    assert item.answers and all(a.strip() for a in item.answers)
    assert item.metric == TASKS[task].metric
    # context sized in characters at ~4 per token: within 25% of the nominal length
    assert 0.75 * 2048 * 4 < len(item.context) < 1.25 * 2048 * 4
    if item.metric != "likelihood":
        assert item.max_new_tokens > 0 and item.question
    assert Item.from_dict(item.to_dict()) == item


@pytest.mark.parametrize("task", ["needle", "multikey", "variables"])
def test_key_facts_are_in_the_context(task: str) -> None:
    item = make_item(task, "test", 11, 1024)
    for word in item.answers[0].split():
        assert word in item.context


@given(task=tasks, train_seed=seeds, test_seed=seeds, length=lengths)
@settings(max_examples=examples(40), deadline=None)
def test_train_and_test_never_share_material(task: str, train_seed: int, test_seed: int, length: int) -> None:
    train, test = make_item(task, "train", train_seed, length), make_item(task, "test", test_seed, length)
    assert not set(train.sources) & set(test.sources)
    assert train.context != test.context
    assert not set(train.answers) & set(test.answers) or task == "passages"  # passage numbers repeat by design
    # no sentence of the test context appears in the training context
    long_sentences = [s for s in test.context.split(". ") if len(s) > 80]
    assert not any(s in train.context for s in long_sentences[:20])


def test_suite_is_reproducible_and_ordered() -> None:
    profile = get_profile("ci")
    first, second = profile.items("test"), profile.items("test")
    assert [i.fingerprint for i in first] == [i.fingerprint for i in second]
    assert len(first) == len(profile.tasks) * len(profile.lengths) * len(profile.seeds)
    assert len({i.uid for i in first}) == len(first)


def test_full_profile_is_sized_for_five_point_standard_error() -> None:
    full = PROFILES["full"]
    per_task = len(full.lengths) * len(full.seeds)
    assert 0.5 / per_task**0.5 <= 0.05
    assert min(full.lengths) == 1024 and max(full.lengths) >= 4096


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", "test", 0, 1024), "unknown task"),
        (("needle", "dev", 0, 1024), "unknown split"),
        (("needle", "test", 0, 100_000), "outside the supported"),
        (("needle", "test", -1, 1024), "seed must be"),
    ],
)
def test_bad_arguments_get_clear_errors(args: tuple, message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        make_item(*args)


def test_build_suite_rejects_empty_task_list() -> None:
    with pytest.raises(InvalidConfigError, match="no tasks"):
        build_suite([], "test", [1024], [0])
