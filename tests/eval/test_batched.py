"""Items evaluated as left-padded batches give what each item gives alone through the same
path (batch of one, prompt chunked from its end), and a batch of one decodes as ``generate``."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.results import ResultStore
from kvpolicy.eval.run import run_suite
from kvpolicy.eval.tasks import build_suite


@pytest.fixture(scope="module")
def mixed_items():
    """Four tasks at two lengths: prompts of many different lengths, generated and teacher-forced answers."""
    items = build_suite(["needle", "multikey", "quote", "perplexity"], "test", [256, 512], [0])
    assert len({item.length for item in items}) == 2
    return items


def _same(batched, alone):
    for b, a in zip(batched, alone, strict=True):
        assert (b.uid, b.prediction, b.tokens_seen, b.chunks) == (a.uid, a.prediction, a.tokens_seen, "end")
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert (b.answer_logprob is None) == (a.answer_logprob is None)
        if b.answer_logprob is not None:
            assert b.answer_logprob == pytest.approx(a.answer_logprob, abs=1e-4)
        assert b.kept_fraction == pytest.approx(a.kept_fraction, abs=1e-9) and b.kv_bytes == a.kv_bytes


@pytest.mark.parametrize(
    "spec", ["h2o", "snapkv", "tova", "namm-bam-smollm2", "streaming_llm"], ids=lambda s: s.split(":")[0]
)
def test_a_batch_gives_each_item_what_it_gives_alone(tiny_model, tiny_tokenizer, mixed_items, spec) -> None:
    policy = kvpolicy.build(spec, budget=48)
    run = {"metric": "both", "chunk_size": 96}
    alone = evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, chunk_align="end", **run)
    batched = evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, batch_size=3, **run)
    _same(batched, alone)
    assert any(r.kept_fraction < 0.5 for r in batched), "nothing was evicted: the comparison would be vacuous"


def test_a_batch_of_one_decodes_as_generate(tiny_model, tiny_tokenizer, mixed_items) -> None:
    """With the whole prompt in one chunk, start and end alignment are the same calls: the
    batched path's greedy loop and teacher forcing equal the harness's ``generate`` path."""
    policy = kvpolicy.build("h2o", budget=48)
    run = {"metric": "both", "chunk_size": 4096}
    reference = evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, **run)
    batched = evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, batch_size=4, **run)
    for b, r in zip(batched, reference, strict=True):
        assert (b.prediction, b.tokens_seen, b.kept_fraction) == (r.prediction, r.tokens_seen, r.kept_fraction)
        assert b.answer_logprob == pytest.approx(r.answer_logprob, abs=1e-4)


def test_a_resumed_run_recomputes_results_chunked_otherwise(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    items = build_suite(["needle"], "test", [256], [0, 1])
    policy = kvpolicy.build("streaming_llm", budget=48)
    settings = {"label": "s", "model_name": "tiny", "chunk_size": 96, "reference_dir": tmp_path / "refs"}
    settings["progress"] = False
    run_suite(policy, items, tiny_model, tiny_tokenizer, out=tmp_path / "run", **settings)
    store = ResultStore(tmp_path / "run" / "results.jsonl")
    assert {r.chunks for r in store} == {"start"}
    run_suite(policy, items, tiny_model, tiny_tokenizer, out=tmp_path / "run", batch_size=2, **settings)
    assert {r.chunks for r in ResultStore(tmp_path / "run" / "results.jsonl")} == {"end"}


def test_bad_batch_arguments(tiny_model, tiny_tokenizer, mixed_items) -> None:
    policy = kvpolicy.build("h2o", budget=48)
    with pytest.raises(InvalidConfigError, match="batch_size"):
        evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, batch_size=0)
    with pytest.raises(InvalidConfigError, match="chunk_align"):
        evaluate(policy, mixed_items, tiny_model, tiny_tokenizer, chunk_align="middle")  # type: ignore[arg-type]


def test_cli_refuses_batching_a_shared_prefill(capsys) -> None:
    from kvpolicy.cli import main

    args = ["compare", "--policy", "h2o", "--shared-prefill", "--batch-size", "4", "--out", "unused"]
    assert main(args) != 0
    assert "--shared-prefill" in capsys.readouterr().err
