"""Statistics computed inside the attention pass equal the reference path (the model's kernel for
the output, a second pass over the scores for the statistics) — in runs that really evict, with
chunk sizes that do not divide the eviction period, so windows span several forward calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from hf_helpers import RandomScorer

import kvpolicy
from kvpolicy.integrations.hf import in_pass
from kvpolicy.integrations.hf.attention import masked_attention, valid_attention
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.testing import statistics
from kvpolicy.testing.recompute import attach_with
from kvpolicy.types import EmptyConfig, LayerView, Requirements, Schedule
from kvpolicy_plugins.stft import StftConfig, StftExtractor

TOLERANCE = 1e-5


class Recording:
    """Wraps a real extractor: records every view's statistics and the features it returned."""

    name: ClassVar[str] = "recording_wrapper"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.config = getattr(inner, "config", EmptyConfig())
        self.records: list[dict[str, Any]] = []

    @property
    def requirements(self) -> Requirements:
        return self.inner.requirements

    def extract(self, view: LayerView) -> torch.Tensor:
        features = self.inner.extract(view)
        self.records.append(
            {
                "layer": view.layer,
                "seen": view.seen,
                "positions": view.positions.clone(),
                "attention": None if view.attention is None else view.attention.clone(),
                "query_positions": None if view.query_positions is None else view.query_positions.clone(),
                "accumulated": None if view.accumulated_attention is None else view.accumulated_attention.clone(),
                "features": features.clone(),
            }
        )
        return features


class PositionFeatures:
    """A real extractor that declares ``requirements`` and returns the positions as its feature."""

    name: ClassVar[str] = "position_with_requirements"
    Config = EmptyConfig

    def __init__(self, requirements: Requirements) -> None:
        self.config = EmptyConfig()
        self.requirements = requirements

    def extract(self, view: LayerView) -> torch.Tensor:
        return view.positions.to(torch.float32).unsqueeze(-1)


def _run(model, make_policy, ids: torch.Tensor, prompt_chunk: int, mode: str) -> tuple[list[dict], Any]:
    policy, recording = make_policy()
    with attach_with(mode, model, policy) as handle:
        handle.feed(ids[:, :-6], chunk_size=prompt_chunk)
        handle.feed(ids[:, -6:], chunk_size=1)  # decoding, one query per call
        report = handle.report()
    return recording.records, report


def _assert_same_runs(model, make_policy, ids, prompt_chunk, raw_features: Callable | None = None):
    """``raw_features`` maps features back to the statistics they were computed from before
    comparing (undoing a z-scoring or a logarithm, which magnify float noise past any absolute
    tolerance)."""
    fused, report = _run(model, make_policy, ids, prompt_chunk, "in_pass")
    reference, reference_report = _run(model, make_policy, ids, prompt_chunk, "recompute")
    assert report.seen == ids.shape[1]
    assert report.kept_fraction < 1.0, "the run must really evict"
    assert report.kept == reference_report.kept
    assert len(fused) == len(reference) and len(fused) >= 2
    for ours, theirs in zip(fused, reference, strict=True):
        assert (ours["layer"], ours["seen"]) == (theirs["layer"], theirs["seen"])
        assert torch.equal(ours["positions"], theirs["positions"]), "the same tokens were kept"
        for name in ("attention", "accumulated", "features"):
            if theirs[name] is None:
                assert ours[name] is None, name
                continue
            mine, reference = ours[name], theirs[name]
            if name == "features" and raw_features is not None:
                mine, reference = raw_features(mine), raw_features(reference)
            torch.testing.assert_close(mine, reference, atol=TOLERANCE, rtol=0, msg=name)
        if theirs["query_positions"] is not None:
            assert torch.equal(ours["query_positions"], theirs["query_positions"])
    return fused


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_namm_features_equal_the_reference_path_while_evicting(family):
    """NAMM-BAM, a random member, period 16 with 5-token prompt chunks and then decoding: the
    16-query window spans up to four calls; spectrogram features and rows equal to 1e-5."""
    model = tiny_model(family)

    def make():
        recording = Recording(StftExtractor(StftConfig(period=16)))
        policy = kvpolicy.build("namm-bam", extractor=recording, every=16)
        policy.set_flat(torch.randn(policy.num_params, generator=torch.Generator().manual_seed(3)) * 0.3)
        return policy, recording

    records = _assert_same_runs(model, make, random_ids(1, 86, seed=21), prompt_chunk=5)
    assert any(r["attention"].shape[2] == 16 for r in records)


@pytest.mark.parametrize("preset", ["h2o", "tova", "snapkv", "fastgen"])
def test_reference_policies_see_the_same_statistics(llama, preset):
    """Received attention (H2O, FastGen) and rows of the newest queries (TOVA: one, SnapKV: 32,
    spanning seven 5-token calls) equal the reference path while the policies evict."""
    options = {"fastgen": {"budget": 0.5}, "snapkv": {"budget": 16}}.get(preset, {"budget": 12})

    def make():
        policy = kvpolicy.build(preset, **options)
        recording = Recording(policy.extractor)
        return kvpolicy.Policy(
            recording, policy.scorer, policy.selector, schedule=policy.schedule, budget=policy.budget
        ), recording

    _assert_same_runs(llama, make, random_ids(2, 60, seed=22), prompt_chunk=5)


def test_heads_with_padded_slots_see_the_same_statistics(llama):
    """Heads keep different counts (padded slots masked out): rows and received attention agree."""

    def make():
        recording = Recording(PositionFeatures(Requirements(attention_window=6, accumulated_attention=True)))
        policy = kvpolicy.Policy(
            recording,
            RandomScorer(seed=4),
            ("top_k", {"shared_across_heads": True, "min_per_head": 2}),
            schedule=Schedule("every_step", slack=3),
            budget=10,
        )
        return policy, recording

    records = _assert_same_runs(llama, make, random_ids(2, 40, seed=5), prompt_chunk=7)
    assert any(bool((r["positions"] < 0).any()) for r in records), "no padded slots arose"


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_valid_attention_equals_the_masked_reference_on_older_queries(softcap):
    """The path a layer with padded slots takes without statistics (a padded batch's full cache,
    the queries before a policy's window): the reference's output, for queries that are not the
    layer's newest (keys and their validity cut where the queries end), a padded new token
    included."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, past, new, dim = 2, 6, 2, 13, 7, 8
    query = torch.randn(batch, heads, new, dim, generator=generator)
    key = torch.randn(batch, kv_heads, past + new + 5, dim, generator=generator)
    value = torch.randn(batch, kv_heads, past + new + 5, dim, generator=generator)
    valid = torch.rand(batch, kv_heads, past + new + 5, generator=generator) > 0.3
    valid[..., past:] = True
    valid[1, :, past] = False  # row 1's first new token is padding
    visible = past + new
    output = valid_attention(query, key[:, :, :visible], value[:, :, :visible], valid, 0.3, softcap)
    expected = masked_attention(
        torch.nn.Module(), query, key[:, :, :visible], value[:, :, :visible], valid, 0.3, softcap
    )
    torch.testing.assert_close(output, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_attend_equals_the_reference_kernels(softcap):
    """The kernel on its own: output, rows and columns against the reference functions, with GQA,
    padded cached slots, several query chunks and fewer rows than queries."""
    generator = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, past, new, dim = 2, 6, 2, 11, 9, 8
    query = torch.randn(batch, heads, new, dim, generator=generator)
    key = torch.randn(batch, kv_heads, past + new, dim, generator=generator)
    value = torch.randn(batch, kv_heads, past + new, dim, generator=generator)
    valid = torch.rand(batch, kv_heads, past + new, generator=generator) > 0.3
    valid[..., past:] = True
    output, rows, columns = in_pass.attend(
        query, key, value, valid=valid, scaling=0.3, softcap=softcap, rows=4, columns=True, max_elements=40
    )
    expected = masked_attention(torch.nn.Module(), query, key, value, valid, 0.3, softcap)
    torch.testing.assert_close(output, expected, atol=TOLERANCE, rtol=0)
    positions = torch.arange(past + new).expand(batch, kv_heads, -1)
    reference_rows = statistics.attention_rows(
        query[:, :, -4:], torch.arange(past + new - 4, past + new), key, positions, valid, scaling=0.3, softcap=softcap
    )
    torch.testing.assert_close(rows, reference_rows, atol=TOLERANCE, rtol=0)
    reference_columns = statistics.attention_columns(query, key, valid, scaling=0.3, softcap=softcap)
    torch.testing.assert_close(columns, reference_columns, atol=TOLERANCE, rtol=0)
    assert bool((columns[..., :past][~valid[..., :past]] == 0).all()), "padded slots receive no attention"


def test_rows_only_attend_the_window_explicitly(llama):
    """A one-query window (TOVA) over a 12-token chunk: only the newest query is attended
    explicitly, the others by the model's kernel; every logit agrees with a keep-all run's within
    float tolerance, and the window holds that one row."""
    ids = random_ids(1, 12, seed=8)
    with kvpolicy.build("full").attach(llama) as handle:
        plain = handle.feed(ids)
    policy = kvpolicy.build("tova", budget=64)
    with policy.attach(llama) as handle:
        logits = handle.feed(ids)
        window = handle.cache.layers[0].window
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert window.queries == 1 and window.query_positions.tolist() == [[11]]  # not due yet: the row waits


@pytest.mark.parametrize("mode", ["in_pass", "recompute"])
def test_nothing_is_recorded_after_the_last_eviction_pass(llama, monkeypatch, mode):
    """SnapKV's one eviction pass, after the prompt, is its last: the decode steps that follow
    record no statistics on any layer (no attention rows), and their logits
    and kept tokens equal those of a run that goes on recording."""
    ids = random_ids(2, 50, seed=23)
    prompt = 44

    def run() -> tuple[torch.Tensor, list[bool], Any]:
        policy = kvpolicy.build("snapkv", budget=16)
        steps, recorded = [], []
        with attach_with(mode, llama, policy) as handle:
            handle.feed(ids[:, :prompt], chunk_size=5)
            for step in range(prompt, ids.shape[1]):
                steps.append(handle.feed(ids[:, step : step + 1]))
                cache = handle.cache
                layers = [cache.layers[index] for index in cache.managed]
                assert layers and all(layer.eviction_passes == 1 for layer in layers)
                recorded.append(
                    any(layer.window is not None for layer in layers)
                    or any(cache.records_statistics(index) for index in cache.managed)
                )
            report = handle.report()
        return torch.cat(steps, 1), recorded, report

    logits, recorded, report = run()
    assert report.kept_fraction < 1.0, "the run must really evict"
    assert not any(recorded)
    monkeypatch.setattr(kvpolicy.Policy, "will_run_again", lambda self, *, passes_done: True)
    still_recording, recorded, reference = run()
    assert all(recorded), "the reference run records on every decode step"
    torch.testing.assert_close(logits, still_recording, atol=TOLERANCE, rtol=0)
    assert report.kept == reference.kept


@pytest.mark.real_model
def test_shipped_namm_sees_the_same_features_on_smollm2():
    """The shipped evolved NAMM on the real SmolLM2 weights, updating every 48 tokens while fed
    20-token chunks and then decoding: it evicts, keeps the same tokens on both paths, and its
    attention rows and features agree to 1e-5 with the reference path's — the spectrogram before
    its z-scoring, the votes as the mean of the voting rows (the frozen standard deviations, down
    to 0.007, the logarithm and the sum over 32 rows magnify the ~1e-6 float noise that two
    attention kernels leave in the hidden states)."""
    from kvpolicy.data import essays
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    ids = tokenizer(essays()[2][1], return_tensors="pt")["input_ids"][:, :230]

    def make():
        policy = kvpolicy.build("namm-bam-smollm2", every=48)
        recording = Recording(policy.extractor)
        return kvpolicy.Policy(
            recording, policy.scorer, policy.selector, schedule=policy.schedule, budget=policy.budget
        ), recording

    extractor = kvpolicy.build("namm-bam-smollm2").extractor
    config, std = extractor.config, extractor.state_dict()["var"].sqrt().float()
    spectral = config.recency_dims + config.bins

    def raw(features: torch.Tensor) -> torch.Tensor:
        recency, bins, votes = features.split([config.recency_dims, config.bins, features.shape[-1] - spectral], -1)
        return torch.cat([recency, bins * std, votes.exp() / config.votes_window], dim=-1)  # mean row

    records = _assert_same_runs(model, make, ids, prompt_chunk=20, raw_features=raw)
    assert len({r["seen"] for r in records}) >= 4, "several eviction passes"


def test_attend_hides_left_padding_among_the_new_tokens():
    """Padded new tokens (a batch row's left padding inside the chunk): no real query sees them,
    a padded query sees only itself (a finite row), and output, rows and columns of the real
    queries equal the reference kernels'."""
    generator = torch.Generator().manual_seed(8)
    batch, heads, kv_heads, past, new, dim = 2, 4, 2, 5, 7, 8
    query = torch.randn(batch, heads, new, dim, generator=generator)
    key = torch.randn(batch, kv_heads, past + new, dim, generator=generator)
    value = torch.randn(batch, kv_heads, past + new, dim, generator=generator)
    valid = torch.ones(batch, kv_heads, past + new, dtype=torch.bool)
    valid[1, :, : past + 3] = False  # row 1 is still in its padding: all its past and 3 new tokens
    output, rows, columns = in_pass.attend(
        query, key, value, valid=valid, scaling=0.3, rows=new, columns=True, max_elements=24
    )
    assert bool(torch.isfinite(output).all()) and bool(torch.isfinite(rows).all())
    expected = masked_attention(torch.nn.Module(), query, key, value, valid, 0.3, None)
    torch.testing.assert_close(output, expected, atol=TOLERANCE, rtol=0)
    positions = torch.arange(past + new).expand(batch, kv_heads, -1)
    query_positions = torch.arange(past, past + new).expand(batch, -1).clone()
    query_positions[1, :3] = -1
    reference_rows = statistics.attention_rows(query, query_positions, key, positions, valid, scaling=0.3)
    torch.testing.assert_close(rows[0], reference_rows[0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(rows[1, :, 3:], reference_rows[1, :, 3:], atol=TOLERANCE, rtol=0)
    assert bool((rows[1, :, 3:, : past + 3] == 0).all()), "a real query attended a padded token"
    reference_columns = statistics.attention_columns(query, key, valid, scaling=0.3)
    torch.testing.assert_close(columns, reference_columns, atol=TOLERANCE, rtol=0)
