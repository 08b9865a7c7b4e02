"""Memory freed by eviction is handed back to the operating system after each prefill chunk."""

from __future__ import annotations

import ctypes.util
import sys

import pytest
import torch

import kvpolicy
import kvpolicy.integrations.hf.cache as cache_module
from kvpolicy.integrations.hf import memory_release as memory
from kvpolicy.integrations.hf.tiny import random_ids, tiny_model

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""), reason="glibc only"
)


@glibc
def test_release_freed_memory_calls_glibc():
    assert memory.release_freed_memory() is True


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(memory.ENV, raising=False)
    else:
        monkeypatch.setenv(memory.ENV, value)
    model = tiny_model("llama")
    with kvpolicy.build("tova", budget=32).attach(model) as handle:
        assert handle.cache.release_memory is expected


@pytest.mark.parametrize("preset", ["full", "tova"])
def test_released_after_every_chunk_not_every_decoding_step(monkeypatch, preset):
    calls = []

    def counted() -> bool:
        calls.append(1)
        return memory.release_freed_memory()

    monkeypatch.delenv(memory.ENV, raising=False)
    monkeypatch.setattr(cache_module, "release_freed_memory", counted)
    model = tiny_model("llama")
    ids = random_ids(1, 80, seed=3)
    policy = kvpolicy.build("full") if preset == "full" else kvpolicy.build(preset, budget=32)
    with torch.inference_mode(), policy.attach(model) as handle:
        logits = handle.feed(ids, chunk_size=16, last_only=True)  # 5 chunks
        assert len(calls) == 5
        for _ in range(4):
            logits = handle.feed(logits[:, -1].argmax(-1, keepdim=True), last_only=True)
        assert len(calls) == 5
        handle.cache.release_memory = False
        handle.feed(random_ids(1, 32, seed=4), chunk_size=16)
        assert len(calls) == 5
