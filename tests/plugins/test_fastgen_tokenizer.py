"""FastGen's token classes are filled from the tokenizer the policy runs with."""

from __future__ import annotations

import kvpolicy


class _Tokenizer:
    """The three things `token_classes` reads from a Hugging Face tokenizer."""

    all_special_ids = [0]
    _texts = ["<s>", "hello", " ,", ".", " world", "!?"]

    def __len__(self) -> int:
        return len(self._texts)

    def batch_decode(self, ids):
        return [self._texts[i[0]] for i in ids]


def test_bind_tokenizer_fills_empty_token_classes():
    policy = kvpolicy.build("fastgen")
    assert policy.extractor.config.special_ids == ()
    policy.bind_tokenizer(_Tokenizer())
    assert policy.extractor.config.special_ids == (0,)
    assert policy.extractor.config.punctuation_ids == (2, 3, 5)
    assert '"punctuation_ids": [2, 3, 5]' in policy.to_json()


def test_explicit_token_classes_are_kept():
    policy = kvpolicy.build("fastgen", extractor={"special_ids": [4]})
    policy.bind_tokenizer(_Tokenizer())
    assert policy.extractor.config.special_ids == (4,)
    assert policy.extractor.config.punctuation_ids == ()


def test_policies_without_tokenizer_aware_parts_are_unchanged():
    policy = kvpolicy.build("h2o", budget=64)
    before = policy.to_json()
    policy.bind_tokenizer(_Tokenizer())
    assert policy.to_json() == before
