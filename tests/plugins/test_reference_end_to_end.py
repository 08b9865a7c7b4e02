"""Every reference preset end to end: inside plain ``model.generate`` with ``policy.attach`` on a
tiny random-weight Llama (fast), on the real SmolLM2 (``real_model``), and through the CLI."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import kvpolicy

PRESETS = ("h2o", "l2", "snapkv", "tova", "fastgen", "streaming_llm")
BUDGET = 24


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def _build(name: str, budget=BUDGET) -> kvpolicy.Policy:
    if name == "fastgen":
        return kvpolicy.build(name, extractor={"special_ids": [0], "punctuation_ids": [5, 6]})
    return kvpolicy.build(name, budget=budget)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_inside_generate_on_a_tiny_model(tiny_model, name: str) -> None:
    prompt = torch.randint(3, 64, (1, 120), generator=torch.Generator().manual_seed(1))
    policy = _build(name)
    with policy.attach(tiny_model) as handle:
        out = tiny_model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    report = handle.report()
    assert out.shape == (1, 132)
    assert report.seen == 131  # the last generated token is never fed back
    managed = [i for i in report.evicting_layers if i not in policy.skip_layers]
    assert managed, "the policy manages no layer"
    slack = policy.schedule.slack
    for layer in managed:
        kept = report.kept[layer]
        if name in ("h2o", "tova"):  # greedy, no slack: exactly the budget after every step
            assert all(k == BUDGET for k in kept), (layer, kept)
        elif name in ("l2", "streaming_llm"):
            assert all(BUDGET <= k <= BUDGET + slack for k in kept), (layer, kept)
        elif name == "snapkv":  # the prompt compressed once, generated tokens added
            assert all(k == BUDGET + 11 for k in kept), (layer, kept)
        else:  # fastgen: each head its own structure
            assert all(1 <= k <= report.seen for k in kept)
    for layer in policy.skip_layers:
        assert all(k == report.seen for k in report.kept[layer])


def test_h2o_evicts_during_chunked_prefill(tiny_model) -> None:
    prompt = torch.randint(3, 64, (1, 96), generator=torch.Generator().manual_seed(2))
    policy = kvpolicy.build("h2o", budget=BUDGET)
    with policy.attach(tiny_model) as handle:
        handle.feed(prompt, chunk_size=16)
        cache = handle.cache
        for index in cache.managed:
            layer = cache.layers[index]
            assert layer.eviction_passes == 5  # after chunks 2..6 (the first 16 tokens fit the budget)
            assert layer.tokens == BUDGET
            # the recent half of the budget is the 12 newest positions, in every head
            newest = layer.positions[..., -12:]
            assert torch.equal(newest, torch.arange(84, 96).expand_as(newest))


def test_fastgen_profile_survives_generation(tiny_model) -> None:
    prompt = torch.randint(3, 64, (1, 64), generator=torch.Generator().manual_seed(3))
    policy = kvpolicy.build("fastgen", extractor={"special_ids": [7], "punctuation_ids": [5, 6]})
    with policy.attach(tiny_model) as handle:
        tiny_model.generate(input_ids=prompt, max_new_tokens=40, do_sample=False)
        cache = handle.cache
        for index in cache.managed:
            profile = cache.layers[index].state["fastgen.profile"]
            # state covers the tokens up to the last eviction pass; newer ones are appended by the next one
            assert profile.shape[:2] == (1, 2) and 0 < profile.shape[2] <= cache.layers[index].tokens
            assert bool((profile == profile[..., :1]).all())
            assert cache.layers[index].eviction_passes >= 3


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from kvpolicy.models import load_model

    return load_model("smollm2-135m-instruct")


def _essay_prompt(tokenizer, tokens: int = 300) -> torch.Tensor:
    from kvpolicy.data import essays

    text = essays()[0][1]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    question = tokenizer(" In one sentence, what is this text about?", return_tensors="pt").input_ids
    return torch.cat([ids, question], dim=1)


@pytest.mark.real_model
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_on_smollm2_inside_generate(smollm2, name: str) -> None:
    from kvpolicy_plugins.fastgen import token_classes

    model, tokenizer = smollm2
    ids = _essay_prompt(tokenizer)
    if name == "fastgen":
        policy = kvpolicy.build(name, extractor=token_classes(tokenizer))
    else:
        policy = kvpolicy.build(name, budget=128)
    with policy.attach(model) as handle:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    report = handle.report()
    new = out.shape[1] - ids.shape[1]
    assert 1 <= new <= 4 and tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert report.seen == out.shape[1] - 1
    if name == "fastgen":
        assert report.kept_fraction < 1.0  # real heads are not all "full"
    else:
        budgeted = [i for i in report.evicting_layers if i not in policy.skip_layers]
        slack = policy.schedule.slack + (new if name == "snapkv" else 0)
        assert budgeted and all(max(report.kept[i]) <= 128 + slack for i in budgeted)
        assert report.kept_fraction < 0.75


@pytest.mark.real_model
def test_cli_runs_every_preset(capsys) -> None:
    if importlib.util.find_spec("kvpolicy.cli.run") is None:
        pytest.skip("the `kvpolicy run` command is not available in this checkout")
    from kvpolicy.cli import main

    for name in PRESETS:
        args = ["run", "--policy", name, "--budget", "128", "--context-tokens", "300", "--max-new-tokens", "2"]
        assert main(args) == 0, name
        out = capsys.readouterr().out
        kept = re.search(r"cache kept ([0-9.]+)%", out)
        assert kept is not None, out
        assert float(kept.group(1)) < 100.0, (name, out)  # 128 of ~350 tokens per head, at most
