"""One prefill, many members: forking parameter rows from a shared prefill gives each row exactly
what that member computes when run alone through the ordinary attached model."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.eval.metrics import answer_logprobs
from kvpolicy.integrations.hf.shared_prefill import fork, prefill
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.types import Schedule


def namm_top_k(period: int = 64) -> kvpolicy.Policy:
    """stft_votes → BAM → top_k 25% once after the prompt, with a span: evicts in every row."""
    return kvpolicy.Policy(
        ("stft_votes", {"period": period}),
        ("bam", {"features": 26}),
        "top_k",
        budget="25%",
        schedule=Schedule("after_prefill"),
        span=5,
        recent=8,
    )


def alone(policy, model, prompt, answer, chunk):
    """Teacher-forced answer log-probabilities and report of one member through `handle.feed`."""
    with torch.inference_mode(), policy.attach(model) as handle:
        handle.reset()
        first = handle.feed(prompt, chunk_size=chunk)[:, -1:]
        rest = handle.feed(answer[:, :-1])
        report = handle.report()
    return answer_logprobs(torch.cat([first, rest], 1), answer)[0], report


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_forked_rows_equal_members_run_alone(family):
    model = tiny_model(family)
    prompt, answer = random_ids(1, 300, seed=1), random_ids(1, 6, seed=2)
    policy = namm_top_k()
    population = torch.randn(3, policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.3
    expected = []
    for row in population:
        policy.set_flat(row)
        expected.append(alone(policy, model, prompt, answer, chunk=128))
    policy.set_flat(population[0])
    shared = prefill(policy, model, prompt, chunk_size=128)  # chunks that do not divide the prompt
    policy.set_flat(population)
    with fork(shared, policy, model, rows=3) as handle:
        rest = handle.feed(answer[:, :-1].expand(3, -1))
        reports = [handle.report(row=r) for r in range(3)]
    logits = torch.cat([shared.last_logits.unsqueeze(1).expand(3, -1, -1), rest], 1)
    logprobs = answer_logprobs(logits, answer.expand(3, -1))
    for r, (want, report) in enumerate(expected):
        assert report.kept_fraction < 0.5  # really evicts
        assert reports[r].kept == report.kept
        torch.testing.assert_close(logprobs[r], want, atol=1e-4, rtol=0)


def test_a_prefill_is_never_changed_by_its_forks():
    model = tiny_model("llama")
    policy = namm_top_k()
    policy.set_flat(torch.randn(policy.num_params) * 0.3)
    shared = prefill(policy, model, random_ids(1, 200, seed=3), chunk_size=64)
    keys = [layer.keys.clone() for layer in shared.cache.layers]
    answer = random_ids(1, 5, seed=4)
    outs = []
    for _ in range(2):
        with fork(shared, policy, model) as handle:
            outs.append(handle.feed(answer))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, shared.cache.layers, strict=True))


def test_evict_false_is_the_full_cache():
    model = tiny_model("llama")
    policy = namm_top_k()
    prompt, answer = random_ids(1, 200, seed=5), random_ids(1, 5, seed=6)
    shared = prefill(policy, model, prompt, chunk_size=64)
    with fork(shared, policy, model, evict=False) as handle:
        forked = handle.feed(answer)
        assert handle.report().kept_fraction == 1.0
    with torch.inference_mode():
        bare = model(torch.cat([prompt, answer], 1)).logits[:, -answer.shape[1] :]
    torch.testing.assert_close(forked, bare, atol=1e-5, rtol=0)


def test_policies_whose_first_pass_comes_inside_the_prompt_are_refused():
    model = tiny_model("llama")
    prompt = random_ids(1, 300, seed=7)
    with pytest.raises(InvalidConfigError, match="after the whole prompt"):
        prefill(kvpolicy.build("h2o", budget=32), model, prompt, chunk_size=64)
    with pytest.raises(InvalidConfigError, match="never evicts"):
        prefill(kvpolicy.build("full"), model, prompt)
    with pytest.raises(ShapeError, match="one prompt"):
        prefill(namm_top_k(), model, random_ids(2, 50))
    # one forward call: the first pass of an every-step policy comes after the whole prompt
    shared = prefill(kvpolicy.build("h2o", budget=32), model, prompt)
    assert shared.features


def test_the_reference_fork_keeps_everything_while_decoding():
    """A budgeted every-step policy would evict at the next forward; the evict=False fork must not."""
    model = tiny_model("llama")
    policy = kvpolicy.build("h2o", budget=16)
    shared = prefill(policy, model, random_ids(1, 120, seed=8))
    with fork(shared, policy, model, evict=False) as handle:
        for _ in range(3):
            handle.feed(random_ids(1, 1, seed=9))
        assert handle.report().kept_fraction == 1.0
    with fork(shared, policy, model) as handle:
        handle.feed(random_ids(1, 1, seed=9))
        assert handle.report().kept_fraction < 0.5
