"""Layer 3: the Hugging Face transformers integration (the only code that imports transformers).

- `cache`: the evicting cache (keys, values, absolute positions and per-token state kept together);
- `attention`: the attention and mask functions registered while a policy is attached;
- `statistics`: attention rows / accumulated attention, computed only when a policy asks;
- `attach`: `Attachment` (context manager), `Handle` (feed / reset / report), `GenerationResult`;
- `adapter`: supported model families; `plugin`: the ``hf`` entry point.
"""
