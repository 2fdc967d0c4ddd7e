"""Text-encoder outputs, so a repeated prompt skips the 24 B text encoder.

Keyed by everything that shapes the embedding: the prompt text, the token budget and the encoder layers
read (the model is fixed for the worker's life; LoRAs touch only the transformer). Kept on the device they
were computed on, under a byte budget: one FLUX.2 [dev] embedding is 512 x 15360 bf16, about 15 MB.
"""

from __future__ import annotations

import torch

from pipeline.byte_lru import ByteBudgetLRU

PromptKey = tuple[str, int, tuple[int, ...]]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class PromptEmbeddingCache(ByteBudgetLRU[PromptKey, torch.Tensor]):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, tensor_bytes)
