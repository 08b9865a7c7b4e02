"""Tiny random-weight models for tests of a plugin: `tiny_model(family)`, `random_ids`.

They live with the transformers integration (`kvpolicy.integrations.hf.tiny`); this name is
where the testing kit has always offered them to plugin authors.
"""

from kvpolicy.integrations.hf.tiny import BUILDERS, FAMILIES, VOCAB, byte_tokenizer, random_ids, tiny_model

__all__ = ["BUILDERS", "FAMILIES", "VOCAB", "byte_tokenizer", "random_ids", "tiny_model"]
