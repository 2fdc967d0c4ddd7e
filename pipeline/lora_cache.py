"""An in-memory LRU of parsed, converted LoRAs, keyed by content hash, under a byte budget.

Reading and converting a LoRA file costs far more than copying it into a slot; users switch between the
same few LoRAs, so the converted state dicts are kept in (CPU) memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pipeline.lora_slots import ParsedLora


def lora_bytes(lora: ParsedLora) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in lora.state_dict.values())


class LoraMemoryCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, ParsedLora] = OrderedDict()
        self._bytes = 0

    def get(self, sha256: str, load: Callable[[], ParsedLora]) -> ParsedLora:
        """The cached LoRA for this content, or `load()` it and keep it (if it fits the budget at all)."""
        if sha256 in self._entries:
            self.hits += 1
            self._entries.move_to_end(sha256)
            return self._entries[sha256]
        self.misses += 1
        lora = load()
        size = lora_bytes(lora)
        if size <= self.max_bytes:
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= lora_bytes(evicted)
                self.evictions += 1
            self._entries[sha256] = lora
            self._bytes += size
        return lora
