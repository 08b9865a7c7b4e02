"""``--executor processes``: evaluation jobs on spawned worker processes (the tiny Llama in
each) store exactly the results of the in-process run, and a rerun computes nothing."""

from __future__ import annotations

import pytest
from distributed_support import MODEL, in_process, line_count, runs_into, stored, suite

from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval.distributed import evaluate_distributed, make_pool


@pytest.fixture(scope="module")
def pool():
    pool = make_pool("processes", MODEL, workers=2, threads=1)
    yield pool
    pool.close()


@pytest.mark.parametrize("shared_prefill", [False, True])
def test_workers_store_the_in_process_results_and_a_rerun_computes_nothing(pool, tmp_path, shared_prefill):
    items = suite()
    in_process(tmp_path / "here", items, shared_prefill=shared_prefill)
    out = tmp_path / "pool"
    kwargs = dict(model_name=MODEL, chunk_size=128, reference_dir=out / "ref", shared_prefill=shared_prefill,
                  progress=False)  # fmt: skip
    jobs = evaluate_distributed(runs_into(out), items, pool, **kwargs)
    # one job per item and run, plus each item's reference; or one job per item sharing its prefill
    assert jobs == (len(items) if shared_prefill else len(items) * 3)
    assert stored(out) == stored(tmp_path / "here")
    assert line_count(out) == {"h2o@48": 4, "snapkv@25%": 4, "full": 4}
    assert evaluate_distributed(runs_into(out), items, pool, **kwargs) == 0
    assert line_count(out) == {"h2o@48": 4, "snapkv@25%": 4, "full": 4}


def test_context_first_jobs_store_the_in_process_results(pool, tmp_path):
    """Under context-first the shared job forks SnapKV from the context's recording and runs H2O's
    own chunked prefill of the context, exactly as in-process; the four questions of a
    `multikey-shared` context are one job."""
    import torch

    from kvpolicy.eval.tasks import build_suite

    items = suite() + build_suite(["multikey-shared"], "test", [384], range(4))
    cf, threads = "context-first", torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: float sums split over threads differ in the 7th digit
    try:
        in_process(tmp_path / "here", items, shared_prefill=True, protocol=cf)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "pool"
    jobs = evaluate_distributed(runs_into(out), items, pool, model_name=MODEL, chunk_size=128,
                                reference_dir=out / "ref", shared_prefill=True, progress=False, protocol=cf)  # fmt: skip
    assert jobs == 4 + 1
    assert stored(out, cf) == stored(tmp_path / "here", cf)
    assert line_count(out, cf) == {"h2o@48": 8, "snapkv@25%": 8, "full": 8}
    assert {r["protocol"] for records in stored(out, cf).values() for r in records} == {cf}


def test_a_partly_done_run_computes_only_what_is_missing(pool, tmp_path):
    items = suite()
    kwargs = dict(model_name=MODEL, chunk_size=128, reference_dir=tmp_path / "ref", progress=False)
    assert evaluate_distributed(runs_into(tmp_path)[:1], items[:2], pool, **kwargs) == 4
    assert evaluate_distributed(runs_into(tmp_path), items, pool, **kwargs) == 2 + 2 + 4


def test_bad_pool_arguments_are_named_errors():
    with pytest.raises(InvalidConfigError, match="--workers must be a positive count"):
        make_pool("processes", MODEL, workers=0)
    with pytest.raises(InvalidConfigError, match="unknown executor"):
        make_pool("threads", MODEL, workers=2)  # type: ignore[arg-type]
