"""A hypothesis state machine driving a real evicting cache under a policy.

`cache_machine(...)` builds a `RuleBasedStateMachine` that attaches a policy to a tiny
random-weight model (`kvpolicy.integrations.hf.tiny`) and runs prefill chunks, decode steps and resets in
drawn orders; the batch's rows may start with drawn left padding (a left-padded batch, each
row counting and evicting its own tokens). After every step it checks, on every layer the
policy manages and for every row:

- positions strictly increase per head and are true absolute positions: the keys and values
  kept in each slot are bit-identical to those written for that position;
- an evicted token never comes back;
- protected tokens (sinks, the recent window, the newest token) are always kept;
- at every eviction pass: the selection keeps within the budget (or the selector's own rule), keeps
  every protected token and evicts no token scored above an unprotected survivor of its head
  (unless the selector declares ``keeps_highest_scores = False``);
- a keep-all policy (schedule ``never``) gives logits identical to the bare model's (unpadded
  batches; the bare model masks padding in its own way, equal only to rounding).

Usage (pytest collects the ``TestCase``)::

    TestH2O = cache_machine(policies=kvpolicy.testing.strategies.policies(presets=["h2o"])).TestCase
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvpolicy.integrations.hf.tiny import FAMILIES, VOCAB, byte_tokenizer, tiny_model
from kvpolicy.policy import Policy, build
from kvpolicy.registry import Registry
from kvpolicy.testing import strategies as kst
from kvpolicy.testing.invariants import keeps_highest_scores, raise_if, selection_violations
from kvpolicy.testing.profiles import machine_examples

#: tokens one example may feed before the machine only resets
MAX_TOKENS = 40


@functools.cache
def _model(family: str, copy: int = 0) -> torch.nn.Module:
    """Tiny models are built once per family; ``copy`` 1 is an identical bare twin."""
    return tiny_model(family, seed=0)


def _ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


class _PassRecorder:
    """Wraps one policy's ``selector.select`` (on the instance only) to record every eviction pass."""

    def __init__(self, policy: Policy) -> None:
        self.records: list[dict[str, Any]] = []
        selector = policy.selector
        original = selector.select

        def select(scores, protected, budget, view):
            selection = original(scores, protected, budget, view)
            self.records.append(
                dict(
                    layer=view.layer,
                    seen=view.seen,
                    scores=scores.detach().clone(),
                    protected=protected & (view.positions >= 0),  # padded slots of a ragged cache are no tokens
                    capacity=budget.capacity(view.seen) if budget.is_set else None,
                    selection=selection,
                )
            )
            return selection

        selector.select = select


class PolicyCacheMachine(RuleBasedStateMachine):
    """Rules and invariants; `cache_machine` subclasses it with the strategies to draw from."""

    def __init__(self) -> None:
        super().__init__()
        self.attachment = None
        self.handle = None

    # ----------------------------------------------------------------- set-up

    def start(self, policy: Policy, family: str, batch: int, seed: int, padding: tuple[int, ...] = ()) -> None:
        self.policy, self.family, self.batch, self.seed = policy, family, batch, seed
        #: left padding of each row in the first call after a reset (0: none)
        self.padding = tuple(padding[:batch]) + (0,) * max(0, batch - len(padding))
        self.recorder = _PassRecorder(policy)
        self.model = _model(family)
        if policy.requirements.reconstruction:  # KVzip writes its repeat prompt with the tokenizer
            policy.bind_tokenizer(byte_tokenizer())
        self.attachment = policy.attach(self.model)
        self.handle = self.attachment.__enter__()
        self.keep_all = policy.schedule.kind == "never"
        self.score_order = self.options.get("score_order", keeps_highest_scores(policy.selector))
        self.bare = _model(family, copy=1) if self.keep_all else None
        self._fresh()

    def _fresh(self) -> None:
        self.handle.reset()
        self.cache = self.handle.cache
        self.fed = 0
        self.pads = [0] * self.batch  # padding each row got (columns before its first token)
        self.steps = 0
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.absent: dict[int, torch.Tensor] = {}  # [batch, kv_heads, positions] once evicted
        self.bare_cache = None
        self.recorder.records.clear()
        self._record_writes(self.cache)

    def _record_writes(self, cache: Any) -> None:
        """Keep a copy of every key and value written to a managed layer (the ground truth)."""

        def append(key_states, value_states, layer_idx, *args, **kwargs):
            # Copies of the cache share this wrapper (KVzip's repeat pass appends to one): the
            # cache the forward call runs on is the attachment's, and only this one's writes count.
            target = self.attachment.cache
            if layer_idx in cache.managed and target is cache:
                keys, values = self.written.get(layer_idx, (None, None))
                k, v = key_states.detach().clone(), value_states.detach().clone()
                self.written[layer_idx] = (
                    k if keys is None else torch.cat([keys, k], 2),
                    v if values is None else torch.cat([values, v], 2),
                )
            return type(target).update(target, key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = append  # transformers' update only appends

    def teardown(self) -> None:
        if self.attachment is not None:
            self.attachment.__exit__(None, None, None)
            self.attachment = None

    # ----------------------------------------------------------------- rules

    def _feed(self, tokens: int, chunk: int | None) -> None:
        ids = _ids(self.batch, tokens, self.seed + self.fed)
        mask = None
        if self.fed == 0 and any(self.padding):
            self.pads = [min(pad, tokens - 1) for pad in self.padding]
            mask = torch.ones_like(ids)
            for row, pad in enumerate(self.pads):
                mask[row, :pad] = 0
        logits = self.handle.feed(ids, chunk_size=chunk, attention_mask=mask)
        self.fed += tokens
        self.steps += 1
        if self.bare is not None and not any(self.pads):
            self._compare_with_bare(ids, chunk, logits)
        self._check_passes()

    @precondition(lambda self: self.fed + 2 <= MAX_TOKENS)
    @rule(tokens=st.integers(2, 12), chunk=st.one_of(st.none(), st.integers(1, 6)))
    def prefill(self, tokens: int, chunk: int | None) -> None:
        self._feed(min(tokens, MAX_TOKENS - self.fed), chunk)

    @precondition(lambda self: 0 < self.fed < MAX_TOKENS)
    @rule()
    def decode(self) -> None:
        self._feed(1, None)

    @precondition(lambda self: self.fed > 0)
    @rule()
    def reset(self) -> None:
        self._fresh()

    # ----------------------------------------------------------------- checks

    def _compare_with_bare(self, ids: torch.Tensor, chunk: int | None, logits: torch.Tensor) -> None:
        from kvpolicy.integrations.hf.attach import cache_keyword
        from kvpolicy.integrations.hf.parts import bare_cache

        if self.bare_cache is None:
            self.bare_cache = bare_cache(self.bare)
        keyword = cache_keyword(self.bare)
        with torch.no_grad():
            for part in ids.split(chunk or ids.shape[1], dim=1):
                bare = self.bare(input_ids=part, use_cache=True, **{keyword: self.bare_cache}).logits
        if not torch.equal(bare, logits):
            raise_if(
                [f"max |difference| {(bare - logits).abs().max().item():.3g} after {self.fed} tokens"],
                "a keep-all policy changed the logits of the bare model",
            )

    def _layers(self):
        for index in self.cache.managed:
            layer = self.cache.layers[index]
            if getattr(layer, "positions", None) is not None:
                yield index, layer

    def _check_passes(self) -> None:
        problems = []
        for record in self.recorder.records:
            found = selection_violations(
                record["selection"],
                record["scores"],
                record["protected"],
                record["capacity"],
                score_order=self.score_order,
            )
            problems += [f"layer {record['layer']} eviction pass at {record['seen']} tokens: {p}" for p in found]
        self.recorder.records.clear()
        raise_if(problems, f"{self.policy} broke the selection rules")

    def _row_tokens(self) -> list[int]:
        return [self.fed - pad for pad in self.pads]

    @invariant()
    def tokens_are_counted(self) -> None:
        if self.handle is not None:
            problems = (
                [f"cache.seen is {self.cache.seen}, {self.fed} columns were fed"] if self.cache.seen != self.fed else []
            )
            counted = [] if self.cache.row_seen is None else self.cache.row_seen.tolist()
            if self.fed and counted != self._row_tokens():
                problems.append(f"rows counted {counted} tokens; they were fed {self._row_tokens()} (padding excluded)")
            raise_if(problems, "the cache lost count of the tokens it saw")

    @invariant()
    def kept_tokens_are_true(self) -> None:
        """Positions ascend per head; each slot's key and value are those written at its position."""
        if self.handle is None:
            return
        problems = []
        for index, layer in self._layers():
            valid = layer.valid if layer.valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
            positions = layer.positions
            for b in range(positions.shape[0]):
                for h in range(positions.shape[1]):
                    kept = positions[b, h][valid[b, h]]
                    if (kept[1:] <= kept[:-1]).any():
                        problems.append(f"layer {index} batch {b} head {h}: positions {kept.tolist()} do not ascend")
            pads = torch.tensor(self.pads).view(-1, 1, 1)
            limit = torch.tensor(self._row_tokens()).view(-1, 1, 1)
            real = positions.clamp(min=0) + pads  # the column each row's position was written at
            if bool(((positions < 0) | (positions >= limit)).masked_select(valid).any()):
                problems.append(f"layer {index}: a kept position lies outside its row's [0, tokens seen)")
                continue
            keys, values = self.written[index]
            index_k = real.unsqueeze(-1).expand(*real.shape, keys.shape[-1])
            expected_keys, expected_values = keys.gather(2, index_k), values.gather(2, index_k)
            mask = valid.unsqueeze(-1)
            if not torch.equal(layer.keys * mask, expected_keys * mask):
                problems.append(f"layer {index}: kept keys differ from the keys written at their positions")
            if not torch.equal(layer.values * mask, expected_values * mask):
                problems.append(f"layer {index}: kept values differ from the values written at their positions")
        raise_if(problems, "kept tokens do not match what was written")

    @invariant()
    def evicted_stay_evicted_and_protected_stay(self) -> None:
        if self.handle is None:
            return
        problems = []
        protect = self.policy.protect
        for index, layer in self._layers():
            valid = layer.valid if layer.valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
            batch, heads, _ = layer.positions.shape
            present = torch.zeros(batch, heads, self.fed + 1, dtype=torch.bool)
            present.scatter_add_(-1, layer.positions.clamp(min=0), valid)
            present = present[..., : self.fed]
            absent = self.absent.get(index)
            if absent is not None and bool((present[..., : absent.shape[-1]] & absent).any()):
                problems.append(f"layer {index}: an evicted token came back")
            must = torch.zeros(batch, 1, self.fed, dtype=torch.bool)
            for row, tokens in enumerate(self._row_tokens()):
                must[row, :, : min(protect.sinks, tokens)] = True
                must[row, :, max(0, tokens - max(protect.recent, 1)) : tokens] = True
                present[row, :, tokens:] = True  # positions a row has not reached are not "evicted"
            self.absent[index] = ~present
            lost = must & ~present
            if bool(lost.any()):
                b, h, p = lost.nonzero()[0].tolist()
                problems.append(f"layer {index}: protected position {p} missing from batch {b} head {h}")
        raise_if(problems, f"{self.policy} broke its cache invariants")

    options: Mapping[str, Any] = {}


def cache_machine(
    policies: st.SearchStrategy[Policy] | None = None,
    families: tuple[str, ...] = ("llama",),
    max_batch: int = 2,
    options: Mapping[str, Any] | None = None,
    name: str = "CacheMachine",
    max_padding: int = 5,
) -> type[PolicyCacheMachine]:
    """A `PolicyCacheMachine` drawing its policy from ``policies`` (every preset with drawn
    budget / protection / schedule by default), its model from ``families``, a batch of 1 to
    ``max_batch`` rows and up to ``max_padding`` left-padding columns per row (0: unpadded).
    ``options``: ``score_order`` overrides the selector's declaration."""
    policies = policies if policies is not None else kst.policies()
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown tiny model families {unknown}; known: {', '.join(FAMILIES)}")

    class Machine(PolicyCacheMachine):
        @initialize(
            policy=policies,
            family=st.sampled_from(families),
            batch=st.integers(1, max_batch),
            seed=st.integers(0, 2**16),
            padding=st.lists(st.integers(0, max_padding), min_size=max_batch, max_size=max_batch).map(tuple),
        )
        def setup(self, policy: Policy, family: str, batch: int, seed: int, padding: tuple[int, ...]) -> None:
            self.start(policy, family, batch, seed, padding)

    Machine.options = dict(options or {})
    Machine.__name__ = Machine.__qualname__ = name
    Machine.TestCase.settings = machine_settings()
    return Machine


def machine_settings(steps: int = 6) -> settings:
    """The loaded profile's settings with its count of machine examples (`machine_examples`: each
    step runs the model); under a derandomised (CI) profile a failure is reported unshrunk, since
    shrinking reruns the model."""
    current = settings()
    phases = tuple(p for p in current.phases if p != Phase.shrink) if current.derandomize else current.phases
    return settings(current, max_examples=machine_examples(), stateful_step_count=steps, phases=phases)


def run_cache_machine(
    policy: Policy,
    registry: Registry | None = None,
    options: Mapping[str, Any] | None = None,
    families: tuple[str, ...] = ("llama",),
    make: Callable[[Policy, dict[str, Any]], Policy] | None = None,
) -> None:
    """Run the machine on ``policy`` with drawn overrides of its budget, protection and schedule."""
    config = policy.config
    registry = registry or policy.registry
    drawn = kst.policy_overrides(policy, max_budget=24).map(
        lambda overrides: (make or (lambda p, o: build(config, registry=registry, **o)))(policy, overrides)
    )
    machine = cache_machine(drawn, families=families, options=options)
    run_state_machine_as_test(machine, settings=machine_settings())


__all__ = ["MAX_TOKENS", "PolicyCacheMachine", "cache_machine", "machine_settings", "run_cache_machine"]
