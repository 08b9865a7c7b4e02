"""`handle.report(row=i)`: one batch row's cache alone, valid slots only, equal to a batch of one."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import streaming

import kvpolicy
from kvpolicy.errors import ShapeError
from kvpolicy.integrations.hf.tiny import random_ids

TOKENS, EVERY = 160, 32


def namm_population(members: int, seed: int) -> tuple[kvpolicy.Policy, torch.Tensor]:
    """NAMM-BAM updating every 32 tokens, with a population wide enough that rows keep different counts."""
    policy = kvpolicy.build("namm-bam", every=EVERY, extractor={"period": EVERY})
    population = torch.randn(members, policy.num_params, generator=torch.Generator().manual_seed(seed)) * 0.3
    return policy, population


def test_each_row_reports_what_that_member_alone_keeps(llama):
    # seed 2: no row re-scores a padded slot as worth keeping (tests/evolve/test_population_batch.py
    # holds a seed where one does, which changes what that row keeps)
    policy, population = namm_population(3, seed=2)
    ids = random_ids(1, TOKENS, seed=3)
    policy.set_flat(population)
    with policy.attach(llama) as handle:
        handle.feed(ids.expand(3, -1), chunk_size=EVERY)
        rows = [handle.report(row=i) for i in range(3)]
        whole = handle.report()
        padded = [layer.valid is not None for layer in handle.cache.layers]
        stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in handle.cache.layers)
        counted = [
            tuple(tuple(float(n) for n in layer.valid[i].sum(-1).tolist()) if layer.valid is not None
                  else (float(layer.tokens),) * layer.keys.shape[1] for layer in handle.cache.layers)
            for i in range(3)
        ]  # fmt: skip
    assert any(padded), "rows must keep different counts for this test to mean anything"
    assert len({r.kept_fraction for r in rows}) == 3
    assert [r.kept for r in rows] == counted  # valid slots of each row, counted from the cache itself

    for i, row in enumerate(rows):
        policy.set_flat(population[i])
        with policy.attach(llama) as handle:
            handle.feed(ids, chunk_size=EVERY)
            alone = handle.report()
        assert row.kept == alone.kept
        assert row.kv_bytes == alone.kv_bytes and row.full_kv_bytes == alone.full_kv_bytes
        assert row.seen == alone.seen == TOKENS

    # the whole-batch report is unchanged: kept averaged over rows, bytes as physically stored
    for layer, per_row in zip(whole.kept, zip(*(r.kept for r in rows), strict=True), strict=True):
        assert layer == pytest.approx(tuple(sum(heads) / 3 for heads in zip(*per_row, strict=True)))
    assert whole.kv_bytes == stored
    assert sum(r.kv_bytes for r in rows) < stored  # padded slots are stored but belong to no row
    assert sum(r.full_kv_bytes for r in rows) == whole.full_kv_bytes


def test_rows_without_padding_add_up_to_the_batch(llama):
    with streaming(budget=10).attach(llama) as handle:
        handle.feed(random_ids(2, 40, seed=18), chunk_size=8)
        whole = handle.report()
        rows = [handle.report(row=i) for i in range(2)]
    assert all(r.kept == ((10.0, 10.0), (10.0, 10.0)) for r in rows)
    assert sum(r.kv_bytes for r in rows) == whole.kv_bytes
    assert rows[0].kept_fraction == whole.kept_fraction == 0.25


@pytest.mark.parametrize("row", [2, -1, True, 0.5])
def test_a_row_that_does_not_exist_is_refused(llama, row):
    with streaming(budget=10).attach(llama) as handle:
        handle.feed(random_ids(2, 12, seed=1))
        with pytest.raises(ShapeError, match=r"the cache holds 2 rows \(rows 0\.\.1\)"):
            handle.report(row=row)


def test_a_row_of_an_empty_cache_is_refused(llama):
    with streaming(budget=10).attach(llama) as handle:
        with pytest.raises(ShapeError, match="the cache is empty, feed tokens first"):
            handle.report(row=0)
