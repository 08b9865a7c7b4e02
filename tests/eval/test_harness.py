"""The harness on a tiny random-weight Llama through the real HF integration: measured cache
figures, teacher-forced likelihood against a plain forward pass, resuming, references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import evaluate, run_item
from kvpolicy.eval.metrics import answer_logprobs
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.references import reference_results
from kvpolicy.eval.results import ResultStore
from kvpolicy.eval.run import RunSummary, run_suite
from kvpolicy.eval.tasks import build_suite, make_item


@pytest.fixture(scope="module")
def items():
    return build_suite(["needle", "perplexity"], "test", [512], [0, 1])


def test_full_cache_keeps_everything_and_random_evicts(tiny_model, tiny_tokenizer, items) -> None:
    full = evaluate(kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, chunk_size=128)
    small = evaluate(kvpolicy.build("random", budget=32), items, tiny_model, tiny_tokenizer, chunk_size=128)
    for f, s in zip(full, small, strict=True):
        assert f.uid == s.uid and f.kept_fraction == pytest.approx(1.0)
        assert s.tokens_seen >= s.prompt_tokens > 400
        assert s.kept_fraction < 0.2  # 32 tokens per head of ~500: measured, not the budget echoed
        assert len(s.per_layer_fraction) == 2 and s.kv_bytes < s.full_kv_bytes
    assert {r.metric for r in full} == {"contains", "likelihood"}
    assert all(0.0 <= r.score <= 1.0 for r in full + small)


def test_teacher_forced_likelihood_matches_a_plain_forward_pass(tiny_model, tiny_tokenizer) -> None:
    item = make_item("quote", "test", 0, 512)
    result = run_item(kvpolicy.build("full"), item, tiny_model, tiny_tokenizer, metric="loglik", chunk_size=100)
    encoded = encode(item, tiny_tokenizer)
    ids = torch.cat([encoded.prompt_ids, encoded.answer_ids], dim=-1)
    with torch.no_grad():
        logits = tiny_model(ids).logits[:, encoded.prompt_tokens - 1 : -1]
    expected = answer_logprobs(logits, encoded.answer_ids).mean().item()
    assert result.answer_logprob == pytest.approx(expected, abs=1e-4)
    assert result.score == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-4)


def test_both_measures_generation_and_likelihood(tiny_model, tiny_tokenizer) -> None:
    item = make_item("needle", "test", 0, 512)
    result = run_item(kvpolicy.build("streaming_llm", budget=64), item, tiny_model, tiny_tokenizer, metric="both")
    assert result.metric == "contains" and result.answer_logprob is not None and result.answer_logprob < 0


def test_evaluate_resumes_from_a_store(tiny_model, tiny_tokenizer, items, tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results.jsonl")
    policy = kvpolicy.build("streaming_llm", budget=64)
    done = store.finished
    first = evaluate(policy, items[:2], tiny_model, tiny_tokenizer, done=done, on_result=store.add)
    computed = []
    second = evaluate(
        policy, items, tiny_model, tiny_tokenizer, done=done, on_result=lambda r: (computed.append(r), store.add(r))
    )
    assert [r.uid for r in computed] == [i.uid for i in items[2:]]  # only the new items ran
    assert second[:2] == first and len(ResultStore(tmp_path / "results.jsonl")) == len(items)


def test_references_are_cached_on_disk(tiny_model, tiny_tokenizer, items, tmp_path: Path) -> None:
    first = reference_results(items, tiny_model, tiny_tokenizer, model_name="tiny", directory=tmp_path)
    files = list(tmp_path.glob("reference-tiny-task-chunk512.jsonl"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = reference_results(items, tiny_model, tiny_tokenizer, model_name="tiny", directory=tmp_path)
    assert again == first and files[0].stat().st_mtime_ns == stamp  # nothing recomputed or rewritten


def _random_run(items, model, tokenizer, tmp_path: Path) -> RunSummary:
    """``random`` at 32 tokens on ``items`` into ``tmp_path / "run"``."""
    return run_suite(
        kvpolicy.build("random", budget=32),
        items,
        model,
        tokenizer,
        out=tmp_path / "run",
        label="random@32",
        model_name="tiny",
        reference_dir=tmp_path / "refs",
        progress=False,
    )


def test_run_suite_writes_results_and_summary(tiny_model, tiny_tokenizer, items, tmp_path: Path) -> None:
    summary = _random_run(items, tiny_model, tiny_tokenizer, tmp_path)
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "results.jsonl",
        "results.csv",
        "summary.json",
        "summary.md",
    }
    assert summary.overall.task == "all" and summary.overall.n == len(items)
    assert summary.overall.kept_fraction < 0.2 and len(summary.per_layer) == 2
    assert RunSummary.load(tmp_path / "run") == summary


def test_run_suite_breaks_scores_down_by_context_length(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    two_lengths = build_suite(["needle"], "test", [256, 512], [0])
    summary = run_suite(
        kvpolicy.build("random", budget=32),
        two_lengths,
        tiny_model,
        tiny_tokenizer,
        out=tmp_path / "run",
        label="random@32",
        model_name="tiny",
        reference_dir=tmp_path / "refs",
        progress=False,
    )
    assert [length for length, _ in summary.by_length] == [256, 512]
    assert all(row.n == 1 and row.kept_fraction < 1.0 for _, row in summary.by_length)
    text = (tmp_path / "run" / "summary.md").read_text()
    assert "score by context length" in text and "| needle | " in text and "512 tokens" in text
    assert RunSummary.load(tmp_path / "run") == summary


def test_bad_harness_arguments(tiny_model, tiny_tokenizer, items) -> None:
    with pytest.raises(InvalidConfigError, match="task, loglik, both"):
        evaluate(kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, metric="bleu")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="chunk_size"):
        evaluate(kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, chunk_size=0)


def test_a_report_over_fewer_items_leaves_the_larger_summary(tiny_model, tiny_tokenizer, items, tmp_path: Path) -> None:
    whole = _random_run(items, tiny_model, tiny_tokenizer, tmp_path)
    csv = (tmp_path / "run" / "results.csv").read_text()
    part = _random_run(items[:1], tiny_model, tiny_tokenizer, tmp_path)
    assert part.overall.n == 1 < len(items)  # what the caller reports on: the items it asked for
    assert RunSummary.load(tmp_path / "run") == whole  # what the folder keeps: the larger summary
    assert (tmp_path / "run" / "results.csv").read_text() == csv
