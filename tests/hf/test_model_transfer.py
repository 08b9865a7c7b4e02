"""A policy file records the model it was made for; attaching it to another model is a visible
zero-shot transfer: a warning once per pair of models (unless chosen) and a note in the report."""

from __future__ import annotations

import warnings

import pytest
import torch

import kvpolicy
from kvpolicy import Policy
from kvpolicy.checkpoint import ModelRecord
from kvpolicy.errors import ModelTransferWarning
from kvpolicy.integrations.hf import transfer
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model
from kvpolicy.integrations.hf.transfer import model_record


def _generate(policy: Policy, model) -> tuple[str, ...]:
    with policy.attach(model) as handle:
        model.generate(random_ids(1, 40), max_new_tokens=2, do_sample=False)
        return handle.report().notes


def test_the_shipped_namm_records_the_model_it_was_evolved_on():
    assert kvpolicy.build("namm-bam-smollm2").made_for == ModelRecord("smollm2-135m-instruct", 30, 3, 64)


def test_a_policy_saved_for_a_model_round_trips_its_record(tmp_path):
    model = tiny_model("llama")
    record = model_record(model)
    policy = kvpolicy.build("h2o", budget=16)
    policy.save(tmp_path / "p.safetensors", made_for=record)
    loaded = Policy.load(tmp_path / "p.safetensors")
    assert loaded.made_for == record
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelTransferWarning)
        notes = _generate(loaded, model)  # its own model: nothing to say
    assert not any("transfer" in note for note in notes)


def test_attaching_to_another_model_warns_once_and_says_so_in_the_report(monkeypatch):
    monkeypatch.setattr(transfer, "_warned", set())
    model = tiny_model("llama")
    policy = kvpolicy.build("namm-bam-smollm2", every=16)
    with pytest.warns(ModelTransferWarning, match="made for smollm2-135m-instruct .*policy.transfer = True"):
        notes = _generate(policy, model)
    assert any(note.startswith("zero-shot transfer: the policy was made for smollm2") for note in notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelTransferWarning)
        again = _generate(policy, model)  # once per pair of models
    assert any("zero-shot transfer" in note for note in again)


def test_a_chosen_transfer_does_not_warn_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "_warned", set())
    kvpolicy.build("namm-bam-smollm2").save(tmp_path / "namm.safetensors")
    policy = Policy.load(tmp_path / "namm.safetensors", transfer=True)
    assert policy.made_for is not None and policy.transfer
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelTransferWarning)
        notes = _generate(policy, tiny_model("llama"))
    assert any(note.startswith("zero-shot transfer (chosen)") for note in notes)
    assert torch.equal(policy.get_flat(), kvpolicy.build("namm-bam-smollm2").get_flat())
