"""Offline long-context evaluation: tasks built from real text pip installs, metrics, one driver
that measures score, cache kept and time per row (`evaluate`), the ways rows are prepared for it
(`ItemRows`, `PopulationRows`, `ForkedRows`, `ContextRows`), the two protocols
(``question-aware``, ``context-first``: `PROTOCOLS`), full-cache references and reports.

Programmatic use (e.g. by the evolution runner)::

    from kvpolicy.eval import evaluate, get_profile, reference_results

    items = get_profile("ci").items("train")
    refs = reference_results(items, model, tokenizer, model_name="smollm2-135m-instruct")
    results = evaluate(policy, items, model, tokenizer, metric="loglik")

See docs/evaluation.md.
"""

from kvpolicy.eval.harness import evaluate, run_item
from kvpolicy.eval.items import SPLITS, Item
from kvpolicy.eval.profiles import PROFILES, Profile, get_profile
from kvpolicy.eval.protocols import PROTOCOLS
from kvpolicy.eval.references import reference_results
from kvpolicy.eval.results import ItemResult, ResultStore
from kvpolicy.eval.rows import ContextRows, ForkedRows, ItemRows, PopulationRows
from kvpolicy.eval.run import RunSummary, run_suite
from kvpolicy.eval.tasks import TASKS, build_suite, make_item

__all__ = [
    "PROFILES",
    "PROTOCOLS",
    "ContextRows",
    "ForkedRows",
    "ItemRows",
    "PopulationRows",
    "SPLITS",
    "TASKS",
    "Item",
    "ItemResult",
    "Profile",
    "ResultStore",
    "RunSummary",
    "build_suite",
    "evaluate",
    "get_profile",
    "make_item",
    "reference_results",
    "run_item",
    "run_suite",
]
