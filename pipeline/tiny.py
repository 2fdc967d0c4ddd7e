"""A tiny random-weight FLUX.2 [dev]-shaped pipeline, built offline.

The real `black-forest-labs/FLUX.2-dev` (56 B parameters, gated) cannot be downloaded on development or CI
machines, and a hand-written fake pipeline would test nothing. So this module builds every component the
real model folder has (transformer, VAE, Mistral-3 text encoder, Pixtral processor with a tokenizer and chat
template, scheduler) at toy sizes, saves it with `save_pretrained`, and the server then loads it through the
very same `Flux2Pipeline.from_pretrained(folder)` code path. Images are noise, but every line of diffusers,
transformers and peft code that runs for the real model runs for this one.

The folder is built at first use instead of being committed, because the saved tokenizer format follows the
installed transformers version.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import diffusers
import torch
import transformers

# The defining modules, not `from diffusers import ...`: for type checkers diffusers' top level resolves to
# its torch-less dummy classes, which are not nn.Modules.
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
)

TINY_FORMAT_VERSION: int = 2
"""Part of the cache folder name: bump it whenever `build_tiny_pipeline` writes something different."""

# The real model's text encoder feeds hidden states of layers (10, 20, 30) to the transformer; 30 layers keep
# the pipeline's default `text_encoder_out_layers` valid, so callers never pass a tiny-only value.
_TEXT_LAYERS = 30
_TEXT_OUT_LAYERS = 3
_TEXT_HIDDEN = 16

# Mistral's control tokens, laid out so that [IMG] gets id 10, Mistral3Config's default image_token_index.
_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)

# Mistral's instruct format, reduced to what Flux2Pipeline sends: system and user turns whose content is a
# string or a list of {"type": "text"|"image"} parts (images become one [IMG] placeholder that the processor
# expands), and assistant turns for prompt upsampling with `generate`.
_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}[IMG]"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ render(message['content']) }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]{{ render(message['content']) }}[/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ render(message['content']) }}{{ eos_token }}"
    "{%- else -%}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Random init, retuned so that the prompt visibly steers the image (see `_text_encoder` and `_transformer`).
_EMBEDDING_STD = 1.0
_LINEAR_GAIN = 1.5
_QK_NORM_SCALE = 6.0

# Vision tower: patch 4 merged 2x2 gives one [IMG] token per 8x8 pixels; images are capped at 64 px so an
# upsampling prompt with images stays far below the pipeline's 2048-token limit.
_VISION_PATCH = 4
_SPATIAL_MERGE = 2
_IMAGE_LONGEST_EDGE = 64


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges: every UTF-8 byte has its own id, so any prompt round-trips and
    different prompts always give different ids (a small word vocabulary would map most prompts to <unk>)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    vocab.update({symbol: len(_SPECIAL_TOKENS) + i for i, symbol in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Special tokens must be matched whole inside the rendered chat template, never split into bytes.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in _SPECIAL_TOKENS]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        # Left: a decoder-only model must end on the prompt's last token, which prompt upsampling's `generate`
        # relies on after the pipeline pads every prompt to a fixed length.
        padding_side="left",
        model_max_length=131072,
        chat_template=_CHAT_TEMPLATE,
    )


def processor() -> PixtralProcessor:
    """The tiny model's processor: Mistral's control tokens and chat template over a byte-level vocabulary
    (scripts/gpu_check pairs it with the real model too: token ids are all a text encoder sees)."""
    image_processor = PixtralImageProcessor(
        size={"longest_edge": _IMAGE_LONGEST_EDGE},
        patch_size={"height": _VISION_PATCH * _SPATIAL_MERGE, "width": _VISION_PATCH * _SPATIAL_MERGE},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=_tokenizer(),
        patch_size=_VISION_PATCH,
        spatial_merge_size=_SPATIAL_MERGE,
        chat_template=_CHAT_TEMPLATE,
    )


def _text_encoder(vocab_size: int) -> Mistral3ForConditionalGeneration:
    text_config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=4096,
        bos_token_id=_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=_SPECIAL_TOKENS.index("</s>"),
        pad_token_id=_SPECIAL_TOKENS.index("<pad>"),
    )
    vision_config = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        patch_size=_VISION_PATCH,
        image_size=_IMAGE_LONGEST_EDGE,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=_SPECIAL_TOKENS.index("[IMG]"),
        spatial_merge_size=_SPATIAL_MERGE,
        tie_word_embeddings=False,  # as in Mistral Small 3.x
    )
    model = Mistral3ForConditionalGeneration(config)
    # With transformers' default std of 0.02 the token embeddings are drowned by what 30 layers add, and the
    # hidden states of two prompts hardly differ; larger embeddings keep each token's identity visible.
    torch.nn.init.normal_(cast(torch.Tensor, model.get_input_embeddings().weight), std=_EMBEDDING_STD)
    return model


def _transformer() -> Flux2Transformer2DModel:
    model: Flux2Transformer2DModel = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,  # the VAE's 1 latent channel, patchified 2x2 by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN * _TEXT_OUT_LAYERS,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
    )
    # PyTorch's default Linear init shrinks activations ~1.7x per layer: the timestep modulation gates come
    # out near 0.03, the blocks barely touch the residual stream and the prompt moves pixels by ~1e-5, which
    # bf16 rounds away. Variance-keeping weights make the gates O(1), and sharper attention (larger q/k
    # RMSNorm weights) stops image tokens from averaging all 512 text tokens into the same mean for every
    # prompt.
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=_LINEAR_GAIN / math.sqrt(module.in_features))
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 2)[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            torch.nn.init.constant_(parameter, _QK_NORM_SCALE)
    return model


def _vae() -> AutoencoderKLFlux2:
    # Four levels, like the real VAE: 8x downsampling keeps the image token count (and the mid-block attention
    # over every latent pixel) as small as FLUX.2's at fal's sizes; one level would be 64x more latent pixels.
    vae: AutoencoderKLFlux2 = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return vae


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return scheduler


def build_tiny_pipeline(folder: Path, seed: int = 0) -> None:
    """Write a complete tiny pipeline into `folder`; the same seed always gives the same weights."""
    tokenizer = processor()
    # fork_rng: building must not disturb the caller's global RNG stream (a test that seeded torch, say).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Typed as Any: Flux2Pipeline's hints name diffusers' dummy scheduler class and AutoProcessor.
        components: dict[str, Any] = {
            "text_encoder": _text_encoder(len(tokenizer.tokenizer)),
            "transformer": _transformer(),
            "vae": _vae(),
            "scheduler": _scheduler(),
            "tokenizer": tokenizer,
        }
    Flux2Pipeline(**components).save_pretrained(folder)


def _folder_name(seed: int) -> str:
    return (
        f"flux2-tiny-v{TINY_FORMAT_VERSION}-seed{seed}"
        f"-transformers{transformers.__version__}-diffusers{diffusers.__version__}"
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An flock that the kernel drops when its holder dies, so a crashed builder never blocks the next one."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_tiny_pipeline(cache_root: Path, seed: int = 0) -> Path:
    """The tiny pipeline's folder under `cache_root`, built on first use.

    The folder only ever appears complete: it is built in a temporary sibling and renamed into place (atomic
    on one filesystem), under a lock so that concurrent processes build it once and all get the same folder.
    """
    final = cache_root / _folder_name(seed)
    if final.is_dir():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_root / f".{final.name}.lock"):
        if final.is_dir():  # another process finished it while this one waited for the lock
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=cache_root))
        try:
            build_tiny_pipeline(staging, seed=seed)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared with other users
            os.rename(staging, final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            # flock is not honoured by every network filesystem: a builder that got past the lock may have won
            # the rename (ours then fails on the non-empty target), and its folder is as good as ours.
            if final.is_dir():
                return final
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final
