"""Tier 3: the Hugging Face transformers integration (with the model loaders, the only code that
imports transformers; docs/architecture.md).

- `cache`: the evicting cache (keys, values, absolute positions and per-token state kept
  together) and the eviction pass;
- `attention`: the attention and mask functions registered while a policy is attached;
- `statistics`, `in_pass`, `window`: attention rows / accumulated attention, computed only when a
  policy asks;
- `attach`: `Attachment` (the transformers wiring), `Handle` (feed / reset / report),
  `GenerationResult`;
- `adapter`: supported model families; `plugin`: the ``hf`` entry point;
- `tiny`: tiny random-weight models and a byte-level tokenizer; `parts`: plain transformers
  objects the upper tiers need (a Llama backbone, a bare cache).
"""
