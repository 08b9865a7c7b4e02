"""What a policy forgets: token classes, the kept share read from the cache, and the resumable table."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy
from kvpolicy.errors import InvalidConfigError
from kvpolicy.eval import forgetting
from kvpolicy.eval.tasks import make_item


@pytest.mark.parametrize(
    ("piece", "code", "after_newline", "expected"),
    [
        ("    ", True, True, "indentation"),
        ("\n        ", True, False, "indentation"),
        ("\n", True, False, "whitespace"),
        (" ", True, False, "whitespace"),
        (" def", True, False, "keyword"),
        ("match", True, False, "keyword"),
        (" maxlen", True, False, "identifier"),
        (" maxlen", False, False, "word"),
        ("437", True, False, "number"),
        (" 0.5", False, False, "number"),
        ("):", True, False, "punctuation"),
        ("(x", True, False, "other"),
    ],
)
def test_token_classes(piece: str, code: bool, after_newline: bool, expected: str) -> None:
    assert forgetting.token_class(piece, code=code, after_newline=after_newline) == expected


def test_the_answer_class_marks_exactly_the_tokens_that_spell_it(tiny_tokenizer) -> None:
    text = "alpha beta 7351 gamma delta 7351"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    classes = forgetting.classify(ids, tiny_tokenizer, code=False, answer="7351")
    marked = "".join(tiny_tokenizer.decode([i]) for i, c in zip(ids, classes, strict=True) if c == "answer")
    assert marked.replace(" ", "") == "73517351"
    assert "answer" not in forgetting.classify(ids, tiny_tokenizer, code=False, answer="9999")


def test_the_kept_share_is_what_the_cache_holds(tiny_model) -> None:
    context = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    assert torch.equal(forgetting.compress_context(tiny_model, kvpolicy.build("full"), context, 64)[0], torch.ones(200))
    streaming = kvpolicy.build("streaming_llm", budget=0.25)
    share, heads = forgetting.compress_context(tiny_model, streaming, context, 64)
    assert share[:4].eq(1).all() and share[-40:].eq(1).all()  # sinks and the recent window
    # its pass runs before each chunk, so the last chunk (tokens 136-199, after 100 kept) stays whole
    assert share[4:100].eq(0).all()
    assert heads == [[104 / 200] * 2] * 2  # two layers of two KV heads, each holding 104 of 200 tokens
    snap, heads = forgetting.compress_context(tiny_model, kvpolicy.build("snapkv", budget=0.25), context, 64)
    assert 0.2 <= float(snap.mean()) <= 0.3
    assert float(snap.min()) < float(snap.max())  # heads disagree: a share, not a 0/1 mask
    assert float(snap.mean()) == pytest.approx(sum(map(sum, heads)) / 4, abs=1e-6)


@pytest.mark.parametrize("preset", ["snapkv", "kvzip"])
def test_item_shares_cover_the_context_and_weight_to_the_cache_kept(tiny_model, tiny_tokenizer, preset) -> None:
    item = make_item("multikey-shared", "train", 1000, 512)
    policy = kvpolicy.build(preset, budget=0.25)
    compressed = forgetting.compress_item(tiny_model, tiny_tokenizer, item, preset, policy, chunk_size=128)
    tokens = sum(n for n, _ in compressed.classes.values())
    weighted = sum(n * kept for n, kept in compressed.classes.values()) / tokens
    assert weighted == pytest.approx(compressed.cache_kept, abs=1e-5)
    assert set(compressed.classes) >= {"answer", "word", "punctuation"}


def test_the_table_is_resumable_and_refuses_the_test_split(tmp_path) -> None:
    out = tmp_path / "forget"
    args = ("tiny:llama", "multikey-shared", 384, [0], ["snapkv", "streaming_llm"], 0.25, out)
    rows = forgetting.run(*args, chunk_size=128)
    assert {r["policy"] for r in rows} == {"snapkv@0.25", "streaming_llm@0.25"}
    records = (out / "records.jsonl").read_text()
    assert (out / "forgetting.png").stat().st_size > 0 and (out / "heads.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| token class |" in summary and "| layer |" in summary
    forgetting.run(*args, chunk_size=128)  # resumed: nothing recomputed, nothing appended twice
    assert (out / "records.jsonl").read_text() == records
    assert sorted(r["policy"] for r in map(json.loads, records.splitlines())) == ["snapkv@0.25", "streaming_llm@0.25"]
    assert forgetting.head_map([json.loads(line) for line in records.splitlines()], "snapkv@0.25").shape[0] >= 1
    with pytest.raises(InvalidConfigError, match="frozen plan"):
        forgetting.run(*args[:-1], tmp_path / "t", split="test")


def test_a_saved_self_sized_policy_is_labelled_by_its_file_name(tmp_path) -> None:
    path = tmp_path / "my-memory.safetensors"
    threshold = ("threshold", {"threshold": 100.0, "per_head": True})  # keeps positions >= 100 and 4 sinks
    policy = kvpolicy.Policy("position", "feature", threshold, schedule=kvpolicy.Schedule("after_prefill"), sinks=4)
    policy.save(path)
    rows = forgetting.run(
        "tiny:llama", "multikey-shared", 384, [0], [str(path)], 0.25, tmp_path / "forget", chunk_size=128
    )
    assert {r["policy"] for r in rows} == {"my-memory"}  # its file's name, no budget: it sizes itself
    assert 0.5 < rows[0]["cache_kept"] < 0.95
