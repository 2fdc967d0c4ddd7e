"""Recently used LoRAs' weights kept on the slots' device, so a switch among them is a device-to-device copy.

The host-memory cache (`LoraMemoryCache`) still holds every parsed LoRA; this smaller tier, under its own
byte budget, holds device copies of the ones used last. An entry is the same `ParsedLora` with its weights
moved, so `LoraSlots` applies it through the very same code, to the same bits:
- lora_A enters in the slots' dtype (unless that is wider): the write's `copy_` would round it to that dtype
  anyway, so rounding once on entry gives the same bits and later switches skip the conversion;
- lora_B keeps its own dtype: the write scales it in float32 and rounds once, and rounding it to the slots'
  dtype first would round twice;
- alphas stay in host memory: they are read as numbers, and reading a device tensor would wait for the
  device; a weight that is not floating point stays too, for `LoraSlots` to refuse as before.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.byte_lru import ByteBudgetLRU
from pipeline.lora_cache import lora_bytes
from pipeline.lora_slots import ParsedLora

_A, _B = ".lora_A.weight", ".lora_B.weight"


class LoraDeviceTier(ByteBudgetLRU[str, ParsedLora]):
    """Device copies of LoRAs by content hash under `max_bytes` (0: no tier, every switch copies from host
    memory). While a LoRA enters, the tier may briefly hold it on top of the budget."""

    def __init__(self, max_bytes: int, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__(max_bytes, lora_bytes)
        self.device = device
        self.dtype = dtype  # the slots' dtype; None: every weight keeps its own

    def resident(self, key: str, lora: ParsedLora) -> ParsedLora:
        """`lora` with its weights on the device: from the tier, or copied there now and kept. `lora` itself
        when its copy could not be kept (larger than the budget, or the device is out of memory)."""
        if not self.max_bytes:
            return lora
        # Sized only on a miss: summing a few hundred tensors costs about a millisecond.
        if key not in self._entries and self._resident_bytes(lora) > self.max_bytes:
            self.misses += 1  # as the LRU counts an entry it cannot keep, without making the copy
            return lora
        try:
            return self.get(key, lambda: self._to_device(lora))
        except torch.OutOfMemoryError:
            return lora  # a cache must not fail the request: this switch copies from host memory

    def _dtype(self, key: str, tensor: torch.Tensor) -> torch.dtype | None:
        """The dtype `key` is held in on the device; None: it stays in host memory."""
        if not tensor.is_floating_point() or not key.endswith((_A, _B)):
            return None
        if key.endswith(_A) and self.dtype is not None and self.dtype.itemsize <= tensor.dtype.itemsize:
            return self.dtype
        return tensor.dtype

    def _resident_bytes(self, lora: ParsedLora) -> int:
        """`lora_bytes` of the entry `lora` would make, known before making it."""
        return sum(
            tensor.numel() * (self._dtype(key, tensor) or tensor.dtype).itemsize
            for key, tensor in lora.state_dict.items()
        )

    def _to_device(self, lora: ParsedLora) -> ParsedLora:
        state_dict = {}
        for key, tensor in lora.state_dict.items():
            dtype = self._dtype(key, tensor)
            # From pinned memory the copy is queued without waiting; `copy=True`: on a CPU "device" the
            # entry must not share memory with the host cache's tensor it came from.
            state_dict[key] = (
                tensor
                if dtype is None
                else tensor.to(device=self.device, dtype=dtype, non_blocking=True, copy=True)
            )
        return replace(lora, state_dict=state_dict)
