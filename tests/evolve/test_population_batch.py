"""A population scored as one batch (`kvpolicy.eval.rows.PopulationRows`): rows that stop early
report their own cache, and the evolution runner's ``population_batch`` option gives what members
run one by one give (equality of each row on one item: tests/eval/test_row_plans.py).

Tiny random-weight Llama, NAMM-BAM (stft → bam → threshold) updating every 128 tokens on a
needle item of 1,248 byte tokens, so each member goes through nine eviction passes."""

from __future__ import annotations

import copy

import pytest
import torch
from evolve_support import TINY_HF, generation_records

from kvpolicy import build
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.harness import evaluate, run_item
from kvpolicy.eval.prompting import encode
from kvpolicy.eval.rows import PopulationRows
from kvpolicy.eval.tasks import make_item
from kvpolicy.evolve.config import EvolveConfig, FitnessConfig
from kvpolicy.evolve.runner import Evolution
from kvpolicy.integrations.hf.tiny import byte_tokenizer, tiny_model

EVERY = 128


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def item():
    return make_item("needle", "train", 0, 256)


def namm() -> object:
    return build("namm-bam", every=EVERY, extractor={"period": EVERY})


def population(policy, seed: int, members: int = 4, sigma: float = 0.065) -> torch.Tensor:
    """CMA-ES generation 0 around the zero mean (σ₀ of the paper)."""
    return torch.randn(members, policy.num_params, generator=torch.Generator().manual_seed(seed)) * sigma


def one_by_one(policy, params, item, model, tokenizer, metric):
    results = []
    for row in params:
        policy.set_flat(row)
        results.append(run_item(policy, item, model, tokenizer, metric=metric, chunk_size=EVERY))
    return results


def assert_same(batched, alone):
    for b, a in zip(batched, alone, strict=True):
        assert b.answer_logprob == pytest.approx(a.answer_logprob, abs=1e-4)
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert b.prediction == a.prediction
        assert b.kept_fraction == a.kept_fraction and b.per_layer_fraction == a.per_layer_fraction
        assert b.kv_bytes == a.kv_bytes and b.tokens_seen == a.tokens_seen


def test_greedy_rows_that_stop_early_report_their_own_cache(tokenizer, item):
    model = tiny_model("llama")  # its own copy: the end-of-sequence token is changed below
    policy = namm()
    params = population(policy, seed=1)
    policy.set_flat(params[0])
    alone = policy.generate(model, encode(item, tokenizer).prompt_ids, max_new_tokens=10, do_sample=False,
                            prefill_chunk_size=EVERY).new_tokens[0].tolist()  # fmt: skip
    stop = next(i for i, token in enumerate(alone) if token not in alone[:i] and i > 2)
    model.generation_config.eos_token_id = alone[stop]  # member 0 now ends after stop + 1 tokens

    batched = evaluate(policy, [item], model, tokenizer, metric="task", chunk_size=EVERY, rows=PopulationRows(params))
    assert batched[0].tokens_seen == batched[0].prompt_tokens + stop
    assert len({r.tokens_seen for r in batched}) > 1  # rows stopped at different steps
    assert len({r.kept_fraction for r in batched}) > 1
    assert_same(batched, one_by_one(policy, params, item, model, tokenizer, "task"))


# ----------------------------------------------------------------------------- the evolution runner


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run with members one by one and with each job's rows as one batch."""
    out = {}
    for batched in (False, True):
        data = copy.deepcopy(TINY_HF)
        data["fitness"]["population_batch"] = batched
        folder = tmp_path_factory.mktemp(f"batched-{batched}")
        out[batched] = (Evolution(EvolveConfig.from_dict(data), folder).run(), generation_records(folder))
    return out


def test_batched_run_ends_at_the_same_mean(runs):
    (alone, _), (batched, _) = runs[False], runs[True]
    assert torch.equal(batched.final_params, alone.final_params)  # bitwise: CMA-ES uses the ranking only
    assert batched.final_fitness == pytest.approx(alone.final_fitness, abs=1e-6)


def test_batched_run_logs_the_same_member_figures(runs):
    for alone, batched in zip(runs[False][1], runs[True][1], strict=True):
        if alone["type"] == "generation":
            assert batched["member_kept_fraction"] == alone["member_kept_fraction"]
            assert batched["member_fitness"] == pytest.approx(alone["member_fitness"], abs=1e-6)


def test_population_batch_is_a_fingerprinted_fitness_option():
    assert FitnessConfig().population_batch is False
    plain = EvolveConfig.from_dict(TINY_HF)
    data = copy.deepcopy(TINY_HF)
    data["fitness"]["population_batch"] = True
    batched = EvolveConfig.from_dict(data)
    assert batched.to_dict()["fitness"]["population_batch"] is True
    assert batched.fingerprint() != plain.fingerprint()
    data["fitness"]["population_batch"] = "yes"
    with pytest.raises(InvalidConfigError, match="population_batch must be true or false, got 'yes'"):
        EvolveConfig.from_dict(data)
