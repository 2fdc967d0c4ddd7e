"""The worker's model load: registry choice, LoRA slots attached, the compile switch honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.messages import WorkerConfig
from pipeline.models import load_registry
from pipeline.worker import load_generator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_load_tiny(cache_dir: Path, compile_blocks: bool) -> None:
    config = WorkerConfig(
        load_registry(ROOT / "models.yaml"), "tiny", cache_dir, max_lora_rank=8, compile=compile_blocks
    )
    generator, ready = load_generator(config)
    assert (ready.model, ready.device, ready.dtype) == ("tiny", "cpu", "float32")
    assert generator.slots.max_rank == 8 and generator.slots.num_slots == 3
    assert (ready.compiled, generator.accelerator.compiled) == (compile_blocks, compile_blocks)
    transformer = generator.pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert blocks
    # torch.compile's wrapper keeps the function it compiles here
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") is compile_blocks for block in blocks)
