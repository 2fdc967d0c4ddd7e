"""The device tier of recently used LoRAs (on CPU its device is the CPU): same bits as host memory, LRU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

from pipeline.generation import ImageGenerator
from pipeline.lora_cache import LoraMemoryCache, lora_bytes
from pipeline.lora_device_tier import LoraDeviceTier
from pipeline.lora_slots import LoraFitError, LoraSlots, ParsedLora
from pipeline.messages import ResolvedLora
from pipeline.models import TinySafetyChecker
from pipeline.safety import SafetyChecker
from pipeline.testing import linear_shapes, load_tiny, write_lora
from pipeline.tiny import ensure_tiny_pipeline


@pytest.fixture(scope="module")
def slots(cache_dir: Path) -> LoraSlots:
    """bf16 slots on a float32 transformer: the tier converts the float32 LoRAs' A once."""
    transformer = Flux2Transformer2DModel.from_pretrained(
        ensure_tiny_pipeline(cache_dir / "tiny") / "transformer"
    )
    return LoraSlots(transformer, num_slots=3, max_rank=32, dtype=torch.bfloat16)


def lora(slots: LoraSlots, seed: int, rank: int = 8, alpha: float = 3.0) -> ParsedLora:
    """A float32 LoRA on every other module, with per-module alphas (alpha / rank * scale scales B)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module, (in_features, out_features) in list(linear_shapes(slots._transformer).items())[::2]:
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
        state[f"transformer.{module}.alpha"] = torch.tensor(alpha)
    return ParsedLora(f"lora {seed}", state, finite=True)


def contents(slots: LoraSlots) -> list[torch.Tensor]:
    return [p.detach().clone() for slot in slots._params for pair in slot.values() for p in pair]


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(first, second, strict=True))


def test_a_tier_hit_writes_the_bits_host_memory_writes(slots: LoraSlots) -> None:
    tier = LoraDeviceTier(10**8, slots.device, slots.dtype)
    loras = {"one": (lora(slots, 1), 0.7), "two": (lora(slots, 2, rank=16), -1.3)}
    slots.apply(list(loras.values()))
    from_host = contents(slots)
    for _ in range(2):  # a miss enters the tier, then a hit comes from it
        slots.apply([])
        slots.apply([(tier.resident(key, parsed), scale) for key, (parsed, scale) in loras.items()])
        assert same(contents(slots), from_host)
    assert (tier.hits, tier.misses) == (2, 2)
    entry = tier.resident("one", loras["one"][0])
    for key, tensor in entry.state_dict.items():
        if key.endswith(".lora_A.weight"):
            assert tensor.dtype == torch.bfloat16  # rounded once, on entry, as the write would round it
        elif key.endswith(".lora_B.weight"):
            assert tensor.dtype == torch.float32  # scaled in float32 before its single rounding
            assert tensor.data_ptr() != loras["one"][0].state_dict[key].data_ptr()  # a copy of its own
        else:
            assert tensor is loras["one"][0].state_dict[key]  # alphas stay in host memory
    slots.apply([])


def test_a_lora_larger_than_the_budget_is_not_kept(slots: LoraSlots) -> None:
    parsed = lora(slots, 3)
    size = lora_bytes(LoraDeviceTier(10**8, slots.device, slots.dtype).resident("x", parsed))
    assert 0 < size < lora_bytes(parsed)  # bf16 A: the tier holds less than host memory does
    too_small = LoraDeviceTier(size - 1, slots.device, slots.dtype)
    assert too_small.resident("x", parsed) is parsed and too_small.resident("x", parsed) is parsed
    assert (too_small.hits, too_small.misses) == (0, 2)
    just_enough = LoraDeviceTier(size, slots.device, slots.dtype)
    kept = just_enough.resident("x", parsed)
    assert kept is not parsed and just_enough.resident("x", parsed) is kept


def test_no_budget_is_the_host_path(slots: LoraSlots) -> None:
    parsed = lora(slots, 4)
    assert LoraDeviceTier(0, slots.device, slots.dtype).resident("x", parsed) is parsed


def test_eviction_is_least_recently_used(slots: LoraSlots) -> None:
    loras = {key: lora(slots, seed) for seed, key in enumerate("abc")}
    size = lora_bytes(LoraDeviceTier(10**8, slots.device, slots.dtype).resident("a", loras["a"]))
    tier = LoraDeviceTier(2 * size, slots.device, slots.dtype)
    entries = {key: tier.resident(key, loras[key]) for key in "ab"}
    assert tier.resident("a", loras["a"]) is entries["a"]  # a is now the more recent
    tier.resident("c", loras["c"])  # b goes
    assert tier.resident("a", loras["a"]) is entries["a"]
    assert tier.resident("b", loras["b"]) is not entries["b"]  # entered again
    assert (tier.hits, tier.misses, tier.evictions) == (2, 4, 2)


def test_out_of_device_memory_falls_back_to_host_memory(
    slots: LoraSlots, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = lora(slots, 5)
    tier = LoraDeviceTier(10**8, slots.device, slots.dtype)

    def out_of_memory(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    assert tier.resident("x", parsed) is parsed
    monkeypatch.undo()
    assert tier.resident("x", parsed) is not parsed and tier.hits == 0  # nothing was kept by the failure


def test_a_weight_the_slots_refuse_is_refused_from_the_tier_too(slots: LoraSlots) -> None:
    parsed = lora(slots, 6)
    key = next(k for k in parsed.state_dict if k.endswith(".lora_A.weight"))
    integers = ParsedLora("ints", {**parsed.state_dict, key: parsed.state_dict[key].to(torch.int32)})
    resident = LoraDeviceTier(10**8, slots.device, slots.dtype).resident("ints", integers)
    with pytest.raises(LoraFitError, match="not floating point"):
        slots.apply([(resident, 1.0)])


def test_the_generator_switches_from_its_tier(cache_dir: Path, tmp_path: Path) -> None:
    """`ImageGenerator` puts its tier between the host-memory cache and the slots; none by default."""
    pipe = load_tiny(cache_dir)
    slots = LoraSlots(pipe.transformer, num_slots=3, max_rank=16, dtype=torch.bfloat16)
    safety = SafetyChecker(TinySafetyChecker(source="tiny"), cache_dir, torch.device("cpu"))
    host = ImageGenerator(pipe, slots, LoraMemoryCache(10**8), safety)
    tiered = ImageGenerator(pipe, slots, LoraMemoryCache(10**8), safety, lora_device_bytes=10**8)
    assert host.lora_tier.max_bytes == 0
    shapes = linear_shapes(pipe.transformer)
    paths = [write_lora(tmp_path / f"{i}.safetensors", shapes, list(shapes)[i::2], 8, i) for i in range(2)]
    loras = tuple(
        ResolvedLora(str(path), path.name, scale, path.name)
        for path, scale in zip(paths, (0.7, -1.3), strict=True)
    )
    host.apply_loras(loras)
    from_host = contents(slots)
    for _ in range(2):
        tiered.apply_loras(())
        tiered.apply_loras(loras)
        assert same(contents(slots), from_host)
    assert (tiered.lora_tier.hits, tiered.lora_tier.misses) == (2, 2)
    assert host.lora_tier.hits == 0
