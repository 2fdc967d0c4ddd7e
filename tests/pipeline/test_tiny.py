"""The tiny pipeline builder: what every offline test of the server stands on.

These tests load the built folder through `Flux2Pipeline.from_pretrained` (the real model's path) and run real
generations, so a builder change that breaks loading, the tokenizer, determinism or the atomic cache shows up
here rather than as a confusing failure in the server tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from PIL import Image
from safetensors.torch import load_file

import pipeline.tiny as tiny
from pipeline.tiny import build_tiny_pipeline, ensure_tiny_pipeline

UNICODE_PROMPT = "a cat 🐱 sitting, 猫が座っている, naïve café ✨"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_pipeline(tmp_path_factory.mktemp("tiny-cache"), seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_folder: Path) -> Flux2Pipeline:
    """Loaded offline, with any network connection attempt turned into an error."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access while loading the tiny pipeline: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once at import; patch the parsed value too.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(socket.socket, "connect", refuse)
        loaded = Flux2Pipeline.from_pretrained(tiny_folder)
    assert isinstance(loaded, Flux2Pipeline)
    loaded.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return loaded


def generate(pipe: Flux2Pipeline, prompt: str, seed: int = 0, output_type: str = "np") -> Any:
    result = pipe(
        prompt=prompt,
        height=512,
        width=512,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    return result.images


def pixels(pipe: Flux2Pipeline, prompt: str, seed: int = 0) -> np.ndarray[Any, np.dtype[np.uint8]]:
    image = generate(pipe, prompt, seed=seed, output_type="pil")[0]
    return np.asarray(image)


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no weights saved for {component}"
    merged: dict[str, torch.Tensor] = {}
    for file in files:
        merged.update(load_file(file))
    return merged


def test_folder_has_the_real_models_layout(tiny_folder: Path) -> None:
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "PixtralProcessor"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


def test_loaded_components_match_flux2_shapes(pipe: Flux2Pipeline) -> None:
    # 8x VAE like the real one, and enough text layers for the default text_encoder_out_layers=(10, 20, 30).
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.text_config.num_hidden_layers == 30
    hidden = pipe.text_encoder.config.text_config.hidden_size
    assert pipe.transformer.config.joint_attention_dim == 3 * hidden
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)


def test_512_four_steps_gives_a_finite_512_image(pipe: Flux2Pipeline) -> None:
    array = generate(pipe, "a lighthouse at dusk")
    assert array.shape == (1, 512, 512, 3)
    assert np.isfinite(array).all()
    assert array.std() > 0.01, "a flat image means the pipeline produced nothing"
    image = generate(pipe, "a lighthouse at dusk", output_type="pil")[0]
    assert isinstance(image, Image.Image)
    assert image.size == (512, 512) and image.mode == "RGB"


def test_same_seed_gives_identical_pixels(pipe: Flux2Pipeline) -> None:
    first = pixels(pipe, "a red bicycle", seed=7)
    assert np.array_equal(first, pixels(pipe, "a red bicycle", seed=7))
    assert not np.array_equal(first, pixels(pipe, "a red bicycle", seed=8))


def test_different_prompts_give_different_images(pipe: Flux2Pipeline) -> None:
    cat = pixels(pipe, "a cat").astype(np.int16)
    dog = pixels(pipe, "a dog").astype(np.int16)
    # Well above rounding noise, so the difference also survives bf16 on a GPU.
    assert np.abs(cat - dog).mean() > 0.5


def test_unicode_prompt_gets_its_own_tokens_and_image(pipe: Flux2Pipeline) -> None:
    tokenizer = pipe.tokenizer.tokenizer
    ids = tokenizer.encode(UNICODE_PROMPT, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == UNICODE_PROMPT
    assert tokenizer.encode("a cat 🐶", add_special_tokens=False) != tokenizer.encode(
        "a cat 🐱", add_special_tokens=False
    )
    image = pixels(pipe, UNICODE_PROMPT)
    assert image.shape == (512, 512, 3)
    assert not np.array_equal(image, pixels(pipe, "a cat"))


def test_chat_template_renders_system_user_and_image_parts(pipe: Flux2Pipeline) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]},
    ]
    rendered = pipe.tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST][IMG]what is this?[/INST]"


def test_prompt_upsampling_with_an_image_runs_the_vision_tower(pipe: Flux2Pipeline) -> None:
    # caption_upsample_temperature makes the Mistral model describe input images with `generate`: the one
    # path that uses the processor's image side and the Pixtral tower.
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    seen: list[torch.Size] = []
    hook = pipe.text_encoder.model.vision_tower.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape)
    )
    try:
        torch.manual_seed(0)
        (upsampled,) = pipe.upsample_prompt("make it blue", images=[image], temperature=0.15)
    finally:
        hook.remove()
    assert isinstance(upsampled, str)
    assert seen and seen[0][-3] == 3, "the image never reached the vision tower"


def test_ensure_builds_once_and_then_reuses_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []

    def counting_build(folder: Path, seed: int = 0) -> None:
        builds.append(folder)
        build_tiny_pipeline(folder, seed=seed)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", counting_build)
    first = ensure_tiny_pipeline(tmp_path, seed=3)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    second = ensure_tiny_pipeline(tmp_path, seed=3)
    assert second == first and len(builds) == 1
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert f"v{tiny.TINY_FORMAT_VERSION}" in first.name and "seed3" in first.name
    # Only the finished folder and its lock file remain: no half-built staging folders.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [first.name]


def test_concurrent_ensures_build_once_and_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    started = threading.Barrier(2)

    def counting_build(folder: Path, seed: int = 0) -> None:
        builds.append(folder)
        build_tiny_pipeline(folder, seed=seed)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", counting_build)
    results: list[Path] = []

    def worker() -> None:
        started.wait()
        results.append(ensure_tiny_pipeline(tmp_path, seed=0))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert len(builds) == 1
    assert (results[0] / "model_index.json").is_file()


def test_a_crashed_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crashing_build(folder: Path, seed: int = 0) -> None:
        (folder / "model_index.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", crashing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_pipeline(tmp_path, seed=0)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    folder = ensure_tiny_pipeline(tmp_path, seed=0)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"


def test_losing_a_rename_race_returns_the_winners_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A builder that got past the lock (flock is not honoured on every network filesystem) finishes first.
    winner = tmp_path / tiny._folder_name(0)

    def racing_build(folder: Path, seed: int = 0) -> None:
        build_tiny_pipeline(folder, seed=seed)
        shutil.copytree(folder, winner)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", racing_build)
    assert ensure_tiny_pipeline(tmp_path, seed=0) == winner
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [winner.name]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rebuilt")
    folders = {"a": root / "seed0-a", "b": root / "seed0-b", "other": root / "seed1"}
    build_tiny_pipeline(folders["a"], seed=0)
    build_tiny_pipeline(folders["b"], seed=0)
    build_tiny_pipeline(folders["other"], seed=1)
    return folders


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "vae"])
def test_same_seed_gives_identical_weights(rebuilt: dict[str, Path], component: str) -> None:
    first, second = weights(rebuilt["a"], component), weights(rebuilt["b"], component)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_different_seed_gives_different_weights(rebuilt: dict[str, Path]) -> None:
    first, other = weights(rebuilt["a"], "transformer"), weights(rebuilt["other"], "transformer")
    assert first.keys() == other.keys()
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_building_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_pipeline(tmp_path / "tiny", seed=5)
    assert torch.equal(torch.rand(4), expected)
