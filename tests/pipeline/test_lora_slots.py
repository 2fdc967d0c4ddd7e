"""LoraSlots on the real tiny Flux2Pipeline, against LoRA files made locally with peft and diffusers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraFitError, LoraSlots, ParsedLora
from pipeline.testing import linear_shapes, load_tiny, render
from pipeline.tiny import ensure_tiny_pipeline

# Tolerance for images in [0, 1] that must agree up to float32 rounding. The slots compute
# (B * alpha/r * scale) @ (A @ x) at rank 128 with zero padding; diffusers computes
# (B @ (A @ x)) * alpha/r * weight at the LoRA's own rank: the same sums rounded in another order. The random
# tiny model amplifies such rounding: merely swapping the order of two LoRAs moves pixels by up to 1.4e-5, and
# diffusers' reference differs by up to 3e-5, while the LoRAs themselves move pixels by over 0.4. 1e-4 sits
# above that noise, 39x below one 8-bit level (3.9e-3), and each test using it also checks that the LoRAs
# changed the image by 100x more.
REFERENCE_ATOL = 1e-4


@dataclass(frozen=True)
class Spec:
    rank: int
    alpha: int
    targets: tuple[str, ...]
    seed: int
    metadata: bool = True  # False: no header, so alpha = rank (the diffusers default)
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False


SPECS = {
    "a": Spec(
        rank=4,
        alpha=8,
        seed=1,
        targets=(
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_out.0",
            "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out",
            "proj_out",
        ),
        alpha_pattern=(("proj_out", 2.0),),
    ),
    "b": Spec(
        rank=8,
        alpha=8,
        seed=2,
        metadata=False,
        targets=(
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff.linear_in",
            "transformer_blocks.0.ff_context.linear_out",
            "double_stream_modulation_img.linear",
            "single_stream_modulation.linear",
            "x_embedder",
            "context_embedder",
            "time_guidance_embed.timestep_embedder.linear_2",
            "norm_out.linear",
        ),
    ),
    "c": Spec(
        rank=2,
        alpha=4,
        seed=3,
        use_rslora=True,
        targets=("single_transformer_blocks.0.attn.to_qkv_mlp_proj", "transformer_blocks.0.ff.linear_out"),
    ),
}


def make_lora_file(folder: Path, directory: Path, name: str, spec: Spec) -> Path:
    """Injects a peft LoRA into a fresh tiny transformer, randomises it, saves it the diffusers way."""
    model = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules="^(?:" + "|".join(re.escape(t) for t in spec.targets) + ")$",
        alpha_pattern=dict(spec.alpha_pattern),
        use_rslora=spec.use_rslora,
    )
    model.add_adapter(config, adapter_name=name)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for linear in (module.lora_A[name], module.lora_B[name]):
                    assert isinstance(linear, torch.nn.Linear)
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
    layers = get_peft_model_state_dict(model, adapter_name=name)
    assert len(layers) == 2 * len(spec.targets)
    Flux2Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers=layers,
        weight_name=f"{name}.safetensors",
        transformer_lora_adapter_metadata=config.to_dict() if spec.metadata else None,
    )
    return directory / f"{name}.safetensors"


@pytest.fixture(scope="module")
def folder(cache_dir: Path) -> Path:
    return ensure_tiny_pipeline(cache_dir / "tiny")


@pytest.fixture(scope="module")
def files(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("loras")
    return {name: make_lora_file(folder, directory, name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def parsed(files: dict[str, Path]) -> dict[str, ParsedLora]:
    return {name: read_lora_file(path) for name, path in files.items()}


@dataclass
class Slotted:
    pipe: Flux2Pipeline
    slots: LoraSlots
    base: np.ndarray  # rendered before the slots were added
    base_param_count: int


@pytest.fixture(scope="module")
def slotted(cache_dir: Path) -> Slotted:
    pipe = load_tiny(cache_dir)
    base = render(pipe)
    count = sum(p.numel() for p in pipe.transformer.parameters())
    return Slotted(pipe, LoraSlots(pipe.transformer, num_slots=3, max_rank=128), base, count)


@pytest.fixture
def slots(slotted: Slotted) -> Iterator[LoraSlots]:
    slotted.slots.apply([])
    yield slotted.slots
    slotted.slots.apply([])


def slot_params(slots: LoraSlots) -> list[torch.Tensor]:
    return [p for slot in slots._params for pair in slot.values() for p in pair]


def test_empty_slots_change_no_bit(slotted: Slotted, slots: LoraSlots) -> None:
    assert slots.target_modules and all(not p.any() for p in slot_params(slots))
    assert set(slots.scalings()) == {1.0}
    assert np.array_equal(render(slotted.pipe), slotted.base)


def test_slots_cover_every_linear(slotted: Slotted) -> None:
    wrapped = {name for name, m in slotted.pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert set(slotted.slots.target_modules) == wrapped
    for expected in (
        "x_embedder",
        "context_embedder",
        "proj_out",
        "norm_out.linear",
        "transformer_blocks.0.attn.to_out.0",
    ):
        assert expected in wrapped
    assert list(slotted.pipe.transformer.peft_config) == ["slot0", "slot1", "slot2"]


def test_scale_zero_is_the_base_image(
    slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora]
) -> None:
    slots.apply([(parsed["a"], 1.0)])
    assert not np.array_equal(render(slotted.pipe), slotted.base)  # the LoRA does change the image
    slots.apply([(parsed["a"], 0.0), (parsed["b"], 0.0), (parsed["c"], 0.0)])
    assert np.array_equal(render(slotted.pipe), slotted.base)


def test_order_of_the_list_does_not_matter(
    slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora]
) -> None:
    slots.apply([(parsed["a"], 0.7), (parsed["b"], 1.3)])
    forward = render(slotted.pipe)
    slots.apply([(parsed["b"], 1.3), (parsed["a"], 0.7)])
    backward = render(slotted.pipe)
    np.testing.assert_allclose(forward, backward, rtol=0, atol=REFERENCE_ATOL)
    assert np.abs(forward - slotted.base).max() > 100 * REFERENCE_ATOL


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # diffusers' own loader
@pytest.mark.parametrize(("names", "scales"), [(("a", "b"), (0.7, 1.3)), (("c", "a", "b"), (1.0, -0.5, 0.4))])
def test_matches_diffusers_load_lora_weights(
    cache_dir: Path,
    slotted: Slotted,
    slots: LoraSlots,
    files: dict[str, Path],
    parsed: dict[str, ParsedLora],
    names: tuple[str, ...],
    scales: tuple[float, ...],
) -> None:
    reference = load_tiny(cache_dir)
    for name in names:
        reference.load_lora_weights(str(files[name]), adapter_name=name)
    reference.set_adapters(list(names), list(scales))
    expected = render(reference)
    slots.apply([(parsed[name], scale) for name, scale in zip(names, scales, strict=True)])
    actual = render(slotted.pipe)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=REFERENCE_ATOL)
    assert np.abs(actual - slotted.base).max() > 100 * REFERENCE_ATOL


def test_switching_back_gives_the_same_image_exactly(
    slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora]
) -> None:
    slots.apply([(parsed["a"], 1.0), (parsed["c"], 0.5)])
    first = render(slotted.pipe)
    slots.apply([(parsed["b"], 1.0)])
    other = render(slotted.pipe)
    slots.apply([(parsed["a"], 1.0), (parsed["c"], 0.5)])
    assert np.array_equal(render(slotted.pipe), first)
    assert not np.array_equal(other, first)
    assert slots.loaded == [("a.safetensors", 1.0), ("c.safetensors", 0.5), None]


def test_load_creates_no_parameters(
    slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora]
) -> None:
    before = [id(p) for p in slot_params(slots)]
    all_ids = [id(p) for p in slotted.pipe.transformer.parameters()]
    slots.apply([(parsed["a"], 1.0), (parsed["b"], 0.3), (parsed["c"], 2.0)])
    slots.load(1, parsed["a"].state_dict, 0.5, "a again")
    slots.clear(2)
    assert [id(p) for p in slot_params(slots)] == before
    assert [id(p) for p in slotted.pipe.transformer.parameters()] == all_ids
    lora_count = sum(p.numel() for p in slot_params(slots))
    assert (
        sum(p.numel() for p in slotted.pipe.transformer.parameters()) == slotted.base_param_count + lora_count
    )
    assert set(slots.scalings()) == {1.0}


def test_alpha_and_scale_are_folded_into_lora_B(slots: LoraSlots, parsed: dict[str, ParsedLora]) -> None:
    a = parsed["a"].state_dict
    slots.load(0, a, 1.5, "a")
    module = "transformer_blocks.0.attn.to_q"
    lora_A, lora_B = slots._params[0][module]
    assert torch.equal(lora_A[:4], a[f"transformer.{module}.lora_A.weight"]) and not lora_A[4:].any()
    assert torch.equal(lora_B[:, :4], a[f"transformer.{module}.lora_B.weight"] * (8.0 / 4 * 1.5))
    assert not lora_B[:, 4:].any()
    _, proj_B = slots._params[0]["proj_out"]  # alpha_pattern from the file's header: alpha 2 here
    assert torch.equal(proj_B[:, :4], a["transformer.proj_out.lora_B.weight"] * (2.0 / 4 * 1.5))

    # The same weights without the prefix and with alpha as a keyword or as per-module entries.
    bare = {k.removeprefix("transformer."): v for k, v in a.items() if not k.endswith(".alpha")}
    slots.load(1, bare, 1.5, "bare", alpha=8.0)
    assert torch.equal(slots._params[1][module][1], lora_B)
    slots.load(1, {**bare, f"{module}.alpha": torch.tensor(2.0)}, 1.0, "per-module")
    assert torch.equal(slots._params[1][module][1][:, :4], bare[f"{module}.lora_B.weight"] * 0.5)
    slots.load(1, bare, 1.0, "no alpha")  # alpha = rank: factor 1
    assert torch.equal(slots._params[1][module][1][:, :4], bare[f"{module}.lora_B.weight"])


def lora_for(modules: dict[str, tuple[int, int]], rank: int) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA with shapes given per module: (in_features, out_features)."""
    state: dict[str, torch.Tensor] = {}
    for module, (in_features, out_features) in modules.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank)
    return state


REFUSED = {
    "rank above max_rank": (lora_for({"proj_out": (32, 4)}, rank=129), "rank 129"),
    "FLUX.2 of another size": (
        lora_for({"transformer_blocks.0.attn.to_q": (3072, 3072)}, 16),
        "3072 -> 3072",
    ),
    "wrong-shaped tensor": (
        {**lora_for({"proj_out": (32, 4)}, 4), "transformer.x_embedder.lora_A.weight": torch.randn(4, 5)},
        "x_embedder",
    ),
    "FLUX.1 module names": (lora_for({"single_transformer_blocks.0.attn.to_q": (32, 32)}, 4), "matches no"),
    "one unknown module": (
        lora_for({"proj_out": (32, 4), "transformer_blocks.0.attn.norm_q": (16, 16)}, 4),
        "targets modules not",
    ),
    "SDXL keys": (
        {
            k.replace("transformer.", "unet."): v
            for k, v in lora_for({"down_blocks.0.proj": (8, 8)}, 4).items()
        },
        "matches no",
    ),
    "nothing at all": ({}, "contains no"),
    "DoRA magnitude": (
        {**lora_for({"proj_out": (32, 4)}, 4), "transformer.proj_out.lora_magnitude_vector": torch.ones(4)},
        "unsupported key",
    ),
    "NaN weights": (
        lora_for({"proj_out": (32, 4)}, 4)
        | {"transformer.proj_out.lora_B.weight": torch.full((4, 4), torch.nan)},
        "NaN",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_lora_leaves_the_slots_unchanged(
    slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora], case: str
) -> None:
    state_dict, message = REFUSED[case]
    slots.apply([(parsed["a"], 1.0), (parsed["b"], 0.5)])
    snapshot = [p.detach().clone() for p in slot_params(slots)]
    loaded = list(slots.loaded)
    bad = ParsedLora(name=f"bad {case}", state_dict=state_dict)
    with pytest.raises(LoraFitError, match=re.escape(message)) as raised:
        slots.load(0, state_dict, 1.0, bad.name)
    assert bad.name in str(raised.value)
    with pytest.raises(LoraFitError):
        slots.apply([(parsed["c"], 1.0), (bad, 1.0)])  # the good one first: still nothing written
    assert all(torch.equal(p, q) for p, q in zip(slot_params(slots), snapshot, strict=True))
    assert slots.loaded == loaded


def test_refusal_keeps_the_image(slotted: Slotted, slots: LoraSlots, parsed: dict[str, ParsedLora]) -> None:
    slots.apply([(parsed["a"], 1.0)])
    expected = render(slotted.pipe)
    with pytest.raises(LoraFitError):
        slots.apply([(parsed["b"], 1.0), (ParsedLora("bad", REFUSED["wrong-shaped tensor"][0]), 1.0)])
    assert np.array_equal(render(slotted.pipe), expected)


def test_a_write_that_fails_part_way_empties_the_slot(
    slots: LoraSlots, parsed: dict[str, ParsedLora], monkeypatch: pytest.MonkeyPatch
) -> None:
    slots.apply([(parsed["a"], 1.0), (parsed["b"], 0.5)])
    real_copy, copies = torch.Tensor.copy_, []

    def copy_then_fail(self: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        copies.append(1)
        if len(copies) == 3:  # after the first module of the new LoRA went in
            raise torch.OutOfMemoryError("simulated")
        return real_copy(self, source, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_fail)
    with pytest.raises(torch.OutOfMemoryError):
        slots.apply([(parsed["c"], 1.0)])
    monkeypatch.undo()
    assert slots.loaded[0] is None  # not still reported as "a", nor holding a piece of "c"
    assert all(not p.any() for pair in slots._params[0].values() for p in pair)
    assert slots._ranks[0] == {}  # and the next write knows that it has nothing to zero
    assert slots.loaded[1] == (parsed["b"].name, 0.5)  # the write never reached slot 1


def test_slots_take_the_dtype_they_are_given(cache_dir: Path) -> None:
    """The worker passes the compute dtype: peft would make float32 adapters on 4-bit layers."""
    pipe = load_tiny(cache_dir)  # float32
    slots = LoraSlots(pipe.transformer, num_slots=2, max_rank=4, dtype=torch.bfloat16)
    assert {p.dtype for p in slot_params(slots)} == {torch.bfloat16}
    assert {p.dtype for name, p in pipe.transformer.named_parameters() if ".lora_" not in name} == {
        torch.float32
    }
    assert np.isfinite(render(pipe)).all()  # bf16 slots on float32 layers run


def test_too_many_loras_refused(slots: LoraSlots, parsed: dict[str, ParsedLora]) -> None:
    with pytest.raises(LoraFitError, match="at most 3"):
        slots.apply([(parsed[name], 1.0) for name in ("a", "b", "c", "a")])


def test_read_lora_file_resolves_the_header_alphas(parsed: dict[str, ParsedLora]) -> None:
    a, b, c = parsed["a"].state_dict, parsed["b"].state_dict, parsed["c"].state_dict
    assert float(a["transformer.transformer_blocks.0.attn.to_q.alpha"]) == 8.0
    assert float(a["transformer.proj_out.alpha"]) == 2.0  # alpha_pattern
    assert not any(k.endswith(".alpha") for k in b)  # no header: alpha = rank at load time
    assert float(c["transformer.transformer_blocks.0.ff.linear_out.alpha"]) == pytest.approx(4.0 * 2**0.5)


def test_read_lora_file_refuses_a_non_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFitError, match=r"x\.safetensors"):
        read_lora_file(path)
    with pytest.raises(FileNotFoundError):
        read_lora_file(tmp_path / "missing.safetensors")


def active_adapters(pipe: Flux2Pipeline) -> set[str]:
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, LoraLayer))
    return set() if layer.disable_adapters else set(layer.active_adapters)


def test_skipping_empty_slots_changes_no_bit(
    slotted: Slotted, slots: LoraSlots, cache_dir: Path, parsed: dict[str, ParsedLora]
) -> None:
    """Eager mode runs only the filled slots; a compiled one keeps all three active: same images."""
    all_active = load_tiny(cache_dir)
    always = LoraSlots(all_active.transformer, num_slots=3, max_rank=128, skip_empty=False)
    assert active_adapters(slotted.pipe) == set() and active_adapters(all_active) == {
        "slot0",
        "slot1",
        "slot2",
    }
    for chosen in ([("a", 0.8)], [("b", 1.0), ("c", 0.5)], []):
        loras = [(parsed[name], scale) for name, scale in chosen]
        slots.apply(loras)
        always.apply(loras)
        assert active_adapters(slotted.pipe) == {f"slot{i}" for i in range(len(chosen))}
        assert np.array_equal(render(slotted.pipe), render(all_active)), chosen


@pytest.fixture
def bare_slots(folder: Path) -> LoraSlots:
    """Two slots on a transformer of their own (no pipeline, nothing rendered): cheap to make and to spoil."""
    return LoraSlots(
        Flux2Transformer2DModel.from_pretrained(folder / "transformer"), num_slots=2, max_rank=128
    )


def expected_slot(
    slots: LoraSlots, lora: dict[str, torch.Tensor] | None, scale: float = 1.0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What a slot must hold, built independently: zeros, then A and B * scale (alpha = rank) in the LoRA's
    leading rows and columns."""
    expected = {}
    for module, (slot_A, slot_B) in slots._params[0].items():
        want_A, want_B = torch.zeros_like(slot_A), torch.zeros_like(slot_B)
        lora_A = (lora or {}).get(f"transformer.{module}.lora_A.weight")
        if lora is not None and lora_A is not None:
            rank = lora_A.shape[0]
            want_A[:rank] = lora_A
            want_B[:, :rank] = lora[f"transformer.{module}.lora_B.weight"] * scale
        expected[module] = (want_A, want_B)
    return expected


def test_switches_between_ranks_and_module_sets_leave_exactly_the_new_loras(bare_slots: LoraSlots) -> None:
    """Only the rows the old content used beyond the new are zeroed: still every bit as a fresh slot's."""
    shapes = linear_shapes(bare_slots._transformer)
    modules = list(shapes)
    wide = lora_for(shapes, rank=64)
    narrow = lora_for({m: shapes[m] for m in modules[::2]}, rank=16)
    other = lora_for({m: shapes[m] for m in modules[1::3]}, rank=32)
    steps: list[list[tuple[dict[str, torch.Tensor], float]]] = [
        [(wide, 0.7), (narrow, 1.0)],
        [(narrow, -1.3)],  # slot 0: rank 64 -> 16 on half the modules; slot 1 emptied
        [(other, 2.0), (wide, 0.5)],  # slot 0: other modules, rank 32; slot 1: empty -> rank 64
        [(other, 2.0), (wide, 0.5)],  # the same again: nothing to zero
        [],
    ]
    for step, loras in enumerate(steps):
        bare_slots.apply([(ParsedLora(f"lora {i}", lora), scale) for i, (lora, scale) in enumerate(loras)])
        for slot in range(bare_slots.num_slots):
            lora, scale = loras[slot] if slot < len(loras) else (None, 1.0)
            for module, want in expected_slot(bare_slots, lora, scale).items():
                for got, expected in zip(bare_slots._params[slot][module], want, strict=True):
                    assert torch.equal(got, expected), (step, slot, module)


def test_a_switch_leaves_rows_no_lora_used_untouched(bare_slots: LoraSlots) -> None:
    """Rows beyond what the old and the new LoRA use are never written: poisoned, they stay poisoned."""
    sentinel = 7.0
    shapes = linear_shapes(bare_slots._transformer)
    wide = lora_for(shapes, rank=64)
    narrow = lora_for({m: shapes[m] for m in list(shapes)[::2]}, rank=16)
    bare_slots.load(0, wide, 1.0, "wide")
    with torch.no_grad():
        for slot_A, slot_B in bare_slots._params[0].values():
            slot_A[64:] = sentinel
            slot_B[:, 64:] = sentinel
    for lora in (narrow, None):  # rank 64 -> 16 on half the modules, then emptied
        if lora is None:
            bare_slots.clear(0)
        else:
            bare_slots.load(0, lora, 1.0, "narrow")
        for module, (want_A, want_B) in expected_slot(bare_slots, lora).items():
            slot_A, slot_B = bare_slots._params[0][module]
            assert torch.equal(slot_A[:64], want_A[:64]) and torch.equal(slot_B[:, :64], want_B[:, :64])
            assert (slot_A[64:] == sentinel).all() and (slot_B[:, 64:] == sentinel).all(), module
