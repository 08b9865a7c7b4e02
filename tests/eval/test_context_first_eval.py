"""The ``context-first`` protocol through the evaluation driver: where an encoded item's context
ends, every row plan giving each row what it gives alone, the shared prefill of contexts, and
results that record their protocol and never mix with the other's."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.harness import evaluate
from kvpolicy.eval.many_policies import evaluate_many
from kvpolicy.eval.prompting import encode, prompt_text
from kvpolicy.eval.references import reference_path
from kvpolicy.eval.results import ResultStore
from kvpolicy.eval.rows import ForkedRows, ItemRows, PopulationRows, Row, shared_prompt
from kvpolicy.eval.tasks import build_suite, make_item
from kvpolicy.integrations.hf.shared_prefill import prefill

CHUNK = 96
CF = "context-first"


def test_the_context_ends_where_the_items_context_ends(tiny_tokenizer) -> None:
    for item in build_suite(["needle", "multikey", "quote"], "test", [256], [0, 1]):
        encoded = encode(item, tiny_tokenizer)
        n = encoded.context_tokens
        head = tiny_tokenizer.decode(encoded.prompt_ids[0, :n])
        text = prompt_text(item, tiny_tokenizer)
        assert text.startswith(head) and item.context.startswith(head[text.index(item.context[:20]) :][:20])
        # at most one token spanning the boundary goes with the question; none of the question is in the context
        assert len(item.context) - 8 <= len(head) - text.index(item.context[:20]) <= len(item.context)
        assert item.question not in head


def _same(got, want) -> None:
    assert (got.uid, got.prediction, got.tokens_seen, got.protocol) == (want.uid, want.prediction, want.tokens_seen, CF)
    assert got.score == pytest.approx(want.score, abs=1e-4)
    assert got.kept_fraction == pytest.approx(want.kept_fraction, abs=1e-9)


def test_a_padded_batch_equals_its_rows_alone(tiny_model, tiny_tokenizer) -> None:
    items = build_suite(["needle", "multikey", "quote"], "test", [256, 512], [0])
    policy = kvpolicy.build("h2o", budget=48)
    run = {"metric": "both", "chunk_size": CHUNK, "protocol": CF}
    alone = evaluate(policy, items, tiny_model, tiny_tokenizer, rows=ItemRows(1, "end"), **run)
    batched = evaluate(policy, items, tiny_model, tiny_tokenizer, rows=ItemRows(3, "end"), **run)
    for got, want in zip(batched, alone, strict=True):
        _same(got, want)
    assert any(r.kept_fraction < 0.6 for r in batched)


def test_a_population_equals_its_members_alone(tiny_model, tiny_tokenizer) -> None:
    policy = kvpolicy.build("namm-bam", every=CHUNK, extractor={"period": CHUNK})
    population = torch.randn(3, policy.num_params, generator=torch.Generator().manual_seed(1)) * 0.065
    items = [make_item("needle", "train", 0, 256)]
    run = {"metric": "task", "chunk_size": CHUNK, "protocol": CF}
    batched = evaluate(policy, items, tiny_model, tiny_tokenizer, rows=PopulationRows(population), **run)
    for member, got in zip(population, batched, strict=True):
        policy.set_flat(member)
        _same(got, evaluate(policy, items, tiny_model, tiny_tokenizer, **run)[0])
    assert len({r.kept_fraction for r in batched}) > 1


def test_forks_of_a_shared_context_equal_a_run_alone(tiny_model, tiny_tokenizer) -> None:
    items = build_suite(["needle", "perplexity"], "test", [384], [0, 1])
    policy = kvpolicy.build("snapkv", budget=48)
    prefills = {
        item.uid: prefill(policy, tiny_model, shared_prompt(Row(item, encode(item, tiny_tokenizer), ""), CF), CHUNK)
        for item in items
    }
    run = {"metric": "both", "chunk_size": CHUNK, "protocol": CF}
    forked = evaluate(policy, items, tiny_model, tiny_tokenizer, rows=ForkedRows(lambda r: prefills[r.item.uid]), **run)
    for got, want in zip(forked, evaluate(policy, items, tiny_model, tiny_tokenizer, **run), strict=True):
        _same(got, want)
    with pytest.raises(InvalidConfigError, match="shared prefill covers"):  # a prefill of the whole prompt
        whole = {i.uid: prefill(policy, tiny_model, encode(i, tiny_tokenizer).prompt_ids, CHUNK) for i in items}
        evaluate(policy, items, tiny_model, tiny_tokenizer, rows=ForkedRows(lambda r: whole[r.item.uid]), **run)


def test_the_full_cache_scores_the_same_under_both_protocols(tiny_model, tiny_tokenizer) -> None:
    items = build_suite(["needle", "quote"], "test", [384], [0, 1])
    full = kvpolicy.build("full")
    aware = evaluate(full, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK)
    first = evaluate(full, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK, protocol=CF)
    for a, b in zip(aware, first, strict=True):
        assert (a.prediction, a.protocol, b.protocol) == (b.prediction, "question-aware", CF)


def test_shared_prefill_forks_contexts_and_streams_the_others(tiny_model, tiny_tokenizer, tmp_path) -> None:
    """After-prefill policies fork the shared context; every-step ones prefill it themselves
    (their passes between chunks are part of what is measured)."""
    items = build_suite(["needle"], "test", [384], [0, 1])
    policies = {"snapkv": kvpolicy.build("snapkv", budget=48), "tova": kvpolicy.build("tova", budget=48)}
    runs = [(label, policy, tmp_path / label) for label, policy in policies.items()]
    settings = {"model_name": "tiny", "metric": "task", "chunk_size": CHUNK, "reference_dir": tmp_path / "ref"}
    evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol=CF, **settings)
    for label, policy in policies.items():
        stored = {r.uid: r for r in ResultStore(tmp_path / label / "results.jsonl", CF)}
        for want in evaluate(policy, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK, protocol=CF):
            _same(stored[want.uid], want)
    path = reference_path("tiny", "task", CHUNK, tmp_path / "ref", CF)
    assert path.name.endswith("-context-first.jsonl")
    assert all(r.kept_fraction == 1.0 and r.protocol == CF for r in ResultStore(path, CF))
    with pytest.raises(InvalidConfigError, match="never share a file"):  # the same folders, the other protocol
        evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol="question-aware",
                      model_name="tiny", metric="task", chunk_size=CHUNK, reference_dir=tmp_path / "ref2")  # fmt: skip


def test_records_say_their_protocol_and_a_store_holds_one(tiny_model, tiny_tokenizer, tmp_path) -> None:
    item = [make_item("needle", "test", 0, 256)]
    result = evaluate(kvpolicy.build("tova", budget=48), item, tiny_model, tiny_tokenizer, chunk_size=CHUNK,
                      protocol=CF)[0]  # fmt: skip
    store = ResultStore(tmp_path / "r.jsonl", CF)
    store.add(result)
    with pytest.raises(InvalidConfigError, match="context-first results"):
        ResultStore(tmp_path / "r.jsonl", "question-aware")
    # a record written before protocols existed is question-aware
    old = result.to_dict()
    old.pop("protocol")
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    assert next(iter(ResultStore(tmp_path / "old.jsonl"))).protocol == "question-aware"
    with pytest.raises(CheckpointError, match="protocol"):
        (tmp_path / "bad.jsonl").write_text(json.dumps(old | {"protocol": "question-last"}) + "\n")
        ResultStore(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidConfigError, match="unknown protocol"):
        evaluate(kvpolicy.build("full"), item, tiny_model, tiny_tokenizer, protocol="question-last")


@pytest.mark.parametrize("preset", ["snapkv", "h2o"])
def test_questions_of_one_context_share_its_compression(tiny_model, tiny_tokenizer, preset) -> None:
    """`ContextRows`: one compression of a shared context, one row per question, each row equal
    to that item run alone (an every-step policy too: its passes all come before the question)."""
    import attrs

    from kvpolicy.eval.rows import ContextRows

    base = make_item("multikey", "test", 0, 384)
    questions = ["What is the first number?", "Which number comes last in the whole text?", "Name one number."]
    shared = [attrs.evolve(base, seed=100 + i, question=q) for i, q in enumerate(questions)]
    items = [*shared, make_item("needle", "test", 1, 384)]
    policy = kvpolicy.build(preset, budget=48)
    run = {"metric": "both", "chunk_size": CHUNK, "protocol": CF}
    plan = ContextRows()
    assert [len(b) for b in plan.batches([Row(i, encode(i, tiny_tokenizer), "") for i in items])] == [3, 1]
    together = evaluate(policy, items, tiny_model, tiny_tokenizer, rows=plan, **run)
    for got, want in zip(together, evaluate(policy, items, tiny_model, tiny_tokenizer, **run), strict=True):
        _same(got, want)
    assert all(r.kept_fraction < 0.6 for r in together)
    with pytest.raises(InvalidConfigError, match="context-first"):
        evaluate(policy, items, tiny_model, tiny_tokenizer, rows=plan, metric="task", chunk_size=CHUNK)


def test_a_closed_book_item_is_one_prompt_under_both_protocols(tiny_model, tiny_tokenizer) -> None:
    from kvpolicy.eval.closed_book import closed_book

    items = [closed_book(make_item("needle", "test", 0, 256))]
    assert encode(items[0], tiny_tokenizer).context_tokens == 0
    policy = kvpolicy.build("tova", budget=8)
    aware = evaluate(policy, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK)[0]
    first = evaluate(policy, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK, protocol=CF)[0]
    assert (aware.prediction, aware.kept_fraction) == (first.prediction, first.kept_fraction)
    assert first.protocol == CF


def test_shared_prefill_records_each_context_once(tiny_model, tiny_tokenizer, tmp_path) -> None:
    """`multikey-shared`: four questions per context. `evaluate_many` records each context once
    (forked policies) and compresses it once per streaming policy; every result equals the item
    run alone."""
    items = build_suite(["multikey-shared"], "test", [384], range(8))
    assert len({i.context_id for i in items}) == 2 and len({i.answers for i in items}) == 8
    policies = {"snapkv": kvpolicy.build("snapkv", budget=48), "tova": kvpolicy.build("tova", budget=48)}
    runs = [(label, policy, tmp_path / label) for label, policy in policies.items()]
    settings = {"model_name": "tiny", "metric": "task", "chunk_size": CHUNK, "reference_dir": tmp_path / "ref"}
    assert evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol=CF, **settings) == 2
    for label, policy in policies.items():
        stored = {r.uid: r for r in ResultStore(tmp_path / label / "results.jsonl", CF)}
        assert {r.context_id for r in stored.values()} == {i.context_id for i in items}
        for want in evaluate(policy, items, tiny_model, tiny_tokenizer, chunk_size=CHUNK, protocol=CF):
            _same(stored[want.uid], want)
    full = evaluate(kvpolicy.build("full"), items, tiny_model, tiny_tokenizer, chunk_size=CHUNK, protocol=CF)
    stored = {r.uid: r for r in ResultStore(reference_path("tiny", "task", CHUNK, tmp_path / "ref", CF), CF)}
    for want in full:
        _same(stored[want.uid], want)
    assert evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol=CF, **settings) == 0


def test_each_policys_results_are_stored_before_the_next_policy_runs(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
) -> None:
    """A context of a long item costs an hour of policies: a run killed during the forked
    policies keeps the streaming policies' results of that context, and the rerun does only the rest."""
    import kvpolicy.eval.many_policies as many

    items = build_suite(["needle"], "test", [384], [0])
    policies = {"tova": kvpolicy.build("tova", budget=48), "snapkv": kvpolicy.build("snapkv", budget=48)}
    runs = [(label, policy, tmp_path / label) for label, policy in policies.items()]
    settings = {"model_name": "tiny", "metric": "task", "chunk_size": CHUNK, "reference_dir": tmp_path / "ref"}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(many, "_forked", killed)
        with pytest.raises(KeyboardInterrupt):
            evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol=CF, **settings)
    tova_file = tmp_path / "tova" / "results.jsonl"
    assert len(ResultStore(tova_file, CF)) == 1
    assert len(ResultStore(tmp_path / "snapkv" / "results.jsonl", CF)) == 0
    before = tova_file.read_text()
    assert evaluate_many(runs, items, tiny_model, tiny_tokenizer, progress=False, protocol=CF, **settings) == 1
    assert tova_file.read_text() == before  # not run again
    stored = ResultStore(tmp_path / "snapkv" / "results.jsonl", CF)
    _same(stored.get(items[0].uid), evaluate(policies["snapkv"], items, tiny_model, tiny_tokenizer,
                                             chunk_size=CHUNK, protocol=CF)[0])  # fmt: skip
