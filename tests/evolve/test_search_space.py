"""What evolution searches: named parameter groups offset from a start point, shared prefills,
and validation items carved from the train split."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.evolve.config import EvolveConfig
from kvpolicy.evolve.runner import Evolution
from kvpolicy.evolve.search_space import SearchSpace, parameter_layout


def bam26() -> kvpolicy.Policy:
    return kvpolicy.Policy("stft_votes", ("bam", {"features": 26}), "threshold")


def test_layout_names_every_group_in_flat_order():
    layout = parameter_layout(bam26())
    assert list(layout) == [f"scorer.{n}" for n in ("w_qkv", "b_qkv", "w_o", "b_o", "w_s", "b_s")]
    assert layout["scorer.w_s"] == slice(26 * 96 + 96 + 32 * 52 + 52, 26 * 96 + 96 + 32 * 52 + 52 + 26)


def test_search_rows_become_full_vectors_around_the_start():
    policy = bam26()
    start = [0.0] * 25 + [1.0]
    space = SearchSpace(policy, ("scorer.w_s",), {"scorer.w_s": start, "scorer.b_s": 0.5})
    assert space.dim == 26
    full = space.full_params(torch.ones(2, 26))
    w_s = parameter_layout(policy)["scorer.w_s"]
    assert full.shape == (2, policy.num_params)
    assert full[:, w_s].tolist() == [[1.0] * 25 + [2.0]] * 2
    assert full[0, -1] == 0.5  # b_s held at its start
    assert full[:, : w_s.start].abs().sum() == 0
    with pytest.raises(InvalidConfigError, match="unknown parameter group"):
        SearchSpace(policy, ("scorer.w_z",), {})
    with pytest.raises(InvalidConfigError, match="has 3 numbers"):
        SearchSpace(policy, (), {"scorer.w_s": [1.0, 2.0, 3.0]})


def test_start_from_a_saved_policy(tmp_path):
    policy = bam26()
    policy.set_flat(torch.randn(policy.num_params))
    policy.save(tmp_path / "stage1.safetensors")
    space = SearchSpace(bam26(), (), str(tmp_path / "stage1.safetensors"))
    assert torch.equal(space.start, policy.get_flat())
    with pytest.raises(InvalidConfigError, match="parameters"):
        SearchSpace(kvpolicy.Policy("stft", "bam", "threshold"), (), str(tmp_path / "stage1.safetensors"))


TINY_SHARED = {
    "model": "tiny:llama",
    "policy": {
        "extractor": {"name": "stft_votes", "config": {"period": 128}},
        "scorer": {"name": "bam", "config": {"features": 26}},
        "selector": "top_k",
        "budget": {"ratio": 0.25},
        "schedule": {"kind": "after_prefill"},
        "protect": {"recent": 8},
        "pooler": {"name": "span", "config": {"kernel": 5}},
    },
    "optimizer": {"name": "cma_es", "config": {"popsize": 4, "sigma0": 0.3}},
    "stages": [{"tasks": ["needle"], "generations": 2, "items": 2, "length": 256}],
    "search": ["scorer.w_s"],
    "start": {"scorer.w_s": [0.0] * 25 + [1.0]},
    "eval_items": 2,
    "train_pool": 4,
    "calibration_items": 1,
    "members_per_job": 5,
    "fitness": {"metric": "loglik"},
    "executor": {"kind": "inprocess", "threads": 1},
    "progress": False,
}


def _run(out, stages=None, **fitness):
    data = {**TINY_SHARED, "fitness": {**TINY_SHARED["fitness"], **fitness}}
    if stages is not None:
        data |= {"stages": stages, "train_pool": 8}
    config = EvolveConfig.from_dict(data)
    result = Evolution(config, out).run()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return result, [r for r in records if r["type"] == "generation"]


def test_shared_prefill_gives_the_numbers_of_members_run_one_by_one(tmp_path):
    shared, shared_log = _run(tmp_path / "shared", shared_prefill=True)
    alone, alone_log = _run(tmp_path / "alone")
    for a, b in zip(shared_log, alone_log, strict=True):
        assert a["member_fitness"] == pytest.approx(b["member_fitness"], abs=1e-6)
        assert a["heldout_fitness"] == pytest.approx(b["heldout_fitness"], abs=1e-6)
    assert torch.allclose(shared.best_params, alone.best_params)
    # the mean starts at the start point: generation 0's mean is the votes-only scorer, evicting 75%
    assert shared_log[0]["mean_kept_fraction"] < 0.3
    # validation items are train items past the pool: never drawn by a generation
    drawn = {s for r in shared_log for seeds in r["items"].values() for s in seeds}
    assert drawn <= set(range(4))
    references = json.loads((tmp_path / "shared" / "references.json").read_text())
    assert {k.split("|")[1] for k in references} == {"train", "validation"}
    assert not any("|test|" in k for k in references)


def test_shared_prefill_needs_a_policy_that_evicts_after_the_prompt(tmp_path):
    data = {**TINY_SHARED, "fitness": {"metric": "loglik", "shared_prefill": True}}
    data["policy"] = {**TINY_SHARED["policy"], "schedule": {"kind": "every_n", "every": 128}}
    with pytest.raises(InvalidConfigError, match="after_prefill"):
        Evolution(EvolveConfig.from_dict(data), tmp_path)


def test_members_evolved_context_first_share_the_prefill_of_each_context(tmp_path):
    """``fitness.protocol = context-first``: forks of each context's prefill give the members'
    one-by-one numbers, and those differ from the question-aware ones (the passes no longer see
    the question)."""
    shared, shared_log = _run(tmp_path / "shared", shared_prefill=True, protocol="context-first")
    alone, alone_log = _run(tmp_path / "alone", protocol="context-first")
    for a, b in zip(shared_log, alone_log, strict=True):
        assert a["member_fitness"] == pytest.approx(b["member_fitness"], abs=1e-6)
    _, aware_log = _run(tmp_path / "aware", shared_prefill=True)
    assert shared_log[0]["member_fitness"] != pytest.approx(aware_log[0]["member_fitness"], abs=1e-6)
    with pytest.raises(InvalidConfigError, match="protocol"):
        EvolveConfig.from_dict({**TINY_SHARED, "fitness": {"metric": "loglik", "protocol": "question-last"}})


def test_a_shared_context_task_draws_whole_contexts_and_prefills_each_once(tmp_path):
    """`multikey-shared` asks four questions per context: a generation draws whole contexts, the
    questions of one share its stored prefill, and the figures equal members run one by one."""
    stage = {"tasks": ["multikey-shared"], "generations": 2, "items": 4, "length": 256}
    shared, shared_log = _run(tmp_path / "shared", shared_prefill=True, protocol="context-first", stages=[stage])
    alone, alone_log = _run(tmp_path / "alone", protocol="context-first", stages=[stage])
    for a, b in zip(shared_log, alone_log, strict=True):
        assert a["member_fitness"] == pytest.approx(b["member_fitness"], abs=1e-6)
    for record in shared_log:
        (seeds,) = record["items"].values()
        assert len({s // 4 for s in seeds}) == 1 and sorted(s % 4 for s in seeds) == [0, 1, 2, 3]
    config = EvolveConfig.from_dict({**TINY_SHARED, "stages": [stage], "train_pool": 8,
                                     "fitness": {"metric": "loglik", "shared_prefill": True, "protocol": "context-first"}})  # fmt: skip
    evolution = Evolution(config, tmp_path / "count")
    evolution.run()
    store = evolution.workload._prefills
    assert store.misses <= 2 * 2 + 1 and store.hits >= 3 * store.misses  # 4 questions, one prefill per context


def test_a_subspace_moves_its_groups_through_few_numbers():
    from kvpolicy.evolve.search_space import Subspace, parameter_layout

    policy = bam26()
    layout = parameter_layout(policy)
    attention = ("scorer.w_qkv", "scorer.w_o")
    space = SearchSpace(policy, ("scorer.w_s",), {}, Subspace(attention, 8, seed=3))
    assert space.dim == 26 + 8
    row = torch.zeros(space.dim)
    row[26 + 2] = 1.0  # one direction: every weight of the attention moves, nothing else
    full = space.full_params(row)
    moved = torch.cat([full[layout[g]] for g in attention])
    assert (moved != 0).float().mean() > 0.99 and moved.norm() == pytest.approx(1.0, rel=0.2)
    untouched = [g for g in layout if g not in attention]
    assert all(torch.count_nonzero(full[layout[g]]) == 0 for g in untouched)
    again = SearchSpace(bam26(), ("scorer.w_s",), {}, Subspace(attention, 8, seed=3))
    assert torch.equal(again.full_params(row), full)  # the directions come from the seed alone
    assert SearchSpace(policy, (), {}, Subspace(attention, 8)).dim == 8
    offset = SearchSpace(policy, ("scorer.w_s",), {}, Subspace(attention, 8, seed=3, offset=0.1))
    start = offset.full_params(torch.zeros(offset.dim))
    assert 0.05 < start[layout["scorer.w_qkv"]].std() < 0.2 and torch.count_nonzero(start[layout["scorer.w_s"]]) == 0
    with pytest.raises(InvalidConfigError, match="directly and through the subspace"):
        SearchSpace(policy, ("scorer.w_o",), {}, Subspace(attention, 8))
    with pytest.raises(InvalidConfigError, match="positive count"):
        Subspace(attention, 0)
    with pytest.raises(InvalidConfigError, match="unknown parameter group"):
        SearchSpace(policy, (), {}, Subspace(("scorer.w_z",), 4))


def test_an_evolution_config_searches_a_subspace(tmp_path):
    data = {**TINY_SHARED, "subspace": {"groups": ["scorer.w_qkv", "scorer.b_qkv", "scorer.w_o", "scorer.b_o"],
                                        "dim": 6}}  # fmt: skip
    result = Evolution(EvolveConfig.from_dict(data), tmp_path).run()
    assert result.best_params.numel() == 26 + 6
    with pytest.raises(InvalidConfigError, match="subspace"):
        Evolution(EvolveConfig.from_dict({**TINY_SHARED, "subspace": {"dim": 6}}), tmp_path / "bad")
