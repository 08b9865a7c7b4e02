"""Left-padded batches: every row gives the tokens and logits it gives run alone in the same
forward calls, for every built-in preset, with evictions in every row, on every tiny family and
on the real SmolLM2; the report counts each row's own tokens; what cannot work is refused by name."""

from __future__ import annotations

import functools

import pytest
import torch

import kvpolicy
from kvpolicy.integrations.hf.tiny import FAMILIES, byte_tokenizer, random_ids, tiny_model
from kvpolicy.registry import default_registry
from kvpolicy.testing.padding import feed_batch, feed_row_alone, left_pad
from kvpolicy.types import Schedule

TOLERANCE = 1e-4
#: lengths differing by more than 2x; with 8-token chunks the padding (0, 19, 26, 7) is no multiple of 8
LENGTHS = (37, 18, 11, 30)
CHUNK = 8
STEPS = 4
PRESETS = tuple(default_registry().preset_names())


@functools.cache
def _model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_model(family).to(dtype)


#: families whose QK-norm gives every key the same L2 norm up to rounding: L2's ranking of their
#: keys is decided by the last bits, which a batched float32 kernel rounds differently from a
#: batch of one (logits then differ by 1e-2); in float64 the ranking is the same
QK_NORM = ("qwen3", "gemma3")


def evicting(name: str, budget: int = 8) -> kvpolicy.Policy:
    """Preset ``name`` made to evict in every row of a short batch: a small budget, a short
    schedule, no skipped layers, and random parameters for a learned scorer (zero ones keep all)."""
    spec = default_registry().preset(name).config
    overrides: dict = {"skip_layers": ()}
    if spec.selector.name == "top_k" or spec.selector.name == "heavy_recent":
        overrides["budget"] = budget
    if spec.schedule.kind == "every_step":
        overrides["schedule"] = Schedule("every_step", slack=2)
    if spec.schedule.kind == "every_n":
        overrides["every"] = 6  # NAMM with a small eviction period: several passes per row
    if spec.protect.recent > 4:
        overrides["recent"] = 2
    if name == "fastgen":
        overrides["scorer"] = ("fastgen", {"recovery": 0.5})
    # self-sized presets keep nearly all of a 40-token prompt (every token gets > 2% of some
    # repeat query): a higher bar makes them evict, so the rows' equality is not vacuous
    bars = {"kvzip-threshold": 0.2, "namm-threshold-smollm2": 4.5}
    if name in bars:
        overrides["selector"] = ("threshold", {"threshold": bars[name], "per_head": True})
    policy = kvpolicy.build(name, **overrides)
    if policy.requirements.reconstruction:  # KVzip writes its repeat prompt with the tokenizer
        policy.bind_tokenizer(byte_tokenizer())
    if policy.num_params and name.startswith("namm") and not name.endswith("smollm2"):
        policy.set_flat(torch.randn(policy.num_params, generator=torch.Generator().manual_seed(3)))
    return policy


def _prompts(vocab: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(len(LENGTHS), max(LENGTHS), seed=seed) % vocab
    return left_pad([ids[row, : LENGTHS[row]] for row in range(len(LENGTHS))])


def assert_rows_equal_alone(policy, model, ids, mask, chunk=CHUNK, steps=STEPS, *, must_evict=True):
    batch = feed_batch(policy, model, ids, mask, chunk, steps)
    for row in range(ids.shape[0]):
        alone = feed_row_alone(policy, model, ids, mask, row, chunk, steps)
        assert torch.equal(batch.tokens[row : row + 1], alone.tokens), f"row {row}: tokens differ"
        difference = (batch.logits[row : row + 1] - alone.logits).abs().max().item()
        assert difference < TOLERANCE, f"row {row}: logits differ by {difference:.3g}"
        mine, theirs = batch.reports[row], alone.reports[0]
        assert mine.seen == theirs.seen == int(mask[row].sum()) + steps  # padding is never a token seen
        assert mine.kept == theirs.kept and mine.kv_bytes == theirs.kv_bytes - theirs.padding_bytes  # valid slots
        if must_evict:
            assert mine.kept_fraction < 1.0, f"row {row} evicted nothing: the check would be vacuous"
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_on_every_family(family, name):
    """Gemma 3 interleaves sliding-window layers: the attention function masks their padding."""
    model = _model(family, torch.float64 if name.startswith("l2") and family in QK_NORM else torch.float32)
    assert_rows_equal_alone(evicting(name), model, *_prompts(model.config.vocab_size), must_evict=name != "full")


def test_report_counts_each_rows_own_tokens_and_the_padding_stored():
    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    policy = kvpolicy.build("full")
    with policy.attach(model) as handle:
        handle.feed(ids, CHUNK, attention_mask=mask)
        report = handle.report()
    assert report.row_tokens == LENGTHS and report.seen == max(LENGTHS)
    slot = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    layers = model.config.num_hidden_layers
    assert report.full_kv_bytes == sum(LENGTHS) * slot * layers  # a full cache of the real tokens only
    assert report.padding_bytes == sum(max(LENGTHS) - n for n in LENGTHS) * slot * layers
    assert report.kv_bytes == report.full_kv_bytes + report.padding_bytes  # keep-all stores the padding
    assert "per row" in report.summary() and "padding" in report.summary()


def test_a_pass_drops_every_rows_padding():
    """After an eviction pass nothing is stored beyond the longest row per head."""
    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    with evicting("streaming_llm").attach(model) as handle:
        handle.feed(ids, CHUNK, attention_mask=mask)
        handle.feed(ids[:, -1:])
        report = handle.report()
    kept = [handle.report(row=row).kept for row in range(len(LENGTHS))]
    assert max(LENGTHS) > 8 + 2 and all(max(max(h) for h in k if h) <= 8 + 2 for k in kept)
    assert report.padding_bytes < report.kv_bytes / 2


def test_model_generate_with_a_padded_tokenizer_batch():
    """``policy.generate`` and ``model.generate`` inside ``attach`` take a left-padded batch as
    transformers' tokenizers give it; each row decodes what it decodes alone (one prompt call)."""
    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    policy = evicting("h2o")
    result = policy.generate(model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=5, do_sample=False)
    with policy.attach(model):
        inside = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(result.sequences, inside)
    for row, length in enumerate(LENGTHS):
        alone = policy.generate(model, ids[row : row + 1, -length:], max_new_tokens=5, do_sample=False)
        assert torch.equal(result.new_tokens[row : row + 1], alone.new_tokens), row
    assert result.report.row_tokens == tuple(n + 4 for n in LENGTHS)  # the 5th token is never fed back


def test_population_rows_of_a_padded_batch_keep_their_own_parameters():
    """Rows of a population (one parameter set per row) still evaluate as one batch when padded."""
    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    policy = evicting("namm-bam")
    members = torch.randn(len(LENGTHS), policy.num_params, generator=torch.Generator().manual_seed(9))
    policy.set_flat(members)
    batch = feed_batch(policy, model, ids, mask, CHUNK, STEPS)
    for row in range(len(LENGTHS)):
        policy.set_flat(members[row])
        alone = feed_row_alone(policy, model, ids, mask, row, CHUNK, STEPS)
        assert torch.equal(batch.tokens[row : row + 1], alone.tokens)
        assert (batch.logits[row : row + 1] - alone.logits).abs().max() < TOLERANCE


@pytest.fixture(scope="module")
def smollm2():
    from kvpolicy.data import essays
    from kvpolicy.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    # float64: batched float32 kernels round differently from a batch of one (~4e-5 on these
    # logits with the keep-all policy, and a near-tie of key norms can flip a kept token), which
    # would hide a real difference; in float64 every preset agrees to ~1e-13 unless it evicts
    model = model.double()
    words = essays()[0][1].split()
    texts = [" ".join(words[:n]) for n in (70, 31, 22, 52)]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # transformers 5.17 loads it without one
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return model, encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_on_smollm2(smollm2, name):
    model, ids, mask = smollm2
    lengths = mask.sum(1)
    assert int(lengths.max()) >= 2 * int(lengths.min())
    assert_rows_equal_alone(evicting(name, budget=16), model, ids, mask, chunk=16, must_evict=name != "full")


@pytest.mark.parametrize("name", ["h2o", "snapkv", "namm-bam"])
def test_padded_statistics_equal_the_recomputed_reference(name):
    """The in-pass statistics of a padded batch equal the second-pass reference: same kept
    tokens and logits (rows, columns and features are compared through what they decide)."""
    from kvpolicy.testing.recompute import attach_with

    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    results = {}
    for mode in ("in_pass", "recompute"):
        with attach_with(mode, model, evicting(name)) as handle:
            logits = handle.feed(ids, CHUNK, attention_mask=mask)
            logits = torch.cat([logits, handle.feed(logits[:, -1:].argmax(-1))], 1)
            layers = [(layer.positions.clone(), layer.valid) for layer in handle.cache.layers]
        results[mode] = logits, layers
    (in_pass, kept), (recomputed, reference) = results["in_pass"], results["recompute"]
    assert (in_pass - recomputed).abs().max() < TOLERANCE
    for (positions, valid), (expected, expected_valid) in zip(kept, reference, strict=True):
        assert torch.equal(positions, expected) and (valid is None) == (expected_valid is None)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "namm-bam"])
def test_generate_with_chunked_prefill_of_a_padded_batch(name):
    """``generate(..., prefill_chunk_size=8)`` on a left-padded batch makes the same forward calls
    as feeding the batch in 8-column chunks, so it decodes the same tokens, each row as alone."""
    model = _model("llama")
    ids, mask = _prompts(model.config.vocab_size)
    policy = evicting(name)
    result = policy.generate(
        model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=STEPS + 1, do_sample=False,
        prefill_chunk_size=CHUNK,
    )  # fmt: skip
    fed = feed_batch(policy, model, ids, mask, CHUNK, STEPS)
    assert torch.equal(result.new_tokens, torch.cat([fed.tokens, fed.logits[:, -1].argmax(-1, keepdim=True)], 1))
    for row in range(len(LENGTHS)):
        alone = feed_row_alone(policy, model, ids, mask, row, CHUNK, STEPS)
        assert torch.equal(result.new_tokens[row : row + 1, :STEPS], alone.tokens)
