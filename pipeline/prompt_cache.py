"""An LRU of text-encoder outputs, so a repeated prompt skips the 24 B text encoder.

Keyed by everything that shapes the embedding: the prompt text, the token budget and the encoder layers
read (the model is fixed for the worker's life; LoRAs touch only the transformer). Kept on the device they
were computed on, under a byte budget: one FLUX.2 [dev] embedding is 512 x 15360 bf16, about 15 MB.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

PromptKey = tuple[str, int, tuple[int, ...]]


class PromptEmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[PromptKey, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: PromptKey, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        embeds = encode()
        size = embeds.numel() * embeds.element_size()
        if size <= self.max_bytes:
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            self._entries[key] = embeds
            self._bytes += size
        return embeds
