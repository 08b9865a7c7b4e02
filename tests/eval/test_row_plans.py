"""Every way of preparing rows (`kvpolicy.eval.rows`) gives each row what that row gives alone
through the one driver's default plan: a left-padded batch of items, a population repeating an
item, rows forked from a shared prefill (one row or a population).

Tiny random-weight Llama; each case really evicts (asserted), so the comparison is never vacuous.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.rows import ForkedRows, ItemRows, PopulationRows
from kvpolicy.eval.tasks import build_suite, make_item
from kvpolicy.integrations.hf.shared_prefill import prefill

CHUNK = 96


def _namm(schedule: str = "every_n") -> kvpolicy.Policy:
    if schedule == "every_n":
        return kvpolicy.build("namm-bam", every=CHUNK, extractor={"period": CHUNK})
    policy = kvpolicy.build("namm-bam-smollm2", budget="25%")
    policy.transfer = True  # its weights were evolved on SmolLM2; the tiny model is a chosen transfer
    return policy


def _population(policy: kvpolicy.Policy, members: int = 3) -> torch.Tensor:
    return torch.randn(members, policy.num_params, generator=torch.Generator().manual_seed(1)) * 0.065


def _alone_per_member(policy, population, items, model, tokenizer, metric, chunk_size):
    """Each member run alone through the default plan, rows in the order a population gives them."""
    previous = policy.get_flat()
    by_member = []
    for member in population:
        policy.set_flat(member)
        by_member.append(evaluate(policy, items, model, tokenizer, metric=metric, chunk_size=chunk_size))
    policy.set_flat(previous)
    return [by_member[m][i] for i in range(len(items)) for m in range(len(population))]


def _padded_batch(model, tokenizer, metric):
    items = build_suite(["needle", "multikey", "quote", "perplexity"], "test", [256, 512], [0])
    policy = kvpolicy.build("h2o", budget=48)
    run = {"metric": metric, "chunk_size": CHUNK}
    alone = evaluate(policy, items, model, tokenizer, rows=ItemRows(1, "end"), **run)
    return evaluate(policy, items, model, tokenizer, rows=ItemRows(3, "end"), **run), alone


def _population_rows(model, tokenizer, metric):
    items = [make_item("needle", "train", 0, 256)]
    policy = _namm()
    population = _population(policy)
    batched = evaluate(
        policy, items, model, tokenizer, metric=metric, chunk_size=CHUNK, rows=PopulationRows(population)
    )
    assert policy.get_flat().dim() == 1  # the single parameter set is back
    return batched, _alone_per_member(policy, population, items, model, tokenizer, metric, CHUNK)


def _forked(model, tokenizer, metric, members: int | None):
    items = build_suite(["needle", "perplexity"], "test", [384], [0, 1])
    policy = _namm("after_prefill")
    population = None if members is None else _population(policy, members)
    prefills = {item.uid: prefill(policy, model, encode(item, tokenizer).prompt_ids, CHUNK) for item in items}
    plan = ForkedRows(lambda row: prefills[row.item.uid], population=population)
    forked = evaluate(policy, items, model, tokenizer, metric=metric, chunk_size=CHUNK, rows=plan)
    if population is None:
        return forked, evaluate(policy, items, model, tokenizer, metric=metric, chunk_size=CHUNK)
    return forked, _alone_per_member(policy, population, items, model, tokenizer, metric, CHUNK)


PLANS = {
    "padded_batch": _padded_batch,
    "population": _population_rows,
    "forked": lambda model, tokenizer, metric: _forked(model, tokenizer, metric, None),
    "forked_population": lambda model, tokenizer, metric: _forked(model, tokenizer, metric, 3),
}


@pytest.mark.parametrize("metric", ["task", "both"])
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_each_row_equals_that_row_run_alone(tiny_model, tiny_tokenizer, plan, metric) -> None:
    prepared, alone = PLANS[plan](tiny_model, tiny_tokenizer, metric)
    assert len(prepared) == len(alone)
    for got, want in zip(prepared, alone, strict=True):
        assert (got.uid, got.prediction, got.tokens_seen) == (want.uid, want.prediction, want.tokens_seen)
        assert got.score == pytest.approx(want.score, abs=1e-4)
        assert (got.answer_logprob is None) == (want.answer_logprob is None)
        if got.answer_logprob is not None:
            assert got.answer_logprob == pytest.approx(want.answer_logprob, abs=1e-4)
        assert got.kept_fraction == pytest.approx(want.kept_fraction, abs=1e-9) and got.kv_bytes == want.kv_bytes
        assert got.per_layer_fraction == pytest.approx(want.per_layer_fraction, abs=1e-9)
    assert any(r.kept_fraction < 0.6 for r in prepared), "nothing was evicted: the comparison would be vacuous"
    if "population" in plan:
        assert len({r.kept_fraction for r in prepared}) > 1  # members really evict differently
        assert all(r.policy.endswith(f"[{i % 3}]") for i, r in enumerate(prepared))


def test_a_batch_of_one_decodes_as_generate(tiny_model, tiny_tokenizer) -> None:
    """The one greedy loop gives what ``policy.generate`` (transformers' own loop) gives."""
    items = build_suite(["needle", "quote"], "test", [256, 512], [0])
    policy = kvpolicy.build("h2o", budget=48)
    results = evaluate(policy, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK)
    for item, result in zip(items, results, strict=True):
        ids = encode(item, tiny_tokenizer).prompt_ids
        out = policy.generate(tiny_model, ids, max_new_tokens=item.max_new_tokens, do_sample=False,
                              prefill_chunk_size=CHUNK)  # fmt: skip
        eos = tiny_model.generation_config.eos_token_id
        tokens = [t for t in out.new_tokens[0].tolist() if t != eos]
        assert result.prediction == tiny_tokenizer.decode(tokens, skip_special_tokens=True)
        assert (result.tokens_seen, result.kept_fraction) == (out.report.seen, out.report.kept_fraction)


def test_bad_plans_are_refused(tiny_model, tiny_tokenizer) -> None:
    with pytest.raises(InvalidConfigError, match="batch_size"):
        ItemRows(0)
    with pytest.raises(InvalidConfigError, match="chunk_align"):
        ItemRows(1, "middle")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="align='end'"):
        ItemRows(2, "start")
    item = [make_item("needle", "train", 0, 256)]
    policy = _namm()
    run = {"chunk_size": CHUNK, "metric": "loglik"}
    with pytest.raises(ShapeError, match=rf"\[members >= 1, {policy.num_params}\]"):
        evaluate(policy, item, tiny_model, tiny_tokenizer, rows=PopulationRows(torch.zeros(policy.num_params)), **run)
    with pytest.raises(ShapeError, match=r"got \(2, 5\)"):
        evaluate(policy, item, tiny_model, tiny_tokenizer, rows=PopulationRows(torch.zeros(2, 5)), **run)
    with pytest.raises(InvalidConfigError, match="no learnable parameters"):
        evaluate(kvpolicy.build("h2o", budget=64), item, tiny_model, tiny_tokenizer,
                 rows=PopulationRows(torch.zeros(2, 1)), **run)  # fmt: skip
