"""Result files always resume: a record torn anywhere (inside a multi-byte character too) is
dropped with a warning, and a whole record that is not what a run writes is a named error
giving its line."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from test_eval_report import result

from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.results import ResultStore


def _line(name: str, **changes) -> str:
    data = result(name, "needle", 1.0).to_dict() | changes
    return json.dumps(data, ensure_ascii=False)


def test_a_record_torn_inside_a_multibyte_character_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(_line("a") + "\n", encoding="utf-8")
    whole = _line("b", prediction="Ελληνικά 漢字").encode("utf-8")
    cut = whole.index("漢".encode()) + 1  # one byte into a three-byte character
    with path.open("ab") as handle:
        handle.write(whole[:cut])
    with pytest.warns(UserWarning, match="torn last line"):
        store = ResultStore(path)
    assert [r.uid for r in store] == ["a"]
    store.add(attrs.evolve(result("c", "needle", 0.0), prediction="漢字"))
    assert [r.uid for r in ResultStore(path)] == ["a", "c"]
    assert ResultStore(path).get("c").prediction == "漢字"


def test_a_torn_record_followed_by_another_writers_record_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    torn = _line("b")[:40]
    path.write_text(_line("a") + "\n" + torn + _line("c") + "\n" + _line("d") + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="torn line 2"):
        store = ResultStore(path)
    assert [r.uid for r in store] == ["a", "d"]  # b and c are recomputed


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"score": "1.0"}, "score"),
        ({"score": float("nan")}, "score"),
        ({"score": float("inf")}, "score"),
        ({"kept_fraction": 7.5}, "kept_fraction"),
        ({"kept_fraction": -0.1}, "kept_fraction"),
        ({"per_layer_fraction": [0.5, 1.5]}, "per_layer_fraction"),
        ({"tokens_seen": "10"}, "tokens_seen"),
        ({"tokens_seen": True}, "tokens_seen"),
        ({"length": -5}, "length"),
        ({"uid": 3}, "uid"),
        ({"answer_logprob": 0.5}, "answer_logprob"),
        ({"seconds": None}, "seconds"),
        ({"extra": 1}, "extra"),
    ],
)
def test_an_invalid_record_is_a_named_error_with_its_line(tmp_path: Path, changes, field) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(_line("a") + "\n" + _line("b", **changes) + "\n" + _line("c") + "\n")
    with pytest.raises(CheckpointError, match=rf"results.jsonl:2 is not a valid result record .*{field}"):
        ResultStore(path)


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    data = result("a", "needle", 1.0).to_dict()
    del data["score"]
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(CheckpointError, match=r"results.jsonl:1 .*missing fields \['score'\]"):
        ResultStore(path)


def test_a_result_the_reader_would_refuse_is_never_written(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results.jsonl")
    with pytest.raises(InvalidConfigError, match="item 'a' cannot be stored: field 'score'"):
        store.add(result("a", "needle", float("nan")))
    path = tmp_path / "results.jsonl"
    assert not path.exists() or not path.read_text()
