"""The last raw tracebacks of the integration are named kvpolicy errors: a batch row that does not
exist, token ids outside the vocabulary, a fractional chunk size, embeddings in another dtype,
and a batch row of padding only (which otherwise ran and gave that row wrong tokens)."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import streaming

from kvpolicy.errors import (
    InvalidConfigError,
    InvalidInputError,
    KVPolicyError,
    ShapeError,
    UnsupportedPaddingError,
)
from kvpolicy.integrations.hf.tiny import VOCAB, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def test_fork_row_of_a_row_that_does_not_exist(model):
    with streaming(budget=16).attach(model) as handle:
        handle.feed(random_ids(2, 20, seed=1))
        with pytest.raises(ShapeError, match=r"fork_row\(5\): the cache holds 2 rows \(rows 0..1\)"):
            with handle.fork_row(5):
                pass
        with pytest.raises(ShapeError, match="fork_row"):
            with handle.fork_row(-1):
                pass
        with handle.fork_row(1) as forked:  # a row that exists still forks
            forked.feed(random_ids(1, 3, seed=2))
        assert handle.cache.seen == 20


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_token_ids_outside_the_vocabulary(model, bad):
    ids = random_ids(1, 12, seed=3)
    ids[0, 5] = bad
    with streaming(budget=16).attach(model) as handle:
        with pytest.raises(InvalidInputError, match=f"token id {bad} is outside the model's vocabulary"):
            handle.feed(ids)
    with streaming(budget=16).attach(model):
        with pytest.raises(InvalidInputError, match="outside the model's vocabulary"):
            model.generate(ids, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("chunk_size", [2.5, "8", True, 0])
def test_a_chunk_size_that_is_not_a_whole_number(model, chunk_size):
    with streaming(budget=16).attach(model) as handle:
        with pytest.raises(InvalidConfigError, match="chunk_size must be a whole number of tokens"):
            handle.feed(random_ids(1, 12, seed=4), chunk_size=chunk_size)


def test_embeddings_in_another_dtype(model):
    embeds = model.get_input_embeddings()(random_ids(1, 10, seed=5)).detach()
    with streaming(budget=16).attach(model) as handle:
        with pytest.raises(
            InvalidInputError, match="inputs_embeds are torch.float64, but the model runs in torch.float32"
        ):
            handle.feed_embeds(embeds.double())
        handle.reset()
        assert handle.feed_embeds(embeds).shape[:2] == (1, 10)  # its own dtype runs


def test_a_batch_row_of_padding_only(model):
    ids = random_ids(2, 10, seed=6)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1] = 0
    with streaming(budget=16).attach(model) as handle:
        with pytest.raises(UnsupportedPaddingError, match=r"batch rows \[1\] are padding only"):
            handle.feed(ids, attention_mask=mask)
    with streaming(budget=16).attach(model):
        with pytest.raises(UnsupportedPaddingError, match="padding only"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    mask[1, -1] = 1  # one real token is enough
    with streaming(budget=16).attach(model) as handle:
        handle.feed(ids, attention_mask=mask)


def test_every_error_here_is_a_kvpolicy_error():
    for error in (ShapeError, InvalidInputError, InvalidConfigError, UnsupportedPaddingError):
        assert issubclass(error, KVPolicyError)
