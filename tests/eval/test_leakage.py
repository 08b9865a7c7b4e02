"""The lexical cue rule (`kvpolicy.eval.leakage`): it finds the answer of a cued task from the
question alone while keeping a few percent of the context, and nothing without a shared cue."""

from __future__ import annotations

import attrs

from kvpolicy.eval.leakage import leakage_table, lexical_keep, main
from kvpolicy.eval.tasks import build_suite, make_item


def test_a_cued_needle_leaks_and_an_uncued_question_does_not() -> None:
    items = build_suite(["needle", "multikey"], "train", [2048], range(1000, 1006))
    for item in items:
        kept = lexical_keep(item)
        assert kept.answer_kept and kept.kept_fraction < 0.1
    item = make_item("needle", "train", 1000, 2048)
    uncued = attrs.evolve(item, question="Tell me.", answer_prefix="Answer:")
    assert not lexical_keep(uncued).answer_kept
    assert lexical_keep(attrs.evolve(item, context="")).kept_fraction == 0.0
    assert lexical_keep(item, window=100_000).kept_fraction == 1.0


def test_list_answers_need_every_value(capsys) -> None:
    item = make_item("multivalue", "train", 1000, 1024)
    values = item.answers[0].split(", ")
    wider = attrs.evolve(item, question=item.question + " " + " ".join(values))
    assert lexical_keep(wider).answer_kept  # each value is a cue now, so each is kept
    assert "| multivalue | 1 |" in leakage_table([item])
    assert main(["--tasks", "needle", "--lengths", "1024", "--seeds", "2"]) == 0
    assert "| needle | 2 | 2/2 |" in capsys.readouterr().out
