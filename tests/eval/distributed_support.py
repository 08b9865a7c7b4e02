"""What the distributed-evaluation tests share: a small suite on the tiny random-weight Llama
(``tiny:llama``, the same seeded weights in every worker process), its runs, the in-process
results every executor must reproduce, and a field-by-field comparison that ignores only time."""

from __future__ import annotations

from pathlib import Path

import attrs

from kvpolicy.eval.distributed import PolicyRun
from kvpolicy.eval.many_policies import evaluate_many
from kvpolicy.eval.references import reference_path
from kvpolicy.eval.results import ItemResult, ResultStore
from kvpolicy.eval.run import run_suite
from kvpolicy.eval.tasks import build_suite
from kvpolicy.models import load_named_model

MODEL = "tiny:llama"
CHUNK = 128
RUNS = (PolicyRun("h2o@48", "h2o", "48"), PolicyRun("snapkv@25%", "snapkv", "25%"))


def suite(length: int = 384, seeds: tuple[int, ...] = (0, 1)) -> list:
    return build_suite(["needle", "perplexity"], "test", [length], list(seeds))


def runs_into(out: Path) -> list[tuple[PolicyRun, object, Path]]:
    return [(run, run.build(), out / "runs" / run.label) for run in RUNS]


def in_process(out: Path, items: list, *, shared_prefill: bool = False, protocol: str = "question-aware") -> None:
    """The results of today's in-process path (`run_suite`, or `evaluate_many` first)."""
    model, tokenizer = load_named_model(MODEL)
    runs = runs_into(out)
    if shared_prefill:
        evaluate_many([(run.label, policy, folder) for run, policy, folder in runs], items, model, tokenizer,
                      model_name=MODEL, metric="task", chunk_size=CHUNK, reference_dir=out / "ref", progress=False,
                      protocol=protocol)  # fmt: skip
    for run, policy, folder in runs:
        run_suite(policy, items, model, tokenizer, out=folder, label=run.label, model_name=MODEL, chunk_size=CHUNK,
                  reference_dir=out / "ref", progress=False, protocol=protocol)  # fmt: skip


def stored(out: Path, protocol: str = "question-aware") -> dict[str, list[dict]]:
    """Every stored record of ``out`` (each run's and the references), in file order, without time."""
    files = {run.label: out / "runs" / run.label / "results.jsonl" for run in RUNS}
    files["full"] = reference_path(MODEL, "task", CHUNK, out / "ref", protocol)
    return {
        label: sorted((_timeless(r) for r in ResultStore(path)), key=lambda r: r["uid"])
        for label, path in files.items()
    }


def _timeless(result: ItemResult) -> dict:
    return attrs.asdict(result, filter=lambda field, _: field.name not in ("seconds", "policy_seconds"))


def line_count(out: Path, protocol: str = "question-aware") -> dict[str, int]:
    """Lines per store file: a result recomputed or stored twice shows here."""
    files = [out / "runs" / run.label / "results.jsonl" for run in RUNS] + [
        reference_path(MODEL, "task", CHUNK, out / "ref", protocol)
    ]
    return {
        path.parent.name if path.name == "results.jsonl" else "full": len(path.read_text().splitlines())
        for path in files
    }
