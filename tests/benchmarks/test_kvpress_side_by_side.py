"""kvpolicy's side of the kvpress comparison at a tiny size (the kvpress venv is not built here):
each press's counterpart runs in a fresh process through the long-context benchmark's child."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def side_by_side(load_benchmark):
    return load_benchmark("kvpress_side_by_side")


@pytest.mark.parametrize("press", ["tova", "snapkv"])
def test_kvpolicys_side_runs_each_press_counterpart(side_by_side, press):
    result = side_by_side.kvpolicy_side("tiny:llama", 320, press, "25%", 64, decode=3, threads=1)
    assert result is not None, "the kvpolicy child failed (its stderr is printed above)"
    assert 0 < result["kv_bytes"] < result["full_kv_bytes"]
    assert len(result["generated"]) == 3 and result["prefill_s"] > 0 and result["peak_above_model_bytes"] >= 0
    # SnapKV runs evicting after every chunk (/chunk), as the comparison's table says
    assert result["schedule"] == ("every_n 64" if press == "snapkv" else "every_step")
