"""Shared prefills kept across calls: an evolution sees the same training items in every
generation, so each item's prompt runs once and is forked again later (`ForkedRows`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from kvpolicy.integrations.hf.shared_prefill import Prefill


class PrefillStore:
    """Prefills by key, at most ``max_bytes`` of them, least recently used out first (the newest
    always stays)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Prefill] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Prefill]) -> Prefill:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        shared = make()
        self._items[key] = shared
        while len(self._items) > 1 and sum(p.nbytes for p in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)
        return shared

    def clear(self) -> None:
        self._items.clear()
