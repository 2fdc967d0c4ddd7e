"""FLUX.2 [dev]'s real component configs (tests/fixtures/flux2-dev, no weights): its exact memory account
per profile, the models.yaml minimums derived from it, and the tiny model held to the same structure.

Everything is built on the meta device (or on fake tensors for activations): nothing is allocated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import load_file
from transformers import ViTConfig, ViTForImageClassification

from pipeline.loading import build_components, load_pipeline
from pipeline.memory import GiB, MemoryAccount, Workload, account, held_account, nf4_bytes
from pipeline.messages import WorkerConfig
from pipeline.models import PACKAGED_REGISTRY, HubModel, TinySafetyChecker, load_registry
from pipeline.tiny import ensure_tiny_pipeline
from pipeline.worker import load_generator

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "flux2-dev"
MODEL_FILES = ("transformer", "vae", "text_encoder")


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def real_on_meta() -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return build_components(REAL, torch.bfloat16)


@pytest.fixture(scope="module")
def real_accounts() -> dict[str, MemoryAccount]:
    """Every flux2-dev profile's account at the server's defaults, for the largest text-to-image request."""
    spec = load_registry(PACKAGED_REGISTRY).get("flux2-dev")
    with torch.device("meta"):
        checker = ViTForImageClassification(ViTConfig(num_labels=2))  # Falconsai's: ViT-base/16, float32
    workload = Workload(images=4, side=1024)
    activations = None
    accounts = {}
    for name, profile in spec.memory_profiles.items():
        accounts[name] = account(
            REAL, profile, workload=workload, safety_checker=checker, activations=activations
        )
        activations = dict(accounts[name].activations)  # the same for every profile: computed once
    return accounts


def test_the_real_configs_build_the_published_model(real_on_meta: dict[str, torch.nn.Module]) -> None:
    assert sorted(real_on_meta) == sorted(MODEL_FILES)
    assert isinstance(real_on_meta["transformer"], Flux2Transformer2DModel)
    assert isinstance(real_on_meta["vae"], AutoencoderKLFlux2)
    assert isinstance(real_on_meta["text_encoder"], transformers.Mistral3ForConditionalGeneration)
    counts = {name: parameters(module) for name, module in real_on_meta.items()}
    # BFL's "32B" transformer and Mistral Small 3.x's 24B, to the parameter; the VAE's count as published.
    assert counts == {"transformer": 32_223_281_152, "text_encoder": 24_011_361_280, "vae": 84_046_115}
    vision = real_on_meta["text_encoder"].model.vision_tower  # type: ignore[union-attr]
    assert parameters(vision) == 403_305_472
    assert all(p.device.type == "meta" for p in real_on_meta["transformer"].parameters())


def _config_keys(folder: Path, component: str) -> set[str]:
    """The keys of a component's config as the installed library reads it (versions rename some)."""
    if component == "text_encoder":
        config = transformers.AutoConfig.from_pretrained(folder / component)
        return set(config.to_dict()) | {f"text_config.{k}" for k in config.text_config.to_dict()}
    cls = {"transformer": Flux2Transformer2DModel, "vae": AutoencoderKLFlux2}[component]
    model, unused = cls.from_config(cls.load_config(folder / component), return_unused_kwargs=True)
    return set(model.config) - set(unused) - {"_use_default_values"}


def test_the_tiny_model_has_the_real_ones_structure(cache_dir: Path) -> None:
    """ "It works on tiny" must mean the same code path: the same component classes, config keys and
    processor type as FLUX.2 [dev], only smaller."""
    tiny = ensure_tiny_pipeline(cache_dir / "tiny")
    index = {
        k: v for k, v in json.loads((REAL / "model_index.json").read_text()).items() if not k.startswith("_")
    }
    tiny_index = json.loads((tiny / "model_index.json").read_text())
    assert {k: tiny_index[k] for k in index} == index
    for component in MODEL_FILES:
        with torch.device("meta"):
            assert _config_keys(tiny, component) == _config_keys(REAL, component), component
    processor = json.loads((tiny / "tokenizer" / "processor_config.json").read_text())
    real_processor = json.loads((REAL / "tokenizer" / "processor_config.json").read_text())
    real_images = json.loads((REAL / "tokenizer" / "preprocessor_config.json").read_text())
    assert processor["processor_class"] == real_processor["processor_class"] == "PixtralProcessor"
    assert processor["image_processor"]["image_processor_type"] == real_images["image_processor_type"]
    assert processor["spatial_merge_size"] == real_processor["spatial_merge_size"]


def test_models_yaml_minimums_are_the_computed_accounts(real_accounts: dict[str, MemoryAccount]) -> None:
    profiles = load_registry(PACKAGED_REGISTRY).get("flux2-dev").memory_profiles
    derived = {name: acct.min_device_memory_gib for name, acct in real_accounts.items()}
    assert derived == {name: profile.min_device_memory_gib for name, profile in profiles.items()}


def test_the_accounts_hold_what_each_profile_promises(real_accounts: dict[str, MemoryAccount]) -> None:
    full, fp8, low = real_accounts["full"], real_accounts["fp8"], real_accounts["low-memory"]
    # bf16: two bytes per parameter; FP8 about one (plus a float32 scale per row); NF4 about half a byte.
    assert full.weights["transformer"] == 2 * 32_223_281_152
    assert 1.0 < fp8.weights["transformer"] / 32_223_281_152 < 1.01
    assert 0.5 < low.weights["transformer"] / 32_223_281_152 < 0.57
    # the text encoder's image side (439 M parameters) stays bf16 under FP8, its output projection
    # (lm_head, 671 M) under NF4
    assert fp8.weights["text_encoder"] > 24_011_361_280 + 403_305_472
    assert low.weights["text_encoder"] > 2 * 671_088_640 + (24_011_361_280 - 671_088_640) / 2
    # three rank-128 slots on every Linear in bf16; a prompt-cache entry is 512 x 15360 bf16
    assert full.lora_slots == fp8.lora_slots == low.lora_slots > 4 * GiB
    assert full.device_bytes > fp8.device_bytes > low.device_bytes
    # offloaded: only the largest component's turn is on the device at a time
    assert low.device_bytes < sum(low.weights.values()) + low.lora_slots


def test_nf4_is_counted_as_bitsandbytes_stores_it() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(300, 130, dtype=torch.bfloat16)  # an odd size: partial blocks and bytes
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    stored = sum(t.numel() * t.element_size() for t in (packed, state.absmax, state.code))
    assert nf4_bytes(weight.numel()) == stored


def test_the_loaded_tiny_model_holds_what_its_configs_account(cache_dir: Path) -> None:
    """The account from configs on the meta device equals what the worker's loaded model really holds,
    slots included: the method that gives the real model's figures is exact where it can be checked."""
    registry = load_registry(PACKAGED_REGISTRY)
    generator, ready = load_generator(WorkerConfig(registry, "tiny", cache_dir, max_lora_rank=8))
    profile = registry.get("tiny").memory_profiles["full"]
    expected = account(
        ensure_tiny_pipeline(cache_dir / "tiny"),
        profile,
        dtype=torch.float32,
        lora_rank=8,
        safety_checker=generator.safety.model,
    )
    reported = dict(ready.memory)
    assert {k: reported[k] for k in expected.weights} == expected.weights
    assert (reported["lora_slots"], reported["prompt_cache"]) == (expected.lora_slots, 1024**3)
    components = {"transformer": generator.pipe.transformer, "vae": generator.pipe.vae}
    assert held_account(components, profile, 0).lora_slots == expected.lora_slots > 0


def test_the_text_encoder_keeps_its_own_output_projection(cache_dir: Path, tmp_path: Path) -> None:
    """FLUX.2 [dev]'s text encoder config has no top-level `tie_word_embeddings` (transformers 4.57 read it
    from `text_config`), which current transformers defaults to true. Loading must keep the checkpoint's
    own `lm_head` (prompt expansion generates with it), and the account's model built from the config
    alone must be untied like the loaded one (or it misses 1.25 GiB)."""
    folder = tmp_path / "flux2-like"
    shutil.copytree(ensure_tiny_pipeline(cache_dir / "tiny"), folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    del config["tie_word_embeddings"]  # as in the real file
    config["text_config"]["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config))
    spec = HubModel(
        source="hub",
        repo_id="local/flux2-like",
        local_dir=folder,
        dtype="float32",
        device="cpu",
        safety_checker=TinySafetyChecker(source="tiny"),
        name="flux2-like",
    )
    text_encoder = load_pipeline(spec, tmp_path).pipe.text_encoder
    saved = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    assert text_encoder.lm_head.weight.data_ptr() != text_encoder.get_input_embeddings().weight.data_ptr()
    (own,) = [tensor for key, tensor in saved.items() if key.endswith("lm_head.weight")]
    assert torch.equal(text_encoder.lm_head.weight, own)
    with torch.device("meta"):
        built = build_components(folder, torch.float32)["text_encoder"]
    assert built.lm_head.weight is not built.get_input_embeddings().weight
