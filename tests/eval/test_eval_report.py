"""Result store (atomic, resumable), CSV, summaries with standard errors, policy specs."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import sys
from pathlib import Path

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy.errors import CheckpointError, InvalidBudgetError, InvalidConfigError, UnknownComponentError
from kvpolicy.eval.labels import label_for_spec
from kvpolicy.eval.report import (
    ALL,
    length_table,
    markdown_table,
    per_layer_retention,
    standard_error,
    summarise,
    summarise_by_length,
)
from kvpolicy.eval.results import ItemResult, ResultStore, to_csv
from kvpolicy.types import Budget


def result(uid: str, task: str, score: float, policy: str = "p", kept: float = 0.5, length: int = 1024) -> ItemResult:
    return ItemResult(
        uid=uid,
        fingerprint=f"fp-{uid}",
        task=task,
        split="test",
        length=length,
        seed=0,
        policy=policy,
        metric="exact",
        score=score,
        prediction="x",
        answer_logprob=None,
        prompt_tokens=1000,
        tokens_seen=1003,
        kept_fraction=kept,
        per_layer_fraction=(kept, kept / 2),
        kv_bytes=10,
        full_kv_bytes=20,
        policy_seconds=0.1,
        seconds=1.0,
    )


def test_store_appends_atomically_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "results.jsonl"
    store = ResultStore(path)
    store.add(result("a", "needle", 1.0))
    store.add(result("b", "needle", 0.0))
    assert [json.loads(line)["uid"] for line in path.read_text().splitlines()] == ["a", "b"]
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind
    reopened = ResultStore(path)
    assert len(reopened) == 2 and reopened.done("a", "fp-a")
    assert not reopened.done("a", "changed-item")  # a regenerated item is recomputed, not reused
    assert reopened.finished(result("b", "needle", 0.0)).score == 0.0
    assert reopened.finished(attrs.evolve(result("b", "needle", 0.0), fingerprint="changed")) is None
    assert reopened.get("b").score == 0.0


def test_two_stores_on_one_file_lose_nothing(tmp_path: Path) -> None:
    """Two runs sharing a file (e.g. the reference cache) each append; neither overwrites the other."""
    path = tmp_path / "shared.jsonl"
    first, second = ResultStore(path), ResultStore(path)
    first.add(result("a", "needle", 1.0))
    second.add(result("b", "needle", 0.0))
    first.add(result("c", "quote", 0.5))
    assert {r.uid for r in ResultStore(path)} == {"a", "b", "c"}


def _add_many(path: Path, prefix: str) -> None:
    store = ResultStore(path)
    for i in range(40):
        store.add(result(f"{prefix}{i}", "needle", 1.0))


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_processes_appending_to_one_store_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_many, args=(path, prefix)) for prefix in "xyz"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert len(ResultStore(path)) == 120
    assert all(line.startswith("{") and line.endswith("}") for line in path.read_text().splitlines())


def test_store_drops_a_torn_last_line_and_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    store.add(result("a", "needle", 1.0))
    whole = json.dumps(result("b", "needle", 0.0).to_dict())
    with path.open("a") as handle:
        handle.write(whole[: len(whole) // 2])  # killed while writing "b"
    with pytest.warns(UserWarning, match="torn last line"):
        reopened = ResultStore(path)
    assert [r.uid for r in reopened] == ["a"]
    reopened.add(result("c", "needle", 0.0))
    assert [r.uid for r in ResultStore(path)] == ["a", "c"]


def test_store_keeps_a_complete_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(result("a", "needle", 1.0).to_dict()))
    store = ResultStore(path)
    store.add(result("b", "needle", 0.0))
    assert [r.uid for r in ResultStore(path)] == ["a", "b"]


def test_store_names_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"uid": "a"}\n')
    with pytest.raises(CheckpointError, match="results.jsonl:1"):
        ResultStore(path)


def test_csv_has_reference_and_normalised_scores() -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv([result("a", "needle", 0.5)], {"a": result("a", "needle", 1.0)}))))
    assert rows[0]["reference_score"] == "1.0" and float(rows[0]["normalised_score"]) == 0.5
    assert rows[0]["per_layer_fraction"] == "0.5000;0.2500"


def test_standard_error() -> None:
    assert standard_error([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    assert standard_error([1.0]) == 0.0


def test_summary_normalises_by_full_cache_and_pairs_the_difference() -> None:
    runs = [result("a", "needle", 1.0), result("b", "needle", 0.0), result("c", "quote", 0.4)]
    refs = {"a": result("a", "needle", 1.0), "b": result("b", "needle", 1.0), "c": result("c", "quote", 0.8)}
    rows = {r.task: r for r in summarise(runs, refs)}
    assert rows["needle"].score == 0.5 and rows["needle"].reference == 1.0
    assert rows["needle"].normalised == 0.5 and rows["needle"].delta == -0.5
    assert rows["needle"].delta_se == pytest.approx(0.5)
    assert rows["quote"].normalised == pytest.approx(0.5)
    assert rows[ALL].normalised == pytest.approx(0.5) and rows[ALL].n == 3
    assert rows[ALL].normalised_se == pytest.approx(math.sqrt(0.5**2 + 0.0) / 2)
    table = markdown_table(list(rows.values()), title="t")
    assert "| needle | 2 | 50.0 ± 50.0 | 100.0 ± 0.0 | 50.0 ± 50.0% |" in table


def test_summary_by_length_keeps_lengths_apart() -> None:
    runs = [result("a", "needle", 1.0), result("b", "needle", 0.0, length=4096), result("c", "quote", 0.2, length=4096)]
    refs = {uid: result(uid, task, 1.0, length=n) for uid, task, n in [("a", "needle", 1024), ("b", "needle", 4096)]}
    refs["c"] = result("c", "quote", 0.4, length=4096)
    by_length = summarise_by_length(runs, refs)
    assert list(by_length) == [1024, 4096]
    assert by_length[1024][-1].normalised == 1.0
    assert by_length[4096][-1].normalised == pytest.approx((0.0 + 0.5) / 2)
    scores = length_table(by_length, "score")
    assert "| task | 1,024 tokens | 4,096 tokens |" in scores
    assert "| needle | 100.0 ± 0.0 | 0.0 ± 0.0 |" in scores
    assert "| quote | – | 20.0 ± 0.0 |" in scores  # no quote item at 1k: an empty cell, not a zero
    assert "| all | 100.0 ± 0.0% | 25.0 ± 0.0% |" in length_table(by_length, "normalised")


def test_summary_without_references_leaves_normalised_empty() -> None:
    rows = summarise([result("a", "needle", 1.0)], {})
    assert rows[0].normalised is None and rows[-1].normalised is None


def test_per_layer_retention_is_the_mean_per_layer() -> None:
    assert per_layer_retention([result("a", "t", 1.0, kept=0.4), result("b", "t", 1.0, kept=0.8)]) == pytest.approx(
        [0.6, 0.3]
    )


def parse_policy(spec: str, budget: str | None = None) -> kvpolicy.Policy:
    """A policy spec as ``kvpolicy eval --policy SPEC [--budget B]`` reads it."""
    return kvpolicy.build(spec, **({} if budget is None else {"budget": budget}))


def test_policy_specs() -> None:
    assert parse_policy("streaming_llm", "128").budget.tokens == 128
    assert parse_policy('streaming_llm:{"sinks": 2}', "64").protect.sinks == 2
    assert parse_policy("full").schedule.kind == "never"
    assert label_for_spec('streaming_llm:{"sinks": 2}', "25%") == "streaming_llm_sinks_2@25%"


@pytest.mark.parametrize(
    ("spec", "budget", "error", "message"),
    [
        ("streaming_llm:{oops", "64", InvalidConfigError, "not valid JSON"),
        ("streaming_llm:[1]", "64", InvalidConfigError, "must be a JSON object"),
        ('streaming_llm:{"colour": 1}', "64", InvalidConfigError, "accepted: extractor"),
        ("full", "64", InvalidBudgetError, "takes no budget"),
        ("strem_llm", "64", UnknownComponentError, "streaming_llm"),
        ("missing/policy.safetensors", None, InvalidConfigError, "does not exist"),
    ],
)
def test_bad_policy_specs(spec: str, budget: str | None, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_policy(spec, budget)


def test_saved_policy_json_round_trips(tmp_path: Path) -> None:
    policy = parse_policy("streaming_llm", "96")
    path = tmp_path / "mine.json"
    path.write_text(policy.to_json())
    assert parse_policy(str(path)).config == policy.config
    resized = parse_policy(str(path), "64")  # --budget resizes a saved policy, nothing else
    assert resized.budget == Budget(tokens=64)
    assert attrs.evolve(resized.config, budget=policy.budget) == policy.config


def test_a_saved_learned_policy_keeps_its_parameters_at_any_budget(tmp_path: Path) -> None:
    shipped = kvpolicy.build("namm-bam-smollm2")
    path = tmp_path / "namm.safetensors"
    shipped.save(str(path))
    for budget, ratio in (("12.5%", 0.125), ("50%", 0.5)):
        policy = parse_policy(str(path), budget)
        assert policy.budget == Budget(ratio=ratio)
        torch.testing.assert_close(policy.get_flat(), shipped.get_flat(), rtol=0, atol=0)
        assert all(torch.equal(policy.buffers()[k], v) for k, v in shipped.buffers().items())
    with pytest.raises(InvalidBudgetError):
        parse_policy(str(path), "lots")
