"""``compare --shared-prefill``: one recorded prompt per item serves every policy and the full-cache
reference, with the numbers each policy gets alone when its first eviction pass comes after the
whole prompt."""

from __future__ import annotations

import pytest

import kvpolicy
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.many_policies import evaluate_many
from kvpolicy.eval.references import reference_path
from kvpolicy.eval.results import ResultStore
from kvpolicy.eval.tasks import build_suite


@pytest.mark.parametrize("metric", ["task", "loglik"])
def test_shared_results_equal_each_policy_run_alone(tiny_model, tiny_tokenizer, tmp_path, metric) -> None:
    items = build_suite(["needle", "perplexity"], "test", [384], [0, 1])
    policies = {
        "snapkv": kvpolicy.build("snapkv", budget="25%"),
        "h2o": kvpolicy.build("h2o", budget=48),
        "tova": kvpolicy.build("tova", budget="25%"),
        "l2": kvpolicy.build("l2", budget="50%", span=5, skip_layers=()),  # the tiny model has 2 layers
        "kvzip": kvpolicy.build("kvzip", budget="25%"),  # its repeat pass runs when the prefill is prepared
        "kvzip-threshold": kvpolicy.build("kvzip-threshold"),  # ... once, shared with kvzip's
    }
    runs = [(label, policy, tmp_path / label) for label, policy in policies.items()]
    prompts = evaluate_many(
        runs, items, tiny_model, tiny_tokenizer, model_name="tiny", metric=metric, chunk_size=128,
        reference_dir=tmp_path / "ref", progress=False,
    )  # fmt: skip
    assert prompts == len(items)  # one prompt per item for six policies and the reference
    for label, policy in policies.items():
        stored = {r.uid: r for r in ResultStore(tmp_path / label / "results.jsonl")}
        # alone: the whole prompt in one forward call, so the first eviction pass comes after it
        alone = evaluate(policy, items, tiny_model, tiny_tokenizer, metric=metric, chunk_size=100_000)
        for want in alone:
            got = stored[want.uid]
            assert got.kept_fraction < 0.9
            assert got.kept_fraction == pytest.approx(want.kept_fraction)
            assert got.score == pytest.approx(want.score, abs=1e-4)
            assert got.prediction == want.prediction
    references = {r.uid: r for r in ResultStore(reference_path("tiny", metric, 128, tmp_path / "ref"))}
    full = evaluate(kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, metric=metric, chunk_size=128)
    for want in full:
        assert references[want.uid].kept_fraction == 1.0
        assert references[want.uid].score == pytest.approx(want.score, abs=1e-4)
        assert references[want.uid].prediction == want.prediction
    # a rerun finds every result and records no prompt
    again = evaluate_many(
        runs, items, tiny_model, tiny_tokenizer, model_name="tiny", metric=metric, chunk_size=128,
        reference_dir=tmp_path / "ref", progress=False,
    )  # fmt: skip
    assert again == 0
