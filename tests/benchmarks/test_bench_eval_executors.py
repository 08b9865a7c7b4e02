"""The executor benchmark's in-process leg and its executor-independent outcome, at a tiny size
on the shipped model (the pooled legs are the distributed tests' subject). Timings are never
asserted."""

from __future__ import annotations

import argparse


def test_the_outcome_lists_every_result_of_every_job(load_benchmark):
    bench = load_benchmark("bench_eval_executors")
    args = argparse.Namespace(
        model="smollm2-135m-instruct", length=256, seeds=1, policies=["streaming_llm"], budget="25%", threads=1
    )
    jobs = bench.jobs_for(args)[:2]  # two tasks' items are enough to read the outcome's shape
    seconds, results = bench.in_process(args, jobs)
    outcome = bench.outcome(results)
    assert seconds > 0 and sorted(outcome) == [job.index for job in jobs]
    for rows in outcome.values():
        assert len(rows) == 1
        uid, policy, score, _prediction, kept = rows[0]
        assert policy == "streaming_llm@25%" and 0.0 < kept <= 1.0 and 0.0 <= score <= 1.0
