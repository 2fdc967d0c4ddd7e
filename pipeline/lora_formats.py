"""Reads the FLUX.2 LoRA file layouts users bring into the diffusers/peft form that `LoraSlots` applies.

Output: `transformer.<module>.lora_A.weight` / `.lora_B.weight` plus per-module `transformer.<module>.alpha`.
Layouts, told apart by their keys:

- diffusers/peft: `transformer.<module>...` (or bare diffusers module names), alpha in the safetensors header;
- Kohya / Musubi: `lora_unet_<bfl_module_with_underscores>.lora_down/lora_up.weight` + `.alpha`;
- ai-toolkit / BFL original names: `diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`, + `.alpha`
  (also peft's `base_model.model.` prefix, which diffusers treats the same way);
- fal's FLUX.2 trainer: `diffusion_model.` + diffusers block names, BFL names such as `guidance_in` elsewhere;
- DiffSynth-Studio: bare diffusers names with peft's adapter name kept (`...to_q.lora_A.default.weight`);
- bare BFL names, no prefix at all (`double_blocks.0.img_attn.qkv.lora_A.weight`), as conversion scripts
  write them;
- LyCORIS LoKr and LoHa (`<module>.lokr_w1`, `.hada_w1_a`, ..., in any of the namings above, or
  SimpleTuner's `lycoris_transformer_blocks_0_ff_linear_in`), turned into exact LoRA factors first
  (`lycoris.py`).

Each key is read in its own layout, so one file may mix them (the FLUX.2 [dev] Turbo LoRA's conversions put
the blocks under `transformer.` and the guidance embedder under `diffusion_model.` with BFL names), as long
as no two keys land on the same module.

diffusers' own converters do the renaming and the splitting of fused BFL projections (qkv -> to_q/to_k/to_v
with lora_A shared and lora_B split by rows). Where they fail or silently lose weights (diffusers 0.42.1), a
small named function below fixes it up and says which trap it handles. Anything else, a LoRA for another
model, DoRA / LyCORIS, and unreadable files are refused with `LoraFitError` saying what the file looks like.
Shapes are not checked here: `LoraSlots` compares them against the loaded transformer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_conversion_utils import (
    _LYCORIS_FLUX2_SUBPATH_MAP,
    _convert_kohya_flux2_lora_to_diffusers,
    _convert_non_diffusers_flux2_lora_to_diffusers,
)
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from pipeline.lora_slots import LoraFitError, ParsedLora
from pipeline.lycoris import LycorisPolicy, is_lycoris_key, lycoris_as_lora

_PREFIX = "transformer."
_BFL_PREFIX = "diffusion_model."
_PEFT_PREFIX = "base_model.model."
_KOHYA_PREFIX = "lora_unet_"
_SHOWN = 3  # example keys quoted in an error

# FLUX.2's top-level diffusers modules (Flux2Transformer2DModel). Block names go through diffusers' converter.
_DIFFUSERS_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_DIFFUSERS_TOP_LEVEL = (
    "x_embedder.",
    "context_embedder.",
    "time_guidance_embed.",
    "double_stream_modulation_img.linear.",
    "double_stream_modulation_txt.linear.",
    "single_stream_modulation.linear.",
    "norm_out.linear.",
    "proj_out.",
)
# FLUX.2's BFL-named modules outside the blocks, as the ai-toolkit converter names them.
_BFL_TOP_LEVEL = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
    "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.lin",
    "single_stream_modulation.lin",
)
_BFL_FINAL_MODULATION = _BFL_PREFIX + "final_layer.adaLN_modulation.1.lora_B.weight"

# Names written without any prefix: BFL's blocks and top-level modules, read as `diffusion_model.` ones.
_BARE_BFL = re.compile(
    r"^(?:double_blocks|single_blocks|img_in|txt_in|time_in|guidance_in|final_layer"
    r"|double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\."
)
# peft's adapter name left in a key (DiffSynth-Studio): `.lora_A.default.weight` is `.lora_A.weight`.
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.(?!weight$)[\w-]+\.weight$")

# Key-level signatures of files that are not plain FLUX.2 LoRAs, checked in this order.
_DORA = re.compile(r"dora_scale|lora_magnitude_vector")
_LYCORIS = re.compile(r"\.(?:oft|boft)_|\.lora_mid\.|\.diff(?:_b)?$|\.lora_[AB]\.bias$")
# SimpleTuner's LyCORIS names: diffusers module paths with underscores, under `lycoris_`.
_LYCORIS_NAME = re.compile(r"^lycoris_((?:single_)?transformer_blocks)_(\d+)_(\w+?)\.([\w.]+)$")
_SD_UNET = re.compile(
    r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d*"
)
_FLUX1 = re.compile(
    r"(?:img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation[._]lin|vector_in|time_text_embed|proj_mlp"
    r"|norm1(?:_context)?[._]linear|ff(?:_context)?\.net\.|single_transformer_blocks\.\d+\."
    r"(?:attn\.to_[qkv]\.|norm\.linear|proj_out\.)"
)
_TEXT_ENCODER = re.compile(r"^(?:lora_te\d?_|text_encoder|te\d?\.|lora_te_text_model)")
_CONVERTED_KEY = re.compile(r"^transformer\.[\w.]+\.(?:lora_A\.weight|lora_B\.weight|alpha)$")


class _Layout(Enum):
    DIFFUSERS = "diffusers/peft"
    KOHYA = "Kohya/Musubi"
    BFL = "ai-toolkit/BFL"


def read_lora_file(path: Path, name: str | None = None, lycoris: LycorisPolicy | None = None) -> ParsedLora:
    """Reads a .safetensors LoRA of any supported layout into diffusers/peft form with per-module alphas.

    The header is read first (cheap, and it never unpickles anything), so foreign and broken files are refused
    before any weights are loaded; the weights are then read with safetensors only. `lycoris` says how LoKr
    and LoHa deltas too large for the slots are treated (by default none is).
    """
    label = name or path.name
    if not path.is_file():  # else diffusers would take the path for a Hub repo id and go online
        raise FileNotFoundError(f"LoRA {label!r}: no file at {path}")
    header_keys = _read_keys(path, label)
    keys, notes = _without_text_encoder(header_keys)
    loaded: dict[str, torch.Tensor] | None = None
    if any(is_lycoris_key(key) for key in keys):
        _refuse_foreign(label, keys)
        named = {_lycoris_module_name(key): tensor for key, tensor in _load_kept(path, label, keys).items()}
        loaded, truncations = lycoris_as_lora(label, named, lycoris or LycorisPolicy(max_rank=2**31))
        notes += truncations
        keys = list(loaded)
    canonical = {key: _canonical_key(key) for key in keys}
    layouts = _group_by_layout(label, list(canonical.values()))
    what = " + ".join(layout.value for layout in layouts)
    untouched = loaded is None and len(keys) == len(header_keys) and all(k == v for k, v in canonical.items())
    if untouched and list(layouts) == [_Layout.DIFFUSERS]:
        state_dict = _read_diffusers(path, label)  # exactly as diffusers reads it
    else:
        loaded = _load_kept(path, label, keys) if loaded is None else loaded
        weights = {canonical[key]: tensor for key, tensor in loaded.items()}
        state_dict = {}
        for layout, layout_keys in layouts.items():
            part = {key: weights[key] for key in layout_keys}
            if layout is _Layout.KOHYA:
                converted = _from_kohya(label, part, notes)
            elif layout is _Layout.BFL:
                converted = _from_bfl(label, part)
            else:
                converted = _diffusers_named(label, part, _header_fields(path))
            _refuse_collisions(label, state_dict, converted, what)
            state_dict.update(converted)
    _check_converted(label, what, state_dict)
    for key, tensor in state_dict.items():  # once here, not on every application of a cached LoRA
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraFitError(f"LoRA {label!r}: {key} contains NaN or infinite values")
    if any(is_lycoris_key(key) for key in header_keys):
        what += " (LyCORIS " + " and ".join(_lycoris_kinds(header_keys)) + ", read as LoRA factors)"
    return ParsedLora(name=label, state_dict=state_dict, finite=True, notes=tuple(notes), layout=what)


def _lycoris_kinds(keys: list[str]) -> list[str]:
    return [
        kind for kind, marker in (("LoKr", ".lokr_"), ("LoHa", ".hada_")) if any(marker in k for k in keys)
    ]


def _without_text_encoder(keys: list[str]) -> tuple[list[str], list[str]]:
    """A file that also adapts a text encoder: its transformer keys, and a note of what was dropped (the
    text encoder is shared by every request, so it is never adapted). A file of text-encoder keys only is
    left whole, to be refused as a LoRA for another model."""
    dropped = [key for key in keys if _TEXT_ENCODER.search(key)]
    if not dropped or len(dropped) == len(keys):
        return keys, []
    note = f"ignored {len(dropped)} text-encoder keys (only the transformer is adapted): {_examples(dropped)}"
    return [key for key in keys if key not in set(dropped)], [note]


def _load_kept(path: Path, label: str, keys: list[str]) -> dict[str, torch.Tensor]:
    kept = set(keys)
    return {key: tensor for key, tensor in _load_weights(path, label).items() if key in kept}


def _lycoris_module_name(key: str) -> str:
    """SimpleTuner's `lycoris_transformer_blocks_0_ff_linear_in.lokr_w1` as `transformer.` + the diffusers
    module (through diffusers' own table of FLUX.2's block sub-paths); other keys as they are."""
    match = _LYCORIS_NAME.match(key)
    if match is None:
        return key
    blocks, index, sub_path, factor = match.groups()
    module = _LYCORIS_FLUX2_SUBPATH_MAP.get(sub_path)
    return f"{_PREFIX}{blocks}.{index}.{module}.{factor}" if module else key


def _canonical_key(key: str) -> str:
    """The key with a DiffSynth adapter name dropped and bare BFL names given their `diffusion_model.`."""
    key = _ADAPTER_NAME.sub(r".\1.weight", key)
    return _BFL_PREFIX + key if _BARE_BFL.match(key) else key


def _refuse_collisions(
    label: str, done: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor], what: str
) -> None:
    """Two layouts in one file that set the same module would silently overwrite one another."""
    both = sorted({k.rsplit(".", 2)[0] for k in set(done) & set(converted)})
    if both:
        raise LoraFitError(
            f"LoRA {label!r} mixes key layouts ({what}) that both adapt {_examples(both)}; it cannot be read"
            " safely"
        )


def _read_keys(path: Path, label: str) -> list[str]:
    """The tensor names from the safetensors header; unreadable files are described, never unpickled."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise LoraFitError(f"LoRA {label!r}: {_describe_unreadable(path)} ({error})") from error
    if not keys:
        raise LoraFitError(f"LoRA {label!r}: the safetensors file holds no tensors")
    return keys


def _describe_unreadable(path: Path) -> str:
    with path.open("rb") as file:
        head = file.read(8)
    if not head:
        return "the file is empty (0 bytes): an incomplete download?"
    if head.startswith(b"PK\x03\x04"):
        return (
            "this is a zip archive, i.e. a PyTorch .pt/.ckpt checkpoint renamed to .safetensors; pickled"
            " checkpoints can run code and are not read: convert it to safetensors"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "this is a Python pickle, not safetensors; pickles can run code and are not read"
    return "not a valid safetensors file (corrupted or truncated?)"


def _load_weights(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraFitError(f"LoRA {label!r}: {_describe_unreadable(path)} ({error})") from error


def _group_by_layout(label: str, keys: list[str]) -> dict[_Layout, list[str]]:
    """The (canonical) keys by layout; refuses other models, DoRA, LyCORIS and keys of no layout, saying
    why."""
    _refuse_foreign(label, keys)
    layouts: dict[_Layout, list[str]] = {}
    unknown: list[str] = []
    for key in keys:
        if key.startswith(_KOHYA_PREFIX):
            layouts.setdefault(_Layout.KOHYA, []).append(key)
        elif key.startswith((_BFL_PREFIX, _PEFT_PREFIX)):
            layouts.setdefault(_Layout.BFL, []).append(key)
        elif key.startswith(_PREFIX) or key.startswith(_DIFFUSERS_BLOCKS + _DIFFUSERS_TOP_LEVEL):
            layouts.setdefault(_Layout.DIFFUSERS, []).append(key)
        else:
            unknown.append(key)
    if unknown:
        raise LoraFitError(
            f"LoRA {label!r}: keys such as {_examples(unknown)} match no FLUX.2 LoRA layout (diffusers"
            " `transformer.`, Kohya `lora_unet_`, ai-toolkit/BFL `diffusion_model.`): a LoRA for another"
            " model?"
        )
    kohya = layouts.get(_Layout.KOHYA, [])
    if kohya and not any(k.endswith(".lora_down.weight") for k in kohya):
        raise LoraFitError(f"LoRA {label!r}: `lora_unet_` keys without `lora_down/lora_up` weights")
    return layouts


def _refuse_foreign(label: str, keys: list[str]) -> None:
    """Key-level signatures of LoRAs this server cannot apply exactly; dropping their extra weights would
    silently change the result (diffusers drops DoRA's `dora_scale` with a warning)."""
    checks = (
        (
            _DORA,
            "is a DoRA (weight-decomposed LoRA); its magnitude vectors cannot be applied here and"
            " dropping them would change the result, so it is not supported",
        ),
        (
            _LYCORIS,
            "is a LyCORIS-style adapter (LoKr/LoHa/OFT, full diffs or LoRA biases); only plain LoRA"
            " weights are supported",
        ),
        (_SD_UNET, "looks like a Stable Diffusion 1.x/SDXL LoRA (UNet down/up blocks), not FLUX.2"),
        (_FLUX1, "looks like a FLUX.1 LoRA (FLUX.1 module names), not FLUX.2: the architectures differ"),
        (
            _TEXT_ENCODER,
            "has text-encoder weights (CLIP/T5 era, e.g. SD or FLUX.1); FLUX.2 LoRAs adapt only"
            " the transformer",
        ),
    )
    for pattern, message in checks:
        hits = [key for key in keys if pattern.search(key)]
        if hits:
            raise LoraFitError(f"LoRA {label!r} {message} (keys such as {_examples(hits)})")


def _examples(keys: Iterable[str]) -> str:
    listed = sorted(keys)
    shown = ", ".join(repr(k) for k in listed[:_SHOWN])
    return shown + (f" and {len(listed) - _SHOWN} more" if len(listed) > _SHOWN else "")


def _read_diffusers(path: Path, label: str) -> dict[str, torch.Tensor]:
    """diffusers/peft files as diffusers reads them, plus the header alphas it would pass to peft."""
    try:
        state_dict, metadata = Flux2Pipeline.lora_state_dict(
            str(path), use_safetensors=True, local_files_only=True, return_lora_metadata=True
        )
    except (ValueError, KeyError, TypeError, OSError, safetensors.SafetensorError) as error:
        raise LoraFitError(f"LoRA {label!r}: not a readable FLUX.2 LoRA file ({error})") from error
    return _diffusers_named(label, dict(state_dict), _fields(metadata or {}))


def _diffusers_named(
    label: str, weights: Mapping[str, torch.Tensor], fields: dict[str, object]
) -> dict[str, torch.Tensor]:
    """The diffusers-named keys of a file diffusers itself would not read whole (DiffSynth adapter names,
    or next to keys of another layout): prefixed, with the header's alphas, as `_read_diffusers` does."""
    converted = _add_transformer_prefix(weights)
    if fields:
        converted.update(_alphas_from_metadata(label, converted, fields))
    return converted


def _header_fields(path: Path) -> dict[str, object]:
    """The adapter config diffusers writes into the safetensors header, by field (`lora_alpha`, ...)."""
    return _fields(_load_sft_state_dict_metadata(str(path)) or {})


def _fields(metadata: Mapping[str, object]) -> dict[str, object]:
    # Header keys are packed with the component prefix, e.g. "transformer.lora_alpha".
    return {k.removeprefix(_PREFIX): v for k, v in metadata.items() if k.startswith(_PREFIX)}


def _add_transformer_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trap 2: a state dict without the `transformer.` prefix loads nothing in diffusers (only a warning)."""
    return {(k if k.startswith(_PREFIX) else _PREFIX + k): v for k, v in state_dict.items()}


def _alphas_from_metadata(
    label: str, state_dict: Mapping[str, torch.Tensor], fields: dict[str, object]
) -> dict[str, torch.Tensor]:
    """Trap 3: alpha lives only in the header (`lora_adapter_metadata`, a LoraConfig's fields); without it
    the scale would silently be 1.0 instead of alpha/r. Resolved per module as peft does it."""
    try:
        config = LoraConfig(**fields)  # type: ignore[arg-type]  # header JSON, validated by LoraConfig
    except (TypeError, ValueError) as error:
        raise LoraFitError(f"LoRA {label!r}: unusable adapter metadata ({error})") from error
    if config.use_dora:
        raise LoraFitError(f"LoRA {label!r}: DoRA adapters are not supported (the header says use_dora)")
    alpha_pattern: dict[str, float] = config.alpha_pattern or {}
    alphas: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.endswith(".lora_B.weight") or tensor.ndim != 2:
            continue
        module = key.removesuffix(".lora_B.weight")
        if module + ".alpha" in state_dict:
            continue
        pattern = get_pattern_key(list(alpha_pattern), module.removeprefix(_PREFIX))
        alpha = float(alpha_pattern.get(pattern, config.lora_alpha))
        if config.use_rslora:  # peft scales by alpha / sqrt(r); express it as alpha' / r
            alpha *= math.sqrt(tensor.shape[1])
        alphas[module + ".alpha"] = torch.tensor(alpha)
    return alphas


def _from_kohya(label: str, weights: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Kohya/Musubi through diffusers' Kohya converter (it folds alpha/rank into the weights); the modules
    it does not know go through the BFL path instead of being dropped."""
    remaining = _alphas_to_float32(weights)
    try:
        # The converter pops every key it converts: what is left in `remaining` afterwards it ignored.
        converted: dict[str, torch.Tensor] = _convert_kohya_flux2_lora_to_diffusers(remaining)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise LoraFitError(f"LoRA {label!r}: not a readable Kohya FLUX.2 LoRA ({error})") from error
    leftovers = _kohya_leftovers_to_bfl(label, remaining, notes)
    if leftovers:
        converted.update(_from_bfl(label, leftovers))
    return converted


def _alphas_to_float32(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Kohya converter computes alpha / rank in the alpha tensor's dtype for fused qkv: a bf16
    alpha turns 1/3 into 0.334 (0.2 % off). Alpha values themselves are small integers, exact in float32."""
    return {k: v.float() if k.endswith(".alpha") else v for k, v in weights.items()}


def _kohya_leftovers_to_bfl(
    label: str, remaining: Mapping[str, torch.Tensor], notes: list[str]
) -> dict[str, torch.Tensor]:
    """diffusers' Kohya converter ignores `guidance_in`, `final_layer.adaLN_modulation.1` and the shared
    modulation layers, logging only a warning: the LoRA would load with those weights silently missing.
    They are renamed to their BFL names here; anything else left over is refused."""
    kohya_names = {_KOHYA_PREFIX + name.replace(".", "_"): name for name in _BFL_TOP_LEVEL}
    suffixes = {
        ".lora_down.weight": ".lora_A.weight",
        ".lora_up.weight": ".lora_B.weight",
        ".alpha": ".alpha",
    }
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    idle_alphas: list[str] = []
    for key, tensor in remaining.items():
        for suffix, new_suffix in suffixes.items():
            module = key.removesuffix(suffix)
            if module != key and module in kohya_names:
                renamed[_BFL_PREFIX + kohya_names[module] + new_suffix] = tensor
                break
        else:
            (idle_alphas if key.endswith(".alpha") else unknown).append(key)
    if idle_alphas:  # an alpha without weights scales nothing
        notes.append(f"ignored {len(idle_alphas)} alpha keys without weights: {_examples(idle_alphas)}")
    if unknown:
        raise LoraFitError(
            f"LoRA {label!r}: Kohya keys for modules FLUX.2 does not have: {_examples(unknown)}"
        )
    return renamed


def _from_bfl(label: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ai-toolkit/BFL/fal files through diffusers' FLUX.2 converter, after the fix-ups it needs."""
    weights = _peft_prefix_to_bfl(weights)
    weights = _down_up_to_A_B(weights)
    weights, diffusers_named = _split_diffusers_named(weights)
    weights, alphas = _split_alphas(weights)
    weights = _final_modulation_to_diffusers_order(weights)
    converted: dict[str, torch.Tensor] = {}
    if weights:
        try:
            converted = _convert_non_diffusers_flux2_lora_to_diffusers(weights)  # type: ignore[no-untyped-call]
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
            raise LoraFitError(
                f"LoRA {label!r}: `diffusion_model.` keys that are not FLUX.2 modules ({error})"
            ) from error
    converted.update(_alphas_through_converter(alphas))
    converted.update(diffusers_named)
    return converted


def _peft_prefix_to_bfl(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's `base_model.model.` prefix means the same as `diffusion_model.` (as in diffusers' loader)."""
    return {
        _BFL_PREFIX + k.removeprefix(_PEFT_PREFIX) if k.startswith(_PEFT_PREFIX) else k: v
        for k, v in weights.items()
    }


def _down_up_to_A_B(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.` files named `lora_down/lora_up`: diffusers routes any `.lora_down.weight` key to its
    Kohya converter, which matches nothing, warns, and returns an empty LoRA."""
    return {
        k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
        for k, v in weights.items()
    }


def _split_diffusers_named(
    weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """fal's trainer writes `diffusion_model.` + diffusers names. diffusers accepts its block names but raises
    ValueError on top-level ones (`diffusion_model.x_embedder`, `proj_out`, ...): those are renamed here."""
    rest: dict[str, torch.Tensor] = {}
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        bare = key.removeprefix(_BFL_PREFIX)
        if bare.startswith(_DIFFUSERS_TOP_LEVEL):
            renamed[_PREFIX + bare] = tensor
        else:
            rest[key] = tensor
    return rest, renamed


def _split_alphas(
    weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trap 1: diffusers' FLUX.2 converter raises ValueError on any `.alpha` key; they are set aside here
    (`{module: alpha}`) and mapped separately. An alpha for a module without weights scales nothing."""
    rest = {k: v for k, v in weights.items() if not k.endswith(".alpha")}
    alphas: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        module = key.removesuffix(".alpha")
        if module != key and module + ".lora_A.weight" in rest:
            alphas[module] = tensor
    return rest, alphas


def _alphas_through_converter(alphas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trap 1, continued: each alpha follows its module through diffusers' own key mapping. A rank-1 probe
    LoRA whose lora_A holds the module's index is converted; every diffusers module that receives that lora_A
    (to_q, to_k and to_v for one fused qkv, which share the lora_A and hence its rank) gets the alpha. This
    keeps alpha exact and the weights untouched, instead of folding alpha/rank into low-precision weights."""
    if not alphas:
        return {}
    modules = list(alphas)
    probe: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        probe[f"{module}.lora_A.weight"] = torch.tensor([[float(index)]])
        probe[f"{module}.lora_B.weight"] = torch.zeros(6, 1)  # divisible by 3 (qkv) and 2 (modulation)
    converted: dict[str, torch.Tensor] = _convert_non_diffusers_flux2_lora_to_diffusers(probe)  # type: ignore[no-untyped-call]
    return {
        key.removesuffix(".lora_A.weight") + ".alpha": alphas[modules[int(tensor.item())]].reshape(())
        for key, tensor in converted.items()
        if key.endswith(".lora_A.weight")
    }


def _final_modulation_to_diffusers_order(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's `final_layer.adaLN_modulation.1` outputs (shift, scale), diffusers' `norm_out.linear` (scale,
    shift): diffusers' FLUX.2 checkpoint converter swaps the halves, its LoRA converter does not (the FLUX.1
    ones do). Swapping lora_B's output rows makes the LoRA change the same outputs as in the BFL model."""
    converted = dict(weights)
    lora_B = converted.get(_BFL_FINAL_MODULATION)
    if lora_B is not None and lora_B.ndim == 2 and lora_B.shape[0] % 2 == 0:
        shift, scale = lora_B.chunk(2, dim=0)
        converted[_BFL_FINAL_MODULATION] = torch.cat([scale, shift], dim=0)
    return converted


def _check_converted(label: str, what: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """The converters must leave only diffusers LoRA keys; an empty result means nothing was recognised."""
    if not any(k.endswith(".lora_A.weight") for k in state_dict):
        raise LoraFitError(f"LoRA {label!r}: no LoRA weights found in this {what} file")
    odd = [k for k in state_dict if not _CONVERTED_KEY.match(k)]
    if odd:
        raise LoraFitError(
            f"LoRA {label!r}: unsupported keys in this {what} file: {_examples(odd)} (plain LoRA"
            " lora_A/lora_B weights and alpha only)"
        )
