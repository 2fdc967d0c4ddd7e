"""The worker's model load: registry choice, LoRA slots attached, the compile switch honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.acceleration import keep_compiled_code_in
from pipeline.messages import WorkerConfig
from pipeline.models import load_registry
from pipeline.worker import load_generator

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_load_tiny(cache_dir: Path, compile_blocks: bool) -> None:
    config = WorkerConfig(
        load_registry(ROOT / "models.yaml"),
        "tiny",
        cache_dir,
        max_lora_rank=8,
        compile=compile_blocks,
        lora_device_bytes=None if compile_blocks else 12345,
    )
    generator, ready = load_generator(config)
    # a budget given is taken; left to the worker, a CPU has no device tier (host memory is the device)
    assert (
        generator.lora_tier.max_bytes
        == dict(ready.memory)["lora_device_cache"]
        == (0 if compile_blocks else 12345)
    )
    assert (ready.model, ready.device, ready.dtype) == ("tiny", "cpu", "float32")
    assert generator.slots.max_rank == 8 and generator.slots.num_slots == 3
    assert (ready.compiled, generator.accelerator.compiled) == (compile_blocks, compile_blocks)
    transformer = generator.pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert blocks
    # torch.compile's wrapper keeps the function it compiles here
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") is compile_blocks for block in blocks)


START = """
import json, sys
from pathlib import Path
from torch._dynamo.utils import counters
from pipeline.acceleration import keep_compiled_code_in
from pipeline.messages import WorkerConfig
from pipeline.models import PACKAGED_REGISTRY, load_registry
from pipeline.worker import load_generator
config = WorkerConfig(
    load_registry(PACKAGED_REGISTRY), "tiny", Path(sys.argv[1]), max_lora_rank=8, compile=True,
    warmup_sizes=((64, 48),),
)
_, ready = load_generator(config)
print(json.dumps([ready.compiled_graphs_reused, counters["inductor"]["fxgraph_cache_miss"]]))
"""


def test_compiled_code_goes_to_the_cache_folder_unless_the_operator_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    ours = tmp_path / "torch-compile"
    for before in (None, default_cache_dir()):  # unset, or torch's own default written at import
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        assert keep_compiled_code_in(tmp_path) == ours
        assert cache_dir() == str(ours)  # where inductor then writes
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator's"))
    assert keep_compiled_code_in(tmp_path) == tmp_path / "operator's"


@pytest.mark.slow  # two cold-and-warm compiles in fresh processes: over a minute on two cores
def test_a_restart_loads_its_compiled_code_from_the_cache_folder(cache_dir: Path, tmp_path: Path) -> None:
    """Fast restarts: a worker started again with the same cache folder builds none of the graphs the
    first start built (on a GPU, minutes of compiling): it loads them from that folder, not from /tmp
    (gone with a container). Each start is a process of its own, as a worker is."""
    (tmp_path / "tiny").symlink_to(cache_dir / "tiny")  # the model is shared; the compile cache is new
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    starts = []
    for _ in range(2):
        start = subprocess.run(
            [sys.executable, "-c", START, str(tmp_path)], env=env, capture_output=True, text=True, check=False
        )
        assert start.returncode == 0, start.stderr
        starts.append(json.loads(start.stdout.strip().splitlines()[-1]))
    (cold_reused, built), (warm_reused, warm_built) = starts
    assert (cold_reused, warm_built) == (0, 0) and built >= 2
    assert warm_reused == built  # every graph the first start built, the second loaded
    assert any((tmp_path / "torch-compile" / "fxgraph").iterdir())
