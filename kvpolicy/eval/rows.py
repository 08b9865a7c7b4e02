"""Ways of putting evaluation items into batch rows and prefilling them, before `decoding` continues.

`kvpolicy.eval.harness.evaluate` is the one driver; a *row plan* says how items become rows and how
a batch of rows is prefilled:

- `ItemRows` (the default): one row per item, ``batch_size`` items as one left-padded batch. The
  prompt is fed in chunks of ``chunk_size`` with eviction passes between them, as NAMM prefills
  (Cetin et al. 2024, every 512 tokens); ``align="end"`` puts the chunk boundaries at whole chunks
  before each prompt's end, so every row of a padded batch meets the boundaries and eviction
  passes it would meet alone (a batch of one aligned at the end is the reference a batch equals).
- `PopulationRows`: one row per member of a population ``[members, num_params]``, the item
  repeated in every row (no padding) and batch row *i* scored with parameter row *i*
  (`Policy.set_flat`), as the NAMM code batches its CMA-ES population.
- `ForkedRows`: rows forked from a prefill shared by all of them
  (`kvpolicy.integrations.hf.shared_prefill`), for policies whose first eviction pass comes after
  the whole prompt: one row, or one per member of a population.
- `ContextRows` (``context-first``): items that share a context share its compressed cache, one
  row per question.

Each plan's `prefill` yields a `Prefilled`: the attached handle and the logits of every row's last
prompt token ``[rows, vocab]``. Results equal row-by-row runs up to the rounding of batched kernels.
Under the ``context-first`` protocol (`kvpolicy.eval.protocols`) every plan prefills and
compresses the context alone, seals the cache and then feeds the question and the answer prompt
(`kvpolicy.integrations.hf.context_first`); a forked plan forks the prefill of the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import attrs
import torch

from kvpolicy.errors import InvalidConfigError, ShapeError
from kvpolicy.eval.items import Item
from kvpolicy.eval.prompting import EncodedItem
from kvpolicy.eval.protocols import EvalProtocol
from kvpolicy.integrations.hf.batching import left_pad
from kvpolicy.integrations.hf.context_first import prefill_context_first
from kvpolicy.integrations.hf.shared_prefill import Prefill, fork

ChunkAlign = Literal["start", "end"]
#: ``start``: prefill chunks from the prompt's first token (the last takes the remainder);
#: ``end``: from its last (the first takes the remainder), what left-padded batches need
CHUNK_ALIGNMENTS: tuple[str, ...] = ("start", "end")


@attrs.frozen(eq=False)
class Row:
    """One batch row: the item, its encoding, and the label its result carries."""

    item: Item
    encoded: EncodedItem
    label: str


@attrs.frozen(eq=False)
class Prefilled:
    """Rows after their prompts: the attached ``handle`` and the logits ``last [rows, vocab]`` that
    predict each row's first answer token; ``seconds`` is time spent before (a shared prefill)."""

    handle: Any
    last: torch.Tensor
    seconds: float = 0.0


class RowPlan(Protocol):
    """How items become rows (`rows`), which rows share a batch (`batches`) and how a batch is
    prefilled (`prefill`); ``chunks`` is the prompt chunking its results record."""

    chunks: ChunkAlign

    def rows(self, item: Item, encoded: EncodedItem, label: str) -> list[Row]: ...

    def batches(self, rows: Sequence[Row]) -> list[list[Row]]: ...

    def prefill(
        self, policy: Any, model: Any, batch: Sequence[Row], chunk_size: int, protocol: EvalProtocol
    ) -> contextlib.AbstractContextManager[Prefilled]: ...


def context_first(row: Row, protocol: EvalProtocol) -> bool:
    """Whether ``row`` is prefilled context first. An item without a context (a closed-book run)
    or without anything after it (a continuation scored by likelihood) is one prompt under both
    protocols: there is no question to keep from the passes."""
    return protocol == "context-first" and 0 < row.encoded.context_tokens < row.encoded.prompt_tokens


def shared_prompt(row: Row, protocol: EvalProtocol) -> torch.Tensor:
    """The tokens a prefill shared by many policies covers: the whole prompt, or under
    ``context-first`` the context alone (the question is fed after each fork's eviction pass)."""
    ids = row.encoded.prompt_ids
    return ids[:, : row.encoded.context_tokens] if context_first(row, protocol) else ids


@attrs.frozen
class ItemRows:
    """One row per item; ``batch_size`` items of similar prompt length as one left-padded batch."""

    batch_size: int = 1
    align: ChunkAlign = "start"

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.align not in CHUNK_ALIGNMENTS:
            raise InvalidConfigError(f"chunk_align must be one of {', '.join(CHUNK_ALIGNMENTS)}, got {self.align!r}")
        if self.batch_size > 1 and self.align != "end":
            raise InvalidConfigError(
                "a padded batch chunks each prompt from its end: use align='end' with batch_size > 1"
            )

    @property
    def chunks(self) -> ChunkAlign:
        return self.align

    def rows(self, item: Item, encoded: EncodedItem, label: str) -> list[Row]:
        return [Row(item, encoded, label)]

    def batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        if self.batch_size == 1:
            return [[row] for row in rows]
        # prompts of similar length batch together, so little of a batch is padding
        ordered = sorted(rows, key=lambda row: row.encoded.prompt_tokens)
        return [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]

    @contextlib.contextmanager
    def prefill(
        self, policy: Any, model: Any, batch: Sequence[Row], chunk_size: int, protocol: EvalProtocol
    ) -> Iterator[Prefilled]:
        with torch.inference_mode(), policy.attach(model) as handle:
            handle.reset()
            if len(batch) == 1:
                ids, mask = batch[0].encoded.prompt_ids, None
            else:
                ids, mask = left_pad([row.encoded.prompt_ids[0] for row in batch], pad_id=0)
                mask = mask.to(model.device)
            ids, align_end = ids.to(model.device), self.align == "end"
            if all(context_first(row, protocol) for row in batch):
                ends = [row.encoded.context_tokens for row in batch]
                last = prefill_context_first(handle, ids, ends, chunk_size, attention_mask=mask, align_end=align_end)
            else:
                last = handle.feed(ids, chunk_size, attention_mask=mask, last_only=True, align_end=align_end)[:, -1]
            yield Prefilled(handle, last)


def check_population(policy: Any, population: torch.Tensor) -> torch.Tensor:
    """``population`` as float32 ``[members, num_params]``, or a named error saying what fits."""
    if policy.num_params == 0:
        raise InvalidConfigError(f"policy {policy!r} has no learnable parameters, so it has no population to evaluate")
    population = torch.as_tensor(population)
    if (
        population.dim() != 2
        or population.shape[0] < 1
        or population.shape[1] != policy.num_params
        or not population.is_floating_point()
    ):
        raise ShapeError(
            f"a population is a float tensor [members >= 1, {policy.num_params}] (one parameter row per member); "
            f"got {tuple(population.shape)} ({population.dtype})"
        )
    return population.float()


@contextlib.contextmanager
def _population_loaded(policy: Any, population: torch.Tensor | None) -> Iterator[None]:
    """The policy holds ``population`` (one parameter row per batch row) inside the block, and its
    own parameters again after it."""
    if population is None:
        yield
        return
    previous = policy.get_flat()
    policy.set_flat(population)
    try:
        yield
    finally:
        policy.set_flat(previous)


def _member_rows(item: Item, encoded: EncodedItem, label: str, members: int | None) -> list[Row]:
    if members is None:
        return [Row(item, encoded, label)]
    return [Row(item, encoded, f"{label}[{i}]") for i in range(members)]


def _per_item(rows: Sequence[Row]) -> list[list[Row]]:
    """The rows of each item as one batch (an item's members share their prompt)."""
    batches: dict[str, list[Row]] = {}
    for row in rows:
        batches.setdefault(row.item.uid, []).append(row)
    return list(batches.values())


@attrs.frozen(eq=False)
class PopulationRows:
    """One row per member of ``population [members, num_params]``, each item in its own batch."""

    population: torch.Tensor
    chunks: ChunkAlign = attrs.field(default="start", init=False)

    def rows(self, item: Item, encoded: EncodedItem, label: str) -> list[Row]:
        return _member_rows(item, encoded, label, self.population.shape[0])

    def batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        return _per_item(rows)

    @contextlib.contextmanager
    def prefill(
        self, policy: Any, model: Any, batch: Sequence[Row], chunk_size: int, protocol: EvalProtocol
    ) -> Iterator[Prefilled]:
        population = check_population(policy, self.population)
        prompt = batch[0].encoded.prompt_ids.expand(population.shape[0], -1).to(model.device)
        with _population_loaded(policy, population), torch.inference_mode(), policy.attach(model) as handle:
            handle.reset()
            if context_first(batch[0], protocol):
                last = prefill_context_first(handle, prompt, batch[0].encoded.context_tokens, chunk_size)
            else:
                last = handle.feed(prompt, chunk_size, last_only=True)[:, -1]
            yield Prefilled(handle, last)


@attrs.frozen(eq=False)
class ForkedRows:
    """Rows forked from the prefill ``prefill_for(row)`` returns for an item (make it once, keep it
    in a `kvpolicy.eval.prefills.PrefillStore` across calls): one row, or one per member of
    ``population``. ``evict=False`` forks the full cache of the same prefill (the reference)."""

    prefill_for: Callable[[Row], Prefill]
    population: torch.Tensor | None = None
    evict: bool = True
    chunks: ChunkAlign = attrs.field(default="start", init=False)

    def rows(self, item: Item, encoded: EncodedItem, label: str) -> list[Row]:
        return _member_rows(item, encoded, label, None if self.population is None else self.population.shape[0])

    def batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        return _per_item(rows)

    @contextlib.contextmanager
    def prefill(
        self, policy: Any, model: Any, batch: Sequence[Row], chunk_size: int, protocol: EvalProtocol
    ) -> Iterator[Prefilled]:
        shared = self.prefill_for(batch[0])  # chunked when it was made
        if shared.prompt_tokens != shared_prompt(batch[0], protocol).shape[1]:
            raise InvalidConfigError(
                f"the shared prefill covers {shared.prompt_tokens} tokens; under {protocol} this item's prefill "
                f"covers {shared_prompt(batch[0], protocol).shape[1]}: make it with `shared_prompt(row, protocol)`"
            )
        population = None if self.population is None else check_population(policy, self.population)
        with (
            _population_loaded(policy, population),
            fork(shared, policy, model, len(batch), evict=self.evict) as handle,
        ):
            last = shared.last_logits.expand(len(batch), -1)
            if context_first(batch[0], protocol):
                handle.seal()
                rest = batch[0].encoded.prompt_ids[:, batch[0].encoded.context_tokens :].to(model.device)
                last = handle.feed(rest.expand(len(batch), -1), chunk_size, last_only=True)[:, -1]
            yield Prefilled(handle, last, seconds=shared.seconds)


def _context_key(row: Row) -> tuple[int, bytes]:
    ids = row.encoded.prompt_ids[0, : row.encoded.context_tokens]
    return row.encoded.context_tokens, ids.numpy().tobytes()


@attrs.frozen
class ContextRows:
    """``context-first`` only: items whose contexts are the same tokens share one compressed cache.

    Under ``context-first`` what a policy keeps of a context cannot depend on the question asked
    after it, so several questions of one document need one compression: the context is
    prefilled and compressed once (with the policy's own schedule, passes between chunks
    included), the sealed cache is repeated to one row per question, and the questions go in as
    one left-padded batch. An item with a context of its own is a batch of one, computed exactly
    as `ItemRows` computes it."""

    chunks: ChunkAlign = attrs.field(default="start", init=False)

    def rows(self, item: Item, encoded: EncodedItem, label: str) -> list[Row]:
        return [Row(item, encoded, label)]

    def batches(self, rows: Sequence[Row]) -> list[list[Row]]:
        groups: dict[Any, list[Row]] = {}
        for index, row in enumerate(rows):  # an item with nothing to share (no question) stays alone
            key = _context_key(row) if context_first(row, "context-first") else index
            groups.setdefault(key, []).append(row)
        return list(groups.values())

    @contextlib.contextmanager
    def prefill(
        self, policy: Any, model: Any, batch: Sequence[Row], chunk_size: int, protocol: EvalProtocol
    ) -> Iterator[Prefilled]:
        if protocol != "context-first":
            raise InvalidConfigError("ContextRows shares a compressed context between questions: it runs context-first")
        if not context_first(batch[0], protocol):  # one prompt under both protocols
            with ItemRows().prefill(policy, model, batch, chunk_size, protocol) as prefilled:
                yield prefilled
            return
        first = batch[0].encoded
        with torch.inference_mode(), policy.attach(model) as handle:
            handle.reset()
            handle.feed(first.prompt_ids[:, : first.context_tokens].to(model.device), chunk_size, last_only=True)
            handle.seal()
            if len(batch) > 1:
                handle.cache.batch_repeat_interleave(len(batch))
            rests = [row.encoded.prompt_ids[0, row.encoded.context_tokens :] for row in batch]
            if len({len(rest) for rest in rests}) == 1:
                ids, mask = torch.stack(rests), None
            else:
                ids, mask = left_pad(rests, pad_id=0)
                mask = mask.to(model.device)
            last = handle.feed(ids.to(model.device), chunk_size, attention_mask=mask, last_only=True)[:, -1]
            yield Prefilled(handle, last)
