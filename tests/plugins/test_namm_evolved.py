"""The shipped NAMM for SmolLM2: loads with nothing but kvpolicy installed, is the pipeline its
evolution config evolves, and keeps what it should on a real model."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.search_space import parameter_layout
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy_plugins.namm import EVOLVED_SMOLLM2, EVOLVED_VOTES_KERNELS, evolved_config

EXAMPLE = Path(__file__).parents[2] / "examples" / "namm-smollm2"


def test_the_shipped_weights_are_package_data_and_load_by_name():
    assert EVOLVED_SMOLLM2.is_file()
    policy = kvpolicy.build("namm-bam-smollm2")
    assert policy.config == kvpolicy.Policy.from_config(evolved_config()).config
    assert policy.buffers()["extractor.count"].item() > 0  # calibrated on SmolLM2, frozen
    layout = parameter_layout(policy)
    w_s = policy.get_flat()[layout["scorer.w_s"]]
    assert w_s.numel() == 30  # 25 spectrogram features, the log votes, the votes pooled over 4 widths
    widest = {kernel: 26 + i for i, kernel in enumerate(EVOLVED_VOTES_KERNELS)}
    # evolved, not the start (one-hot on the votes pooled over 31): that feature keeps the most weight
    assert w_s[widest[31]] > 0 and w_s[widest[31]] >= w_s.abs().max()
    assert (w_s != 0).sum() > 1
    # only the linear read-out was searched: BAM's attention output stays off
    assert not policy.get_flat()[layout["scorer.w_o"]].any() and not policy.get_flat()[layout["scorer.b_o"]].any()


def test_the_config_that_made_the_shipped_parameters_evolves_its_pipeline():
    """`evolve_spans_12.json` trained at 12.5% of the cache; the preset keeps 25%."""
    shipped = kvpolicy.Policy.from_config(evolved_config()).config
    trained = kvpolicy.build(EvolveConfig.from_file(EXAMPLE / "evolve_spans_12.json").policy).config
    assert trained.budget.ratio == 0.125
    assert attrs.evolve(trained, budget=shipped.budget) == shipped


def test_every_recorded_evolution_config_still_builds():
    for path in sorted(EXAMPLE.glob("evolve_*.json")):
        policy = kvpolicy.build(EvolveConfig.from_file(path).policy)
        assert policy.num_params > 0, path.name


def test_budget_overrides_keep_the_learned_parameters():
    shipped = kvpolicy.build("namm-bam-smollm2")
    smaller = kvpolicy.build("namm-bam-smollm2", budget="12.5%")
    assert torch.equal(smaller.get_flat(), shipped.get_flat()) and smaller.budget.ratio == 0.125


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5])
def test_it_keeps_the_configured_share_of_any_model(ratio):
    model = tiny_model("qwen2")
    policy = kvpolicy.build("namm-bam-smollm2", budget=ratio)
    ids = random_ids(1, 600, seed=1)
    out = policy.generate(model, {"input_ids": ids}, max_new_tokens=4, do_sample=False, prefill_chunk_size=256)
    assert out.report.eviction_passes == 1  # once, after the whole prompt
    assert out.report.kept_fraction == pytest.approx(ratio, abs=0.02)


@pytest.mark.real_model
def test_on_smollm2_it_keeps_the_needle_a_quarter_of_the_cache_holds(tmp_path):
    """The shipped NAMM on the model it was evolved for, on ci-profile needle items (test split):
    25% of the cache, and the needle answered on every item the full cache answers."""
    from kvpolicy.eval.many_policies import evaluate_many
    from kvpolicy.eval.profiles import get_profile
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    items = get_profile("ci").items("test", tasks=("needle",))
    policy = kvpolicy.build("namm-bam-smollm2")
    evaluate_many([("namm", policy, tmp_path / "namm")], items, model, tokenizer, model_name="smollm2-135m-instruct",
                metric="task", chunk_size=512, reference_dir=tmp_path / "refs", progress=False)  # fmt: skip
    from kvpolicy.eval.references import reference_path
    from kvpolicy.eval.results import ResultStore

    full = {
        r.uid: r.score for r in ResultStore(reference_path("smollm2-135m-instruct", "task", 512, tmp_path / "refs"))
    }
    for result in ResultStore(tmp_path / "namm" / "results.jsonl"):
        assert result.kept_fraction == pytest.approx(0.25, abs=0.02)
        assert result.score >= full[result.uid]
