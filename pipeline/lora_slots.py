"""Fixed LoRA adapter slots on a loaded FLUX.2 transformer, refilled in place for every LoRA set.

Loading LoRAs the diffusers way (`load_lora_weights` + `set_adapters`) adds and removes peft modules and
changes each layer's `scaling`: fine for a notebook, but a server would grow memory with every new LoRA and,
under `torch.compile`, recompile on every switch. Here the transformer gets `num_slots` placeholder adapters
once, at rank `max_rank`, on every `nn.Linear` it has (the union of what any FLUX.2 LoRA may target). All
slots are always active with scaling 1.0; an empty slot has lora_A = lora_B = 0 and adds exactly nothing.
Loading a LoRA copies its A into the first r rows of the slot's A and `B * alpha / r * scale` into the first
r columns of the slot's B: the zero padding contributes exact zeros, and folding the strengths into B keeps
the module structure, the parameter objects and every scaling value fixed, so a compiled graph stays valid.
Each slot remembers how many leading rows it holds per module, so a switch writes the new LoRA's rows and
zeroes only the old rows those do not overwrite, never the whole slot: a switch among rank-16 LoRAs in
rank-128 slots touches their 16 rows on their own modules, not 128 rows on every Linear.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

_PREFIX = "transformer."
_KINDS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".alpha": "alpha"}
_SHOWN = 5  # names listed in an error before "... and N more"


class LoraFitError(ValueError):
    """A LoRA that cannot be applied to this transformer; nothing was changed.

    `index` is the LoRA's position in the list given to `LoraSlots.apply`, when it came from there.
    """

    index: int | None = None


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA in diffusers/peft form: `[transformer.]<module>.lora_A/B.weight` and optional `<module>.alpha`.

    `alpha` applies to modules without their own `.alpha` entry; None means alpha = rank (factor 1), the
    diffusers/peft convention for files without alpha information. `finite` records that every weight was
    already checked for NaN and infinity (done once when the file is read: on the real model that scan
    costs several times the slot copy, and a cached LoRA is applied again and again).
    """

    name: str
    state_dict: Mapping[str, torch.Tensor]
    alpha: float | None = None
    finite: bool = False
    notes: tuple[str, ...] = ()  # what reading it changed that the user should know (truncations, drops)
    layout: str = ""  # the file's key layout(s), as read


@dataclass(frozen=True)
class _Write:
    """One module's validated contribution, ready to be copied into a slot."""

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    factor: float  # alpha / rank * user scale, folded into B


class LoraSlots:
    """Rank-`max_rank` adapter slots on every Linear of a transformer, refilled in place.

    `skip_empty` (eager execution): only the filled slots run, since an empty one would cost a rank-R
    matmul pair per layer to add exact zeros; the image is the same bit for bit. A compiled transformer
    keeps every slot active instead (`skip_empty=False`), so its graph never changes and never recompiles.
    `dtype`: the slots' dtype (the model's compute dtype); None keeps what peft chose.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        num_slots: int = 3,
        max_rank: int = 128,
        *,
        skip_empty: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be at least 1")
        if getattr(transformer, "peft_config", None):
            raise ValueError("the transformer already has peft adapters; LoraSlots must own all of them")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.skip_empty = skip_empty
        self._transformer = transformer
        self.slot_names = tuple(f"slot{i}" for i in range(num_slots))
        targets = [
            name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)
        ]
        if not targets:
            raise ValueError("the transformer has no nn.Linear modules to attach LoRA slots to")
        # A full-match regex, not a list: peft matches list entries as name suffixes, and a top-level name
        # such as `proj_out` would then also hit any nested module that ends the same way.
        pattern = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
        with warnings.catch_warnings():
            # peft warns for each adapter after the first that a `peft_config` exists: intended here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
            for slot in self.slot_names:
                config = LoraConfig(r=max_rank, lora_alpha=max_rank, target_modules=pattern, lora_dropout=0.0)
                transformer.add_adapter(config, adapter_name=slot)  # type: ignore[operator]
        # diffusers' set_adapters: all slots active, scaling = weight * alpha / r = 1.0 everywhere.
        transformer.set_adapters(list(self.slot_names), [1.0] * num_slots)  # type: ignore[operator]

        self._features: dict[str, tuple[int, int]] = {}
        self._params: list[dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]] = [
            {} for _ in self.slot_names
        ]
        self._layers: list[LoraLayer] = []
        for name, module in transformer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if dtype is not None:
                # peft makes adapters on quantized layers (4-bit weights) in float32: twice the memory,
                # and float32 matmuls in every layer. Converted in place: the Parameter objects stay.
                for slot in self.slot_names:
                    module.lora_A[slot].to(dtype)
                    module.lora_B[slot].to(dtype)
            self._layers.append(module)
            base = module.get_base_layer()
            assert isinstance(base, torch.nn.Linear)
            self._features[name] = (base.in_features, base.out_features)
            for index, slot in enumerate(self.slot_names):
                lora_A, lora_B = module.lora_A[slot], module.lora_B[slot]
                assert isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)
                assert isinstance(lora_A.weight, torch.nn.Parameter)
                assert isinstance(lora_B.weight, torch.nn.Parameter)
                self._params[index][name] = (lora_A.weight, lora_B.weight)
        missing = sorted(set(targets) - set(self._features))
        if missing:
            raise ValueError(f"peft did not wrap these Linear modules: {', '.join(missing[:_SHOWN])}")
        self.loaded: list[tuple[str, float] | None] = [None] * num_slots
        """What each slot holds: (LoRA name, scale), or None when empty."""
        self._ranks: list[dict[str, int]] = [{} for _ in self.slot_names]
        """Per slot, {module: r} where its leading r rows of A and columns of B may be non-zero (the rank
        last written there); every other row and column is zero."""
        for index in range(num_slots):
            self._zero(index)  # peft initialises A randomly; an empty slot is all zeros
        self._activate()

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self._features)

    @property
    def device(self) -> torch.device:
        """Where the slots live: a LoRA's weights copy into them fastest from there."""
        return next(iter(self._params[0].values()))[0].device

    @property
    def dtype(self) -> torch.dtype | None:
        """The slots' dtype; None when peft chose different ones for different layers."""
        dtypes = {param.dtype for slot in self._params for pair in slot.values() for param in pair}
        return dtypes.pop() if len(dtypes) == 1 else None

    def scalings(self) -> list[float]:
        """Every slot's scaling on every layer: always 1.0 (strengths live in lora_B)."""
        return [float(layer.scaling[slot]) for layer in self._layers for slot in self.slot_names]

    def load(
        self,
        slot: int,
        state_dict: Mapping[str, torch.Tensor],
        scale: float,
        name: str,
        *,
        alpha: float | None = None,
    ) -> None:
        """Replaces a slot's content with one LoRA at `scale`; validated first: a refusal changes nothing."""
        self._check_slot(slot)
        writes = self._plan(state_dict, scale, name, alpha)
        self._write(slot, writes)
        self.loaded[slot] = (name, scale)
        self._activate()

    def clear(self, slot: int) -> None:
        """Empties a slot: all-zero A and B add exactly 0 to every layer."""
        self._empty(slot)
        self._activate()

    def _empty(self, slot: int) -> None:
        self._check_slot(slot)
        self._write(slot, ())
        self.loaded[slot] = None

    def _zero(self, slot: int) -> None:
        """Zeroes all of a slot, whatever it holds: peft's random A, or part of a LoRA after a failure."""
        with torch.no_grad():
            for lora_A, lora_B in self._params[slot].values():
                lora_A.zero_()
                lora_B.zero_()
        self._ranks[slot] = {}
        self.loaded[slot] = None

    def apply(self, loras: Sequence[tuple[ParsedLora, float]]) -> None:
        """Loads `loras` into slots 0, 1, .. and clears the rest; all are validated before any is written."""
        if len(loras) > self.num_slots:
            names = ", ".join(repr(parsed.name) for parsed, _ in loras)
            raise LoraFitError(
                f"{len(loras)} LoRAs requested ({names}); at most {self.num_slots} are supported"
            )
        plans = []
        for index, (parsed, scale) in enumerate(loras):
            try:
                plans.append(self._plan(parsed.state_dict, scale, parsed.name, parsed.alpha, parsed.finite))
            except LoraFitError as error:
                error.index = index
                raise
        for slot, (writes, (parsed, scale)) in enumerate(zip(plans, loras, strict=True)):
            self._write(slot, writes)
            self.loaded[slot] = (parsed.name, scale)
        for slot in range(len(loras), self.num_slots):
            if self.loaded[slot] is not None:
                self._empty(slot)
        self._activate()

    def _activate(self) -> None:
        """With `skip_empty`, make exactly the filled slots the active adapters (scaling stays 1.0)."""
        if not self.skip_empty:
            return
        filled = [
            name for name, content in zip(self.slot_names, self.loaded, strict=True) if content is not None
        ]
        if not filled:
            self._transformer.disable_lora()  # type: ignore[operator]
            return
        self._transformer.enable_lora()  # type: ignore[operator]
        self._transformer.set_adapters(filled, [1.0] * len(filled))  # type: ignore[operator]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.num_slots - 1}")

    def _plan(
        self,
        state_dict: Mapping[str, torch.Tensor],
        scale: float,
        name: str,
        alpha: float | None,
        finite: bool = False,
    ) -> list[_Write]:
        """Validates a whole LoRA against this transformer without touching any slot."""
        if not math.isfinite(scale):
            raise LoraFitError(f"LoRA {name!r}: scale {scale} is not a finite number")
        if alpha is not None and not math.isfinite(alpha):
            raise LoraFitError(f"LoRA {name!r}: alpha {alpha} is not a finite number")
        grouped = _group(name, state_dict)
        if not grouped:
            raise LoraFitError(f"LoRA {name!r} contains no LoRA weights")
        unknown = sorted(m for m in grouped if m not in self._features)
        if unknown:
            what = "matches no module" if len(unknown) == len(grouped) else "targets modules not"
            raise LoraFitError(
                f"LoRA {name!r} {what} in this FLUX.2 transformer (a LoRA for another model?): "
                + _listing(unknown)
            )
        writes: list[_Write] = []
        for module, parts in grouped.items():
            lora_A, lora_B = parts.get("A"), parts.get("B")
            if lora_A is None or lora_B is None:
                raise LoraFitError(f"LoRA {name!r}: {module} lacks its lora_A or lora_B weight")
            in_features, out_features = self._features[module]
            rank = lora_A.shape[0] if lora_A.ndim == 2 else -1
            if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != rank:
                raise LoraFitError(
                    f"LoRA {name!r}: {module} has lora_A {tuple(lora_A.shape)} and lora_B"
                    f" {tuple(lora_B.shape)}, not a (r, in) and (out, r) pair"
                )
            if rank > self.max_rank:
                raise LoraFitError(
                    f"LoRA {name!r}: rank {rank} at {module} exceeds the maximum {self.max_rank}"
                )
            if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
                raise LoraFitError(
                    f"LoRA {name!r}: {module} maps {lora_A.shape[1]} -> {lora_B.shape[0]} features but this"
                    f" transformer's layer maps {in_features} -> {out_features} (a LoRA for another model?)"
                )
            if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
                raise LoraFitError(f"LoRA {name!r}: {module} weights are not floating point")
            if not finite and not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
                raise LoraFitError(f"LoRA {name!r}: {module} contains NaN or infinite weights")
            module_alpha = _module_alpha(name, module, parts.get("alpha"), alpha, rank)
            writes.append(_Write(module, lora_A, lora_B, module_alpha / rank * scale))
        return writes

    def _write(self, slot: int, writes: Sequence[_Write]) -> None:
        """Copies each module's A and scaled B into the leading rank rows/columns and zeroes the rows the
        slot's previous content used beyond them: the slot then holds exactly these writes.

        Copies from pinned memory are queued without waiting (the next kernel on the stream waits for
        them). A failure part way (out of memory, say) empties the slot: half of a LoRA is never left in it.
        """
        params = self._params[slot]
        ranks = {write.module: write.lora_A.shape[0] for write in writes}
        try:
            with torch.no_grad():
                for module, old_rank in self._ranks[slot].items():
                    rank = ranks.get(module, 0)
                    if old_rank > rank:
                        slot_A, slot_B = params[module]
                        slot_A[rank:old_rank].zero_()
                        slot_B[:, rank:old_rank].zero_()
                for write in writes:
                    slot_A, slot_B = params[write.module]
                    rank = write.lora_A.shape[0]
                    slot_A[:rank].copy_(write.lora_A, non_blocking=True)
                    # Scale in float32 on the slot's device, then let copy_ round once to the slot dtype.
                    source_B = write.lora_B.to(device=slot_B.device, non_blocking=True)
                    slot_B[:, :rank].copy_(source_B.to(torch.float32) * write.factor)
        except BaseException:
            self._zero(slot)
            raise
        self._ranks[slot] = ranks


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _group(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{module: {"A"|"B"|"alpha": tensor}}`, the `transformer.` prefix removed; other keys are refused."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix(_PREFIX)
        for suffix, kind in _KINDS.items():
            if bare.endswith(suffix):
                parts = grouped.setdefault(bare.removesuffix(suffix), {})
                if kind in parts:
                    raise LoraFitError(f"LoRA {name!r}: {key} appears twice (with and without {_PREFIX!r})")
                parts[kind] = tensor
                break
        else:
            raise LoraFitError(
                f"LoRA {name!r}: unsupported key {key!r} (plain LoRA lora_A/lora_B weights and alpha only;"
                " DoRA, LoKr and LoRA biases are not supported)"
            )
    return grouped


def _module_alpha(
    name: str, module: str, tensor: torch.Tensor | None, default: float | None, rank: int
) -> float:
    if tensor is None:
        return float(rank) if default is None else default
    if tensor.numel() != 1:
        raise LoraFitError(f"LoRA {name!r}: {module}.alpha has {tensor.numel()} values, expected one")
    value = float(tensor.item())
    if not math.isfinite(value):
        raise LoraFitError(f"LoRA {name!r}: {module}.alpha is {value}")
    return value
