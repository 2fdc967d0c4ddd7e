"""A least-recently-used cache under a byte budget: the one piece behind the worker's LoRA and prompt
caches."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBudgetLRU(Generic[K, V]):
    """Entries by key, evicted oldest-used first to stay within `max_bytes`; an entry larger than the whole
    budget is handed out but not kept. `hits`, `misses` and `evictions` count since creation."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evictions = 0
        self._size_of = size_of
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0

    def __contains__(self, key: K) -> bool:
        """Held now (asking does not count as a use)."""
        return key in self._entries

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The entry for `key`, or `make()` it and keep it."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = make()
        size = self._size_of(value)
        if size <= self.max_bytes:
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._size_of(evicted)
                self.evictions += 1
            self._entries[key] = value
            self._bytes += size
        return value
