"""read_lora_file on every LoRA layout: each file, written in its own key naming, must give the same LoRA.

One random LoRA is made in BFL/ai-toolkit terms (fused qkv and linear1 included) for the tiny transformer.
Its diffusers form is derived here by hand (split qkv rows, swapped final modulation halves) and checked
against diffusers' own FLUX.2 *checkpoint* converter applied to the LoRA's weight deltas: that converter turns
real BFL weights into the diffusers model, so it is the independent oracle for what each BFL module means.
Every layout is then written, read with `read_lora_file`, applied with `LoraSlots`, and must render the image
of the plain diffusers file, and have the same per-module weight deltas as the oracle.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from peft import LoraConfig
from safetensors.torch import save_file

from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraFitError, LoraSlots, ParsedLora
from pipeline.lycoris import LycorisPolicy
from pipeline.testing import load_tiny, render

ATOL = 1e-4  # [0, 1] images in float32: see REFERENCE_ATOL in test_lora_slots.py
RANK = 4
SIZE = 256  # renders at 256² keep this file fast
ALPHA = 2.0  # alpha = rank / 2: files that carry alpha store B, files that do not store B * 0.5
FACTOR = ALPHA / RANK

# BFL module -> the tiny transformer's diffusers modules it maps onto (by output rows, in this order).
BFL_MODULES: dict[str, tuple[str, ...]] = {
    "double_blocks.0.img_attn.qkv": tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"),
    "double_blocks.0.txt_attn.qkv": tuple(f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"),
    "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.to_out.0",),
    "double_blocks.0.txt_mlp.0": ("transformer_blocks.0.ff_context.linear_in",),
    "double_blocks.0.img_mlp.2": ("transformer_blocks.0.ff.linear_out",),
    "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.to_qkv_mlp_proj",),
    "single_blocks.0.linear2": ("single_transformer_blocks.0.attn.to_out",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL outputs (shift, scale); diffusers' norm_out (scale, shift)

Bfl = dict[str, tuple[torch.Tensor, torch.Tensor]]  # BFL module -> (lora_A, lora_B)
Tensors = dict[str, torch.Tensor]


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name.removesuffix(".base_layer"): (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name
    }


def make_bfl(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Bfl:
    generator = torch.Generator().manual_seed(seed)
    lora: Bfl = {}
    for module, targets in BFL_MODULES.items():
        in_features = shapes[targets[0]][0]
        out_features = sum(shapes[t][1] for t in targets)
        lora_A = torch.randn(rank, in_features, generator=generator) * 0.3
        lora_B = torch.randn(out_features, rank, generator=generator) * 0.3
        lora[module] = (lora_A, lora_B)
    return lora


def diffusers_modules(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """The hand-derived diffusers form: lora_A shared, lora_B split by rows; the final modulation swapped."""
    modules: dict[str, tuple[torch.Tensor, ...]] = {}
    for module, (lora_A, lora_B) in bfl.items():
        if module == SWAPPED:
            shift, scale = lora_B.chunk(2)
            lora_B = torch.cat([scale, shift])
        targets = BFL_MODULES[module]
        for target, part in zip(targets, lora_B.split([shapes[t][1] for t in targets]), strict=True):
            modules[target] = (lora_A, part)
    return modules


# ---- the layouts, each written from the same BFL LoRA -------------------------------------------------


def plain_diffusers(bfl: Bfl, shapes: dict[str, tuple[int, int]], factor: float = FACTOR) -> Tensors:
    tensors: Tensors = {}
    for module, (lora_A, lora_B) in diffusers_modules(bfl, shapes).items():
        tensors[f"transformer.{module}.lora_A.weight"] = lora_A
        tensors[f"transformer.{module}.lora_B.weight"] = lora_B * factor
    return tensors


def ai_toolkit(bfl: Bfl, alpha: bool, down_up: bool = False) -> Tensors:
    names = (".lora_down.weight", ".lora_up.weight") if down_up else (".lora_A.weight", ".lora_B.weight")
    tensors: Tensors = {}
    for module, (lora_A, lora_B) in bfl.items():
        tensors[f"diffusion_model.{module}{names[0]}"] = lora_A
        tensors[f"diffusion_model.{module}{names[1]}"] = lora_B if alpha else lora_B * FACTOR
        if alpha:
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(ALPHA)
    return tensors


def kohya(
    bfl: Bfl, alpha: float = ALPHA, dtype: torch.dtype = torch.float32, b_scale: float = 1.0
) -> Tensors:
    tensors: Tensors = {}
    for module, (lora_A, lora_B) in bfl.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = lora_A
        tensors[f"{name}.lora_up.weight"] = lora_B * b_scale
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def fal_trainer(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Tensors:
    """`diffusion_model.` + diffusers names, but the time/guidance embedders under BFL names (guidance_in)."""
    tensors = {
        "diffusion_model." + k.removeprefix("transformer."): v
        for k, v in plain_diffusers(bfl, shapes).items()
        if ".time_guidance_embed." not in k
    }
    for module in ("time_in.in_layer", "guidance_in.in_layer", "guidance_in.out_layer"):
        lora_A, lora_B = bfl[module]
        tensors[f"diffusion_model.{module}.lora_A.weight"] = lora_A
        tensors[f"diffusion_model.{module}.lora_B.weight"] = lora_B * FACTOR
    return tensors


def peft_prefixed(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Tensors:
    """peft's own `save_pretrained` naming of a bare transformer: `base_model.model.` + diffusers names."""
    return {
        "base_model.model." + k.removeprefix("transformer."): v
        for k, v in plain_diffusers(bfl, shapes).items()
    }


def bare_diffusers(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Tensors:
    return {k.removeprefix("transformer."): v for k, v in plain_diffusers(bfl, shapes).items()}


def diffsynth(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Tensors:
    """DiffSynth-Studio: bare diffusers names, peft's adapter name left in (`.lora_A.default.weight`)."""
    return {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in bare_diffusers(bfl, shapes).items()
    }


def bare_bfl(bfl: Bfl) -> Tensors:
    """BFL names with no prefix at all, as several conversion scripts write them."""
    return {k.removeprefix("diffusion_model."): v for k, v in ai_toolkit(bfl, alpha=True).items()}


def turbo_mixed(bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Tensors:
    """As files converted from the FLUX.2 [dev] Turbo LoRA: the blocks under `transformer.` with diffusers
    names, the guidance embedder under `diffusion_model.` with BFL names (and alpha keys)."""
    tensors = {k: v for k, v in plain_diffusers(bfl, shapes).items() if ".guidance_embedder." not in k}
    for module in ("guidance_in.in_layer", "guidance_in.out_layer"):
        lora_A, lora_B = bfl[module]
        tensors[f"diffusion_model.{module}.lora_A.weight"] = lora_A
        tensors[f"diffusion_model.{module}.lora_B.weight"] = lora_B
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(ALPHA)
    return tensors


def save(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)  # qkv shares lora_A
    return path


def save_with_header_alpha(directory: Path, bfl: Bfl, shapes: dict[str, tuple[int, int]]) -> Path:
    """The diffusers way: raw B in the file, alpha only in the `lora_adapter_metadata` header."""
    tensors = plain_diffusers(bfl, shapes, factor=1.0)
    modules = sorted({k.removeprefix("transformer.").rsplit(".", 2)[0] for k in tensors})
    config = LoraConfig(r=RANK, lora_alpha=int(ALPHA), target_modules=modules)
    Flux2Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers={k.removeprefix("transformer."): v.clone() for k, v in tensors.items()},
        weight_name="header_alpha.safetensors",
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return directory / "header_alpha.safetensors"


# ---- weight-level oracle ------------------------------------------------------------------------------


def deltas(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """{diffusers module: B @ A * alpha / r} in float64, as LoraSlots applies a parsed LoRA."""
    out: dict[str, torch.Tensor] = {}
    for key, lora_A in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        lora_B = state_dict[f"{module}.lora_B.weight"]
        alpha = state_dict.get(f"{module}.alpha")
        rank = lora_A.shape[0]
        factor = (float(alpha) if alpha is not None else rank) / rank
        out[module.removeprefix("transformer.")] = lora_B.double() @ lora_A.double() * factor
    return out


def oracle_deltas(bfl: Bfl, factor: float = FACTOR) -> dict[str, torch.Tensor]:
    """The BFL LoRA's weight deltas as diffusers' FLUX.2 checkpoint converter maps them onto diffusers."""
    checkpoint = {f"{m}.weight": b.double() @ a.double() * factor for m, (a, b) in bfl.items()}
    converted = convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    return {k.removesuffix(".weight"): v for k, v in converted.items()}


def assert_same_deltas(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)  # nothing dropped, nothing extra
    for module, delta in expected.items():
        torch.testing.assert_close(actual[module], delta, rtol=1e-5, atol=1e-7, msg=module)


# ---- fixtures -----------------------------------------------------------------------------------------


@dataclass
class Rig:
    pipe: Flux2Pipeline
    slots: LoraSlots
    shapes: dict[str, tuple[int, int]]
    bfl: Bfl
    base: np.ndarray
    reference: np.ndarray  # the plain diffusers file (B * alpha / r, no header) applied
    directory: Path


@pytest.fixture(scope="module")
def rig(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Rig:
    pipe = load_tiny(cache_dir)
    shapes = linear_shapes(pipe.transformer)
    bfl = make_bfl(shapes, RANK, seed=7)
    base = render(pipe, size=SIZE)
    slots = LoraSlots(pipe.transformer, num_slots=1, max_rank=8)
    directory = tmp_path_factory.mktemp("lora_formats")
    reference_file = save(directory / "reference.safetensors", plain_diffusers(bfl, shapes))
    slots.apply([(read_lora_file(reference_file), 1.0)])
    reference = render(pipe, size=SIZE)
    slots.apply([])
    assert np.abs(reference - base).max() > 100 * ATOL  # the LoRA does change the image
    return Rig(pipe, slots, shapes, bfl, base, reference, directory)


@pytest.fixture
def slots(rig: Rig) -> Iterator[LoraSlots]:
    yield rig.slots
    rig.slots.apply([])


def test_the_hand_derived_diffusers_form_matches_diffusers_checkpoint_converter(rig: Rig) -> None:
    assert_same_deltas(deltas(plain_diffusers(rig.bfl, rig.shapes)), oracle_deltas(rig.bfl))
    assert {t for targets in BFL_MODULES.values() for t in targets} <= set(rig.shapes)


LAYOUTS: dict[str, Callable[[Rig, Path], Path]] = {
    "diffusers, alpha in the header": lambda r, d: save_with_header_alpha(d, r.bfl, r.shapes),
    "diffusers, bare module names": lambda r, d: save(d / "f.safetensors", bare_diffusers(r.bfl, r.shapes)),
    "ai-toolkit/BFL, no alpha": lambda r, d: save(d / "f.safetensors", ai_toolkit(r.bfl, alpha=False)),
    "ai-toolkit/BFL with .alpha keys": lambda r, d: save(d / "f.safetensors", ai_toolkit(r.bfl, alpha=True)),
    "ai-toolkit/BFL lora_down/up with .alpha": lambda r, d: save(
        d / "f.safetensors", ai_toolkit(r.bfl, alpha=True, down_up=True)
    ),
    "Kohya/Musubi with .alpha": lambda r, d: save(d / "f.safetensors", kohya(r.bfl)),
    "fal trainer with guidance_in": lambda r, d: save(d / "f.safetensors", fal_trainer(r.bfl, r.shapes)),
    "peft base_model.model.": lambda r, d: save(d / "f.safetensors", peft_prefixed(r.bfl, r.shapes)),
    "DiffSynth-Studio": lambda r, d: save(d / "f.safetensors", diffsynth(r.bfl, r.shapes)),
    "bare BFL names": lambda r, d: save(d / "f.safetensors", bare_bfl(r.bfl)),
    "mixed prefixes (Turbo conversion)": lambda r, d: save(d / "f.safetensors", turbo_mixed(r.bfl, r.shapes)),
}

# The layouts added for files people brought that were refused, each also in half-precision files.
NEW_LAYOUTS: dict[str, Callable[[Bfl, dict[str, tuple[int, int]]], Tensors]] = {
    "DiffSynth-Studio": diffsynth,
    "bare BFL names": lambda bfl, shapes: bare_bfl(bfl),
    "mixed prefixes (Turbo conversion)": turbo_mixed,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_the_same_lora(rig: Rig, slots: LoraSlots, tmp_path: Path, layout: str) -> None:
    parsed = read_lora_file(LAYOUTS[layout](rig, tmp_path), name=layout)
    assert parsed.name == layout and parsed.notes == ()  # nothing dropped
    assert all(k.startswith("transformer.") for k in parsed.state_dict)
    assert_same_deltas(deltas(dict(parsed.state_dict)), oracle_deltas(rig.bfl))
    slots.apply([(parsed, 1.0)])
    image = render(rig.pipe, size=SIZE)
    print(f"\n{layout}, float32: max pixel difference {np.abs(image - rig.reference).max():.2e}")
    np.testing.assert_allclose(image, rig.reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", list(NEW_LAYOUTS))
def test_new_layouts_in_half_precision_equal_the_diffusers_file(
    rig: Rig, slots: LoraSlots, tmp_path: Path, layout: str, dtype: torch.dtype
) -> None:
    def cast(tensors: Tensors) -> Tensors:
        return {k: v.to(dtype) for k, v in tensors.items()}

    ours = read_lora_file(
        save(tmp_path / "layout.safetensors", cast(NEW_LAYOUTS[layout](rig.bfl, rig.shapes)))
    )
    theirs = read_lora_file(
        save(tmp_path / "diffusers.safetensors", cast(plain_diffusers(rig.bfl, rig.shapes)))
    )
    assert_same_deltas(deltas(dict(ours.state_dict)), deltas(dict(theirs.state_dict)))
    slots.apply([(theirs, 1.0)])
    expected = render(rig.pipe, size=SIZE)
    slots.apply([(ours, 1.0)])
    image = render(rig.pipe, size=SIZE)
    print(f"\n{layout}, {dtype}: max pixel difference {np.abs(image - expected).max():.2e}")
    # Alpha kept apart (BFL keys) or folded into a half-precision B rounds differently: not bit for bit.
    np.testing.assert_allclose(image, expected, rtol=0, atol=ATOL)


def test_header_alpha_is_honoured(rig: Rig, slots: LoraSlots, tmp_path: Path) -> None:
    """alpha = rank / 2 in the header gives the plain file with B halved, not alpha / r = 1."""
    path = save_with_header_alpha(tmp_path, rig.bfl, rig.shapes)
    parsed = read_lora_file(path)
    assert float(parsed.state_dict["transformer.proj_out.alpha"]) == ALPHA
    slots.apply([(parsed, 1.0)])
    np.testing.assert_allclose(render(rig.pipe, size=SIZE), rig.reference, rtol=0, atol=ATOL)
    without_alpha = {k: v for k, v in parsed.state_dict.items() if not k.endswith(".alpha")}
    slots.apply([(ParsedLora("header ignored", without_alpha), 1.0)])
    assert np.abs(render(rig.pipe, size=SIZE) - rig.reference).max() > 100 * ATOL


def test_bfl_alpha_keys_map_onto_every_split_module(rig: Rig, tmp_path: Path) -> None:
    parsed = read_lora_file(save(tmp_path / "a.safetensors", ai_toolkit(rig.bfl, alpha=True)))
    alphas = {k for k in parsed.state_dict if k.endswith(".alpha")}
    weights = {k.removesuffix(".lora_A.weight") + ".alpha" for k in parsed.state_dict if "lora_A" in k}
    assert alphas == weights
    for x in "qkv":
        assert float(parsed.state_dict[f"transformer.transformer_blocks.0.attn.to_{x}.alpha"]) == ALPHA


def test_kohya_bf16_alpha_is_exact(rig: Rig, tmp_path: Path) -> None:
    """Kohya files often store alpha in bf16; diffusers divides alpha / rank in that dtype for fused qkv."""
    bfl = make_bfl(rig.shapes, rank=3, seed=11)
    tensors = kohya(bfl, alpha=1.0, dtype=torch.bfloat16, b_scale=1.5)  # 1.5 * 1/3 = 0.5
    parsed = read_lora_file(save(tmp_path / "k.safetensors", tensors))
    assert_same_deltas(deltas(dict(parsed.state_dict)), oracle_deltas(bfl, factor=0.5))
    # Without the float32 cast diffusers' own result is 0.2 % off on the qkv modules: the trap is real.
    raw = deltas(_convert_kohya_flux2_lora_to_diffusers(dict(tensors)))
    expected = oracle_deltas(bfl, factor=0.5)["transformer_blocks.0.attn.to_q"]
    assert (raw["transformer_blocks.0.attn.to_q"] / expected).mean().item() == pytest.approx(1.002, abs=5e-4)


def test_kohya_block_sparse_qkv_is_exact(rig: Rig, tmp_path: Path) -> None:
    """A rank-3k Kohya qkv whose up-weight is block diagonal: diffusers splits lora_A too; same deltas."""
    bfl = make_bfl(rig.shapes, rank=6, seed=12)
    lora_A, lora_B = bfl["double_blocks.0.img_attn.qkv"]
    mask = torch.block_diag(*[torch.ones(lora_B.shape[0] // 3, 2)] * 3)
    bfl["double_blocks.0.img_attn.qkv"] = (lora_A, lora_B * mask)
    parsed = read_lora_file(save(tmp_path / "k.safetensors", kohya(bfl, alpha=6.0)))
    assert parsed.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 2
    assert_same_deltas(deltas(dict(parsed.state_dict)), oracle_deltas(bfl, factor=1.0))


# ---- refusals -----------------------------------------------------------------------------------------


def lora_pair(
    prefix: str, a_shape: tuple[int, int], b_shape: tuple[int, int], down_up: bool = False
) -> Tensors:
    names = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    return {
        f"{prefix}.{names[0]}.weight": torch.randn(a_shape),
        f"{prefix}.{names[1]}.weight": torch.randn(b_shape),
    }


REFUSED_FILES: dict[str, tuple[Tensors, str]] = {
    "SDXL Kohya keys": (
        lora_pair("lora_unet_down_blocks_1_attentions_0_proj_in", (4, 8), (8, 4), down_up=True)
        | lora_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", (4, 8), (8, 4), down_up=True),
        "looks like a Stable Diffusion 1.x/SDXL LoRA",
    ),
    "SDXL diffusers keys": (lora_pair("unet.down_blocks.0.attentions.0.proj_in", (4, 8), (8, 4)), "SDXL"),
    "FLUX.1 diffusers names": (
        lora_pair("transformer.single_transformer_blocks.0.attn.to_q", (4, 32), (32, 4))
        | lora_pair("transformer.single_transformer_blocks.0.proj_mlp", (4, 32), (128, 4)),
        "looks like a FLUX.1 LoRA",
    ),
    "FLUX.1 BFL names": (
        lora_pair("diffusion_model.double_blocks.0.img_attn.qkv", (4, 32), (96, 4))
        | lora_pair("diffusion_model.double_blocks.0.img_mod.lin", (4, 32), (192, 4)),
        "looks like a FLUX.1 LoRA",
    ),
    "FLUX.1 Kohya names": (
        lora_pair("lora_unet_single_blocks_0_modulation_lin", (4, 32), (96, 4), down_up=True),
        "looks like a FLUX.1 LoRA",
    ),
    "DoRA (ai-toolkit)": (
        lora_pair("diffusion_model.img_in", (4, 4), (32, 4))
        | {"diffusion_model.img_in.dora_scale": torch.ones(1, 4)},
        "DoRA",
    ),
    "DoRA (peft)": (
        lora_pair("transformer.proj_out", (4, 32), (4, 4))
        | {"transformer.proj_out.lora_magnitude_vector": torch.ones(4)},
        "DoRA",
    ),
    "OFT": ({"diffusion_model.img_in.oft_blocks": torch.ones(2, 2)}, "LyCORIS"),
    "incomplete LoKr": (
        {"diffusion_model.img_in.lokr_w1": torch.ones(2, 2)},
        "incomplete LoKr factor lokr_w2",
    ),
    "another model's keys": (lora_pair("model.layers.0.self_attn.q_proj", (4, 8), (8, 4)), "match no FLUX.2"),
    "mixed layouts on one module": (
        lora_pair("transformer.x_embedder", (4, 4), (32, 4))
        | lora_pair("diffusion_model.img_in", (4, 4), (32, 4)),
        "both adapt 'transformer.x_embedder'",
    ),
    "unknown BFL module": (
        lora_pair("diffusion_model.double_blocks.0.img_attn.foo", (4, 32), (32, 4)),
        "not FLUX.2",
    ),
    "unknown Kohya module": (
        lora_pair("lora_unet_double_blocks_0_img_attn_foo", (4, 32), (32, 4), down_up=True),
        "modules FLUX.2 does not have",
    ),
    "no tensors": ({}, "holds no tensors"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES))
def test_foreign_files_are_refused_with_a_reason(tmp_path: Path, case: str) -> None:
    tensors, message = REFUSED_FILES[case]
    path = save(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LoraFitError, match=message) as raised:
        read_lora_file(path, name="my lora")
    assert "'my lora'" in str(raised.value)


def test_dora_in_the_header_is_refused(tmp_path: Path) -> None:
    tensors = lora_pair("proj_out", (4, 32), (4, 4))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj_out"], use_dora=True)
    Flux2Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=tensors,
        weight_name="d.safetensors",
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    with pytest.raises(LoraFitError, match="DoRA"):
        read_lora_file(tmp_path / "d.safetensors")


class _Payload:
    """Unpickling this would create the marker file: proof that nothing was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_broken_and_pickled_files_are_refused_unread(rig: Rig, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    cases = {
        b"": "empty",
        b"definitely not a safetensors file": "not a valid safetensors file",
        pickle.dumps({"x": _Payload(marker)}, protocol=2): "Python pickle",
    }
    zipped = tmp_path / "zip.safetensors"
    torch.save({"x": torch.ones(2), "y": _Payload(marker)}, zipped)
    valid = save(tmp_path / "valid.safetensors", ai_toolkit(rig.bfl, alpha=True)).read_bytes()
    cases[valid[: len(valid) // 2]] = "corrupted or truncated"
    for index, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"{index}.safetensors"
        path.write_bytes(content)
        with pytest.raises(LoraFitError, match=message):
            read_lora_file(path)
    with pytest.raises(LoraFitError, match="zip archive"):
        read_lora_file(zipped)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        read_lora_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (json.dumps({"transformer.no_such_field": 1}), "unusable adapter metadata"),
        ("{not json", "not a readable"),
    ],
)
def test_bad_header_metadata_is_refused(tmp_path: Path, header: str, message: str) -> None:
    tensors = lora_pair("transformer.proj_out", (4, 32), (4, 4))
    path = save(tmp_path / "m.safetensors", tensors, metadata={"lora_adapter_metadata": header})
    with pytest.raises(LoraFitError, match=message):
        read_lora_file(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("FLUX.2 Klein-sized (hidden 48)", "a LoRA for another model?"),
        ("FLUX.1-dev-sized qkv", "3072 ->"),
        ("more blocks than this model", "targets modules not"),
    ],
)
def test_loras_for_other_sizes_are_refused_by_the_slots(
    rig: Rig, slots: LoraSlots, tmp_path: Path, case: str, message: str
) -> None:
    """Key names FLUX.2 shares with Klein and FLUX.1 pass read_lora_file; LoraSlots refuses the shapes."""
    good = read_lora_file(save(tmp_path / "good.safetensors", ai_toolkit(rig.bfl, alpha=True)))
    slots.apply([(good, 1.0)])
    tensors = ai_toolkit(rig.bfl, alpha=True)
    if case.startswith("FLUX.2 Klein"):
        tensors |= lora_pair("diffusion_model.double_blocks.0.img_attn.qkv", (4, 48), (144, 4))
    elif case.startswith("FLUX.1"):
        tensors |= lora_pair("diffusion_model.double_blocks.0.img_attn.qkv", (4, 3072), (9216, 4))
    else:
        tensors |= lora_pair("diffusion_model.single_blocks.7.linear2", (4, 128), (32, 4))
    parsed = read_lora_file(save(tmp_path / "other.safetensors", tensors), name=case)
    with pytest.raises(LoraFitError, match=message):
        slots.apply([(parsed, 1.0)])
    assert slots.loaded == [(good.name, 1.0)]
    np.testing.assert_allclose(render(rig.pipe, size=SIZE), rig.reference, rtol=0, atol=ATOL)


def test_non_finite_weights_are_refused_once_at_read(tmp_path: Path) -> None:
    """Checked when the file is read, so applying a cached LoRA never scans its weights again."""
    good = {
        "transformer.proj_out.lora_A.weight": torch.ones(2, 4),
        "transformer.proj_out.lora_B.weight": torch.ones(4, 2),
    }
    parsed = read_lora_file(save(tmp_path / "good.safetensors", good))
    assert parsed.finite
    bad = {**good, "transformer.proj_out.lora_B.weight": torch.full((4, 2), float("nan"))}
    with pytest.raises(LoraFitError, match="NaN or infinite"):
        read_lora_file(save(tmp_path / "bad.safetensors", bad))


# ---- LyCORIS LoKr and LoHa: converted to exact LoRA factors -------------------------------------------


def lokr_factors(
    in_features: int, out_features: int, rank: int, seed: int, factor: int = 4
) -> dict[str, torch.Tensor]:
    """A LoKr module as LyCORIS (and peft) shape it for a Linear: w1 full (out_l x in_m), w2 = w2_a @ w2_b
    (out_k x in_n), the sides from peft's own `factorization`."""
    from peft.tuners.lokr.layer import factorization

    generator = torch.Generator().manual_seed(seed)
    (out_l, out_k), (in_m, in_n) = factorization(out_features, factor), factorization(in_features, factor)
    return {
        "lokr_w1": torch.randn(out_l, in_m, generator=generator) * 0.5,
        "lokr_w2_a": torch.randn(out_k, rank, generator=generator) * 0.5,
        "lokr_w2_b": torch.randn(rank, in_n, generator=generator) * 0.5,
        "alpha": torch.tensor(1.0),
    }


def lokr_delta(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    w2 = factors["lokr_w2_a"].double() @ factors["lokr_w2_b"].double()
    return (
        torch.kron(factors["lokr_w1"].double(), w2) * float(factors["alpha"]) / factors["lokr_w2_b"].shape[0]
    )


def bfl_lycoris(
    shapes: dict[str, tuple[int, int]], make: Callable[[int, int, int], Tensors]
) -> dict[str, Tensors]:
    """{BFL module: its factors} for every module of BFL_MODULES."""
    modules = {}
    for seed, (module, targets) in enumerate(BFL_MODULES.items()):
        in_features, out_features = shapes[targets[0]][0], sum(shapes[t][1] for t in targets)
        modules[module] = make(in_features, out_features, seed)
    return modules


def lycoris_file(path: Path, modules: dict[str, Tensors], prefix: str = "diffusion_model.") -> Path:
    return save(
        path,
        {f"{prefix}{module}.{name}": t for module, factors in modules.items() for name, t in factors.items()},
    )


def oracle_from_deltas(bfl_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = convert_flux2_transformer_checkpoint_to_diffusers(
        {f"{m}.weight": d for m, d in bfl_deltas.items()}
    )
    return {k.removesuffix(".weight"): v for k, v in converted.items()}


@pytest.mark.parametrize("naming", ["ai-toolkit", "Kohya"])
def test_lokr_is_an_exact_lora(rig: Rig, tmp_path: Path, naming: str) -> None:
    bfl = bfl_lycoris(rig.shapes, lambda i, o, seed: lokr_factors(i, o, rank=2, seed=seed))
    if naming == "ai-toolkit":
        path = lycoris_file(tmp_path / "lokr.safetensors", bfl)
    else:  # LyCORIS' own naming for sd-scripts/Musubi: lora_unet_ + the BFL name, underscored
        kohya = {"lora_unet_" + module.replace(".", "_"): factors for module, factors in bfl.items()}
        path = lycoris_file(tmp_path / "lokr.safetensors", kohya, prefix="")
    parsed = read_lora_file(path, lycoris=LycorisPolicy(8))
    assert parsed.notes == ()
    expected = oracle_from_deltas({module: lokr_delta(factors) for module, factors in bfl.items()})
    assert_same_deltas(deltas(dict(parsed.state_dict)), expected)


def test_simpletuner_lokr_renders_as_diffusers_loads_it(
    rig: Rig, slots: LoraSlots, tmp_path: Path, cache_dir: Path
) -> None:
    names = {  # SimpleTuner's LyCORIS module names -> the tiny transformer's modules
        "lycoris_transformer_blocks_0_attn_to_q": "transformer_blocks.0.attn.to_q",
        "lycoris_transformer_blocks_0_attn_to_out_0": "transformer_blocks.0.attn.to_out.0",
        "lycoris_transformer_blocks_0_ff_linear_in": "transformer_blocks.0.ff.linear_in",
        "lycoris_single_transformer_blocks_0_attn_to_out": "single_transformer_blocks.0.attn.to_out",
    }
    tensors = {}
    for seed, (name, module) in enumerate(names.items()):
        in_features, out_features = rig.shapes[module]
        for factor, tensor in lokr_factors(in_features, out_features, rank=2, seed=seed).items():
            tensors[f"{name}.{factor}"] = tensor
    path = save(tmp_path / "simpletuner-lokr.safetensors", tensors)
    theirs = load_tiny(cache_dir)  # diffusers' own LoKr loading (peft's LoKr layers), on a clean pipeline
    theirs.load_lora_weights(str(path))
    expected = render(theirs, size=SIZE)
    slots.apply([(read_lora_file(path, lycoris=LycorisPolicy(8)), 1.0)])
    image = render(rig.pipe, size=SIZE)
    difference = np.abs(image - expected).max()
    print(f"\nSimpleTuner LoKr vs diffusers' LoKr loading: max pixel difference {difference:.2e}")
    np.testing.assert_allclose(image, expected, rtol=0, atol=ATOL)
    assert np.abs(expected - rig.base).max() > 100 * ATOL  # the LoKr does change the image


def test_loha_is_an_exact_lora(rig: Rig, tmp_path: Path) -> None:
    def loha(in_features: int, out_features: int, seed: int) -> Tensors:
        generator = torch.Generator().manual_seed(seed)
        return {
            "hada_w1_a": torch.randn(out_features, 2, generator=generator),
            "hada_w1_b": torch.randn(2, in_features, generator=generator),
            "hada_w2_a": torch.randn(out_features, 2, generator=generator),
            "hada_w2_b": torch.randn(2, in_features, generator=generator),
            "alpha": torch.tensor(1.0),
        }

    modules = bfl_lycoris(rig.shapes, loha)
    parsed = read_lora_file(lycoris_file(tmp_path / "loha.safetensors", modules), lycoris=LycorisPolicy(8))
    expected = oracle_from_deltas(
        {
            m: (f["hada_w1_a"].double() @ f["hada_w1_b"].double())
            * (f["hada_w2_a"].double() @ f["hada_w2_b"].double())
            * 0.5  # alpha 1 / rank 2
            for m, f in modules.items()
        }
    )
    actual = deltas(dict(parsed.state_dict))
    assert sorted(actual) == sorted(expected)
    for module, delta in expected.items():  # float32 factors: exact up to float32 rounding of the delta
        torch.testing.assert_close(actual[module], delta, rtol=0, atol=1e-6 * float(delta.abs().max()))


def test_a_lokr_over_the_slot_rank_is_refused_or_truncated_with_its_error(rig: Rig, tmp_path: Path) -> None:
    modules = bfl_lycoris(rig.shapes, lambda i, o, seed: lokr_factors(i, o, rank=2, seed=seed))
    path = lycoris_file(tmp_path / "lokr.safetensors", modules)
    with pytest.raises(
        LoraFitError, match=r"needs rank 8 as a LoRA, over this server's slot rank 4 \(FLUX2_MAX_LORA_RANK\)"
    ):
        read_lora_file(path, lycoris=LycorisPolicy(4))
    parsed = read_lora_file(path, lycoris=LycorisPolicy(4, truncate=True))
    assert len(parsed.notes) == len(modules) and all("rank 8 truncated to 4" in note for note in parsed.notes)

    def best_rank_4(delta: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(delta)
        return (u[:, :4] * s[:4]) @ vh[:4]

    expected = oracle_from_deltas({m: best_rank_4(lokr_delta(f)) for m, f in modules.items()})
    assert_same_deltas(deltas(dict(parsed.state_dict)), expected)


def test_tucker_factors_are_refused(tmp_path: Path) -> None:
    tensors = {f"diffusion_model.img_in.{k}": v for k, v in lokr_factors(4, 32, 2, seed=0).items()}
    tensors["diffusion_model.img_in.lokr_t2"] = torch.ones(2, 2, 1, 1)
    with pytest.raises(LoraFitError, match="Tucker"):
        read_lora_file(save(tmp_path / "tucker.safetensors", tensors))


def test_text_encoder_keys_beside_transformer_keys_are_dropped_with_a_note(rig: Rig, tmp_path: Path) -> None:
    tensors = ai_toolkit(rig.bfl, alpha=True) | lora_pair(
        "text_encoder.model.layers.0.mlp.up_proj", (4, 8), (8, 4)
    )
    parsed = read_lora_file(save(tmp_path / "with-te.safetensors", tensors))
    assert_same_deltas(deltas(dict(parsed.state_dict)), oracle_deltas(rig.bfl))
    (note,) = parsed.notes
    assert "ignored 2 text-encoder keys" in note and "text_encoder.model.layers.0.mlp.up_proj" in note
