"""The ``ci`` profile on the real SmolLM2: the harness ranks random eviction at a small budget
below the full cache by more than the paired standard error. Slow on a loaded CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.eval.profiles import get_profile
from kvpolicy.eval.run import run_suite

pytestmark = pytest.mark.real_model


def test_random_eviction_ranks_below_full_cache(tmp_path: Path) -> None:
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    items = get_profile("ci").items("test", tasks=("needle", "multikey"))
    common = dict(model_name="smollm2-135m-instruct", reference_dir=tmp_path / "refs", progress=False)
    bad = run_suite(
        kvpolicy.build("random", budget=64), items, model, tokenizer, out=tmp_path / "random", label="random", **common
    )
    overall = bad.overall
    assert overall.reference > 0.5  # the full cache solves most retrieval items at 1k tokens
    assert overall.kept_fraction < 0.15  # measured: 64 of ~1000 tokens per head
    assert -overall.delta > max(overall.delta_se, 0.05)  # random eviction loses more than its standard error
