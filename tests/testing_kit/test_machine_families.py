"""The cache state machine on several tiny model families (GQA, hybrid sliding/full layers)."""

from __future__ import annotations

import pytest
from hypothesis.stateful import run_state_machine_as_test

from kvpolicy.testing import strategies as kst
from kvpolicy.testing.machine import cache_machine, machine_settings


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_machine_across_families(family):
    drawn = kst.policies(presets=["h2o", "streaming_llm", "full"])
    machine = cache_machine(drawn, families=(family,), options={"score_order": False})
    run_state_machine_as_test(machine, settings=machine_settings())
