"""The real path on a tiny random-weight Llama with kvpolicy's needle task: calibration, a short
run whose mean improves over generation 0, the result saved as a policy file, and the same
numbers from the in-process and the process-pool executors."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from evolve_support import TINY_HF as TINY
from evolve_support import generation_records

from kvpolicy import Policy
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.runner import Evolution


def test_short_run_improves_the_mean_and_saves_a_loadable_policy(tiny_inprocess_run):
    result, out = tiny_inprocess_run
    records = generation_records(out)
    calibration = records[0]
    assert calibration["type"] == "calibration" and "extractor.mean" in calibration["buffers"]
    generations = [r for r in records if r["type"] == "generation"]
    assert [r["generation"] for r in generations] == [0, 1]
    # generation 0's mean is the zero scorer: keeps everything, scores exactly the full cache
    assert generations[0]["mean_kept_fraction"] == 1.0
    assert generations[0]["mean_fitness"] == pytest.approx(1.0)
    assert generations[0]["heldout_fitness"] == pytest.approx(1.0)
    assert all(0.0 < k <= 1.0 for k in generations[0]["member_kept_fraction"])
    assert generations[1]["mean_fitness"] > generations[0]["mean_fitness"]
    assert result.best_fitness > 1.0 and result.best_generation >= 1

    policy = Policy.load(str(out / "result.safetensors"))
    assert torch.equal(policy.get_flat(), result.best_params.float())
    assert policy.buffers()["extractor.count"].item() > 0  # calibrated statistics travel with the policy
    assert json.loads((out / "config.json").read_text())["model"] == "tiny:llama"


def test_process_pool_gives_the_same_result(tiny_inprocess_run, tmp_path):
    result, out = tiny_inprocess_run
    config = attrs.evolve(EvolveConfig.from_dict(TINY), executor=attrs.evolve(EvolveConfig.from_dict(TINY).executor,
                                                                                kind="process", workers=2))  # fmt: skip
    pooled = Evolution(config, tmp_path).run()
    assert torch.equal(pooled.final_params, result.final_params)
    assert torch.equal(pooled.best_params, result.best_params)
    assert generation_records(tmp_path) == generation_records(out)
