"""Parsed, converted LoRAs in (CPU) memory, keyed by content hash, under a byte budget.

Reading and converting a LoRA file costs far more than copying it into a slot, and users switch between
the same few LoRAs.
"""

from __future__ import annotations

from pipeline.byte_lru import ByteBudgetLRU
from pipeline.lora_slots import ParsedLora


def lora_bytes(lora: ParsedLora) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in lora.state_dict.values())


class LoraMemoryCache(ByteBudgetLRU[str, ParsedLora]):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lora_bytes)
