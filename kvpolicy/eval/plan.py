"""The frozen evaluation plan: the test split runs only where a committed plan says it may.

Choices (kernels, budgets, configs, which tasks to keep) are made on validation items; the test
split is scored once per shipped result, under a plan written first (``docs/eval-plan.json``,
described in ``docs/eval-plan.md``). The plan names *blocks* of test seeds; each block lists, per
model, the tasks and context lengths it holds, and the protocols it is run under. A run of the
test split must fall inside one block, and a *sealed* block (kept for one final comparison) runs
only when the run names it (``--unseal BLOCK``). Every run records the plan's sha256 and the
block, so a table can be traced to the plan that allowed it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from kvpolicy.errors import CheckpointError, InvalidConfigError
from kvpolicy.eval.items import Item
from kvpolicy.eval.protocols import PROTOCOLS

PLAN_FORMAT = "kvpolicy.eval-plan/1"
DEFAULT_PLAN = Path("docs") / "eval-plan.json"


@attrs.frozen
class Block:
    """Test seeds ``[first_seed, first_seed + seeds)`` of the tasks and lengths listed per model."""

    name: str
    first_seed: int
    seeds: int
    models: Mapping[str, Mapping[str, tuple[Any, ...]]]
    protocols: tuple[str, ...]
    sealed: bool = False
    #: the cache budgets (ratios of the tokens seen) a run may use; empty: any
    budgets: tuple[float, ...] = ()

    def check_budgets(self, budgets: Iterable[str | float | None]) -> None:
        """Refuse a budget the block does not plan (a self-sized policy's run has none)."""
        if not self.budgets:
            return
        from kvpolicy.types.policy_config import Budget

        for given in budgets:
            if given is None:
                continue
            ratio = Budget.parse(given).ratio
            if ratio is None or not any(abs(ratio - planned) < 1e-9 for planned in self.budgets):
                planned = ", ".join(f"{b:.3g}" for b in self.budgets)
                raise InvalidConfigError(
                    f"block {self.name} plans the budgets {planned} (ratios of the tokens seen), not {given!r}"
                )

    def holds(self, item: Item, model: str) -> bool:
        entry = self.models.get(model)
        return (
            entry is not None
            and item.split == "test"
            and item.task in entry["tasks"]
            and item.length in entry["lengths"]
            and self.first_seed <= item.seed < self.first_seed + self.seeds
        )


@attrs.frozen
class EvalPlan:
    blocks: tuple[Block, ...]
    sha256: str
    path: Path

    def block_for(self, items: Iterable[Item], model: str, protocol: str, unseal: str | None = None) -> Block:
        """The one block holding every item for ``model`` under ``protocol``, or a named error."""
        items = list(items)
        for block in self.blocks:
            if all(block.holds(item, model) for item in items):
                if protocol not in block.protocols:
                    raise InvalidConfigError(
                        f"block {block.name} of {self.path} is planned for {', '.join(block.protocols)}, not {protocol}"
                    )
                if block.sealed and unseal != block.name:
                    raise InvalidConfigError(
                        f"block {block.name} of {self.path} is sealed for one final comparison; run it with "
                        f"--unseal {block.name} only when that comparison is due"
                    )
                return block
        outside = next(
            (i for i in items if not any(b.holds(i, model) for b in self.blocks)), items[0] if items else None
        )
        where = f"item {outside.uid} on {model}" if outside is not None else "an empty run"
        raise InvalidConfigError(
            f"the test split runs only inside one block of the frozen plan {self.path}; {where} is in none "
            f"(blocks: {', '.join(b.name for b in self.blocks)}). Make choices on --split validation, and add a "
            "block to the plan in a commit of its own before scoring the test split"
        )


def _block(name: str, data: Any) -> Block:
    try:
        models = {
            model: {"tasks": tuple(entry["tasks"]), "lengths": tuple(int(n) for n in entry["lengths"])}
            for model, entry in data["models"].items()
        }
        block = Block(
            name,
            int(data["first_seed"]),
            int(data["seeds"]),
            models,
            tuple(data["protocols"]),
            bool(data["sealed"]),
            tuple(float(b) for b in data.get("budgets", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"block {name!r} of the evaluation plan is malformed ({exc!r})") from exc
    if unknown := sorted(set(block.protocols) - set(PROTOCOLS)):
        raise CheckpointError(f"block {name!r} of the evaluation plan names unknown protocols {unknown}")
    return block


def load_plan(path: str | Path = DEFAULT_PLAN) -> EvalPlan:
    """The plan at ``path``; without one the test split cannot run (a named error says why)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(
            f"the test split runs only under a frozen evaluation plan, and {path} does not exist; run from the "
            "repository root (or give --plan), or score --split validation"
        )
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable evaluation plan ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("blocks"), dict):
        raise CheckpointError(f"{path} is not an evaluation plan (expected format {PLAN_FORMAT!r} and blocks)")
    blocks = tuple(_block(name, block) for name, block in data["blocks"].items())
    return EvalPlan(blocks, hashlib.sha256(raw).hexdigest(), path)
