"""Evolving a NAMM from KVzip (``examples/namm-context-first/kvzip.json``): the config starts at
the KVzip-equivalent read-out, searches only that read-out, and its members fork a shared
prefill that includes KVzip's repeat pass, giving the numbers of members run one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.hf_workload import HfWorkload
from kvpolicy.evolve.runner import Evolution
from kvpolicy_plugins.stft_reconstruction import kvzip_equivalent

CONFIG = Path(__file__).parents[2] / "examples" / "namm-context-first" / "kvzip.json"


def test_the_example_starts_at_kvzip_and_searches_only_the_read_out():
    config = EvolveConfig.from_file(CONFIG)
    workload = HfWorkload(config)  # the model loads on the first job only
    start = kvzip_equivalent("12.5%")
    assert workload.policy.config == start.config
    assert torch.equal(workload.space.start, start.get_flat())
    assert workload.space.dim == start.extractor.num_features == 35
    assert config.fitness.shared_prefill and config.fitness.protocol == "context-first"
    assert config.optimizer.config["popsize"] == 16 and config.optimizer.config["sigma0"] <= 0.05
    assert [s.tasks for s in config.stages] == [("multikey-shared",), ("multikey-shared", "needle")]


def test_the_attention_run_is_the_threshold_run_plus_a_subspace_of_bams_attention():
    """Equal evaluations: same start, fitness, population, items and generations; only BAM's
    attention (160 directions, ≤ 200 numbers in all) is searched beside the read-out and bias."""
    folder = CONFIG.parent
    attention = json.loads((folder / "attention.json").read_text())
    threshold = json.loads((folder / "threshold.json").read_text())
    subspace = attention.pop("subspace")
    assert attention == threshold
    assert subspace["groups"] == ["scorer.w_qkv", "scorer.b_qkv", "scorer.w_o", "scorer.b_o"]
    with_attention = HfWorkload(EvolveConfig.from_file(folder / "attention.json")).space
    linear = HfWorkload(EvolveConfig.from_file(folder / "threshold.json")).space
    assert linear.dim == 36 and with_attention.dim == 36 + 160 <= 200
    read_out = linear.index
    assert torch.equal(with_attention.start[read_out], linear.start[read_out])
    moved = with_attention.start - linear.start
    assert moved[read_out].abs().max() == 0 and 0 < moved.abs().max() < 0.1  # only the attention's offset


TINY = {
    "model": "tiny:llama",
    "policy": {
        **json.loads(CONFIG.read_text())["policy"],
        "extractor": {
            "name": "stft_reconstruction",
            "config": {"period": 128, "votes_kernels": [7], "reconstruction_kernels": [7]},
        },  # fmt: skip
        "scorer": {"name": "bam", "config": {"features": 29}},
    },
    "optimizer": {"name": "cma_es", "config": {"popsize": 4, "sigma0": 0.3}},
    "stages": [{"tasks": ["multikey-shared"], "generations": 1, "items": 4, "length": 256}],
    "search": ["scorer.w_s"],
    "start": {"scorer.w_s": [0.0] * 27 + [1.0, 0.0]},
    "eval_items": 4,
    "train_pool": 8,
    "calibration_items": 1,
    "members_per_job": 5,
    "fitness": {"metric": "loglik", "protocol": "context-first"},
    "executor": {"kind": "inprocess", "threads": 1},
    "progress": False,
}


def _generation(out: Path, **fitness) -> dict:
    config = EvolveConfig.from_dict({**TINY, "fitness": {**TINY["fitness"], **fitness}})
    Evolution(config, out).run()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return next(r for r in records if r["type"] == "generation")


def test_members_forked_from_a_prefill_with_the_repeat_pass_score_as_one_by_one(tmp_path):
    shared = _generation(tmp_path / "shared", shared_prefill=True)
    alone = _generation(tmp_path / "alone")
    assert shared["member_fitness"] == pytest.approx(alone["member_fitness"], abs=1e-6)
    assert shared["mean_fitness"] == pytest.approx(alone["mean_fitness"], abs=1e-6)
    assert shared["heldout_fitness"] == pytest.approx(alone["heldout_fitness"], abs=1e-6)
    assert 0.1 < shared["mean_kept_fraction"] < 0.5  # really evicts


THRESHOLD = CONFIG.with_name("threshold.json")


def test_the_self_sized_example_starts_at_kvzip_with_a_threshold_per_head():
    config = EvolveConfig.from_file(THRESHOLD)
    workload = HfWorkload(config)
    policy = workload.policy
    assert policy.selector.name == "threshold" and policy.selector.config.per_head
    assert policy.budget.capacity(4096) is None and config.fitness.cache_weight > 0
    start = kvzip_equivalent("12.5%")
    assert policy.extractor.config == start.extractor.config and policy.protect == start.protect
    assert workload.space.dim == 36  # the read-out and the bias
    expected = start.get_flat().clone()  # BAM's parameters end with the read-out, then the bias
    expected[-1] = 5.15
    assert torch.equal(workload.space.start, expected)


def test_self_sized_members_forked_from_a_prefill_score_as_one_by_one(tmp_path):
    """Members whose heads keep different counts (per-head threshold) in one forked batch give
    what each gives alone."""
    policy = {**TINY["policy"], "selector": {"name": "threshold", "config": {"per_head": True}}, "budget": None}
    base = {**TINY, "policy": policy, "search": ["scorer.w_s", "scorer.b_s"]}
    base["start"] = {**TINY["start"], "scorer.b_s": 4.0}
    records = {}
    for name, shared in (("shared", True), ("alone", False)):
        config = EvolveConfig.from_dict(
            {**base, "fitness": {**TINY["fitness"], "shared_prefill": shared, "cache_weight": 1.0}}
        )
        Evolution(config, tmp_path / name).run()
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        records[name] = next(r for r in map(json.loads, lines) if r["type"] == "generation")
    assert records["shared"]["member_fitness"] == pytest.approx(records["alone"]["member_fitness"], abs=1e-6)
    kept = records["shared"]["member_kept_fraction"]
    assert 0.02 < min(kept) and max(kept) < 0.98 and len(set(kept)) > 1  # really self-sized
