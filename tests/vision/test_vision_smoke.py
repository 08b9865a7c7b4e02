"""The vision modality end to end, small (CI, well under a minute): the digit-video task, the
shipped LLaVA through ``policy.generate`` (keep-all bit-identical to the bare model), the asked
frame's role, what an evicting policy keeps read from the cache, the training and curves commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="needs the vision extra: pip install 'kvpolicy[vision]'")

import kvpolicy  # noqa: E402
from kvpolicy.errors import CheckpointError, InvalidConfigError  # noqa: E402
from kvpolicy.vision import evaluate, task  # noqa: E402
from kvpolicy.vision import model as vision_model  # noqa: E402
from kvpolicy.vision.cli import main  # noqa: E402
from kvpolicy.vision.train import train  # noqa: E402


@pytest.fixture(scope="module")
def vlm():
    torch.set_num_threads(1)
    return vision_model.load()


@pytest.fixture(scope="module")
def videos():
    return task.test_videos(25)


def test_a_video_is_many_image_tokens_and_the_question_names_one_frame_by_its_content():
    video = task.draw_video(np.random.default_rng(0), "test")
    ids = video.input_ids()
    assert int((ids == task.IMAGE).sum()) == 96 * 16 >= 1500
    assert len(set(video.keys)) == video.frames  # the key singles out one frame
    assert ids[0, -1] == task.KEY0 + video.keys[video.asked]
    assert sorted(set(video.values)) == list(range(10))  # every value recurs: no frame is special
    blank = video.without_frame(video.asked)
    assert torch.equal(blank.pixel_values[video.asked], torch.full((1, 16, 16), -1.0))
    with pytest.raises(InvalidConfigError):
        task.draw_video(np.random.default_rng(0), "test", frames=101)


def test_keep_all_generate_is_bit_identical_to_the_bare_model(vlm, videos):
    video = videos[0]
    inputs = {"input_ids": video.input_ids(), "pixel_values": video.pixel_values}
    with torch.no_grad():
        bare = vlm.generate(
            **inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    result = kvpolicy.build("full").generate(
        vlm, inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(result.sequences, bare.sequences)
    assert result.report.seen == video.input_ids().shape[1] + 1


def test_the_model_answers_from_the_asked_frame(vlm, videos):
    answers = [v.answer for v in videos]
    full = evaluate.answer_batch(vlm, kvpolicy.build("full"), videos).predicted
    blanked = evaluate.bare_answers(vlm, [v.without_frame(v.asked) for v in videos])
    correct = sum(p == a for p, a in zip(full, answers, strict=True))
    without = sum(p == a for p, a in zip(blanked, answers, strict=True))
    assert correct >= 0.6 * len(videos) > 2 * without


def test_what_a_policy_keeps_is_read_from_the_cache(vlm, videos):
    batch = videos[:5]
    answers = evaluate.answer_batch(vlm, kvpolicy.build("streaming_llm", budget=0.125), batch)
    assert answers.evicting_layers == (0, 1)
    assert all(0.1 < k < 0.15 for k in answers.kept_fraction)
    per_frame = answers.kept_per_frame
    assert per_frame.shape == (5, 96)
    assert torch.all(per_frame[:, -8:] == 1.0)  # StreamingLLM keeps the newest frames whole
    assert torch.all(per_frame[:, 10:80] == 0.0)  # and nothing of the middle


def test_the_training_command_saves_a_loadable_model(tmp_path):
    out = tmp_path / "tiny.safetensors"
    metadata = train(minutes=0.03, eval_items=2, out=out, log=lambda *_: None)
    model = vision_model.load(out)
    assert model.kvpolicy_metadata == metadata and metadata["steps"] >= 1
    with pytest.raises(CheckpointError):
        vision_model.load(tmp_path / "missing.safetensors")


def test_the_curves_command_writes_records_and_a_table(tmp_path, capsys):
    assert (
        main(["curves", "--out", str(tmp_path), "--items", "3", "--budgets", "0.25", "--presets", "h2o", "kvzip"]) == 0
    )
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == [0, 1, 2] and {r["policy"] for r in records} == {"h2o@0.25"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "KVzip" in summary["unsupported"]["kvzip"]
    assert (tmp_path / "accuracy_vs_cache.png").stat().st_size > 0
    assert "h2o@0.25" in (tmp_path / "summary.md").read_text()


def test_a_resumed_grid_is_summarised_by_preset_then_budget():
    from kvpolicy.vision.curves import THIRDS, summarize

    def record(preset: str, budget: float | None, asked: float = 0.5, correct: bool = True) -> dict:
        shares = {f"kept_{p}_third": 0.5 for p in THIRDS}
        label = preset if budget is None else f"{preset}@{budget:g}"
        return {
            "policy": label,
            "preset": preset,
            "budget": budget,
            "correct": correct,
            "kept": 0.5,
            "kept_asked_frame": asked,
            "frames_touched": 3,
            **shares,
        }

    written = [
        record("tova", 0.5),
        record("h2o", 0.5),
        record("tova", 0.05),
        record("full", None),
        record("h2o", 0.125),
    ]
    assert [r["policy"] for r in summarize(written)] == ["full", "h2o@0.125", "h2o@0.5", "tova@0.05", "tova@0.5"]


def test_the_summary_splits_accuracy_by_whether_the_asked_frame_survived():
    from kvpolicy.vision.curves import THIRDS, summarize

    shares = {f"kept_{p}_third": 0.1 for p in THIRDS}
    base = {"policy": "h2o@0.1", "preset": "h2o", "budget": 0.1, "kept": 0.1, "frames_touched": 2, **shares}
    records = [
        {**base, "kept_asked_frame": 0.25, "correct": True},
        {**base, "kept_asked_frame": 0.25, "correct": False},
        {**base, "kept_asked_frame": 0.0, "correct": False},
        {**base, "kept_asked_frame": 0.0, "correct": False},
    ]
    (row,) = summarize(records)
    assert row["asked_frame_survived"] == 0.5
    assert row["accuracy_when_survived"] == 0.5 and row["accuracy_when_lost"] == 0.0
    (all_lost,) = summarize([{**r, "kept_asked_frame": 0.0} for r in records])
    assert all_lost["accuracy_when_survived"] is None
