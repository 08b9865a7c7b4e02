"""Tier 3: the Hugging Face transformers integration (with the model loaders, the only code that
imports transformers; docs/architecture.md).

- `cache`: the evicting cache (positions handed to each forward call, the append, the eviction
  pass between calls); `layer`: one layer's storage (keys, values, positions and per-token state
  kept together, the gather); `layer_view`: what a policy sees of a layer; `eviction`: one
  layer's eviction pass (which rows are due, plan, gather);
- `attention`: the attention and mask functions registered while a policy is attached;
  `in_pass`, `window`: the attention rows / accumulated attention a policy asked for, computed in
  the attention pass and kept until its eviction pass;
- `attach`: `Attachment` (the transformers wiring); `generate`: the ``model.generate`` wrapper
  and `GenerationResult`; `handle`: `Handle` (feed / reset / report); `report`: `CacheReport`;
- `shared_prefill`: one prompt prefilled once, forked for many parameter rows;
- `adapter`: supported model families; `plugin`: the ``hf`` entry point;
- `tiny`: tiny random-weight models and a byte-level tokenizer (the tests' and plugin authors');
  `parts`: plain transformers objects the upper tiers need (a Llama backbone, a bare cache);
  `batching`: rows of token ids as one left-padded batch.
"""
