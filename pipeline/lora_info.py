"""`flux2-server lora-info`: what a LoRA file is, read by the very code the worker reads it with, so the
report and the server never disagree about a file."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors

from pipeline.lora_formats import read_lora_file
from pipeline.lora_slots import LoraFitError
from pipeline.lycoris import LycorisPolicy

_PREFIX = "transformer."
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass
class LoraReport:
    file: str
    size: int
    dtypes: list[str]  # of the tensors as stored
    layout: str = ""
    ranks: list[int] = field(default_factory=list)  # distinct ranks, ascending
    alphas: list[float] = field(default_factory=list)  # distinct alphas (empty: alpha = rank)
    modules: int = 0  # FLUX.2 Linear layers it adapts
    touches: list[str] = field(default_factory=list)  # those layers, summarised
    max_rank: int = 0
    fits: bool = False
    refused: str | None = None  # why the server would refuse it
    notes: list[str] = field(default_factory=list)


def describe_lora(path: Path, max_rank: int, lycoris_truncate: bool = False) -> LoraReport:
    report = LoraReport(str(path), path.stat().st_size, _stored_dtypes(path), max_rank=max_rank)
    try:
        parsed = read_lora_file(path, path.name, LycorisPolicy(max_rank, lycoris_truncate))
    except (LoraFitError, FileNotFoundError) as exc:
        report.refused = str(exc)
        return report
    state = parsed.state_dict
    modules = sorted(
        k.removesuffix(".lora_A.weight").removeprefix(_PREFIX) for k in state if k.endswith(".lora_A.weight")
    )
    ranks = {state[f"{_PREFIX}{m}.lora_A.weight"].shape[0] for m in modules}
    alphas = {float(state[f"{_PREFIX}{m}.alpha"]) for m in modules if f"{_PREFIX}{m}.alpha" in state}
    report.layout = parsed.layout
    report.ranks, report.alphas = sorted(ranks), sorted(alphas)
    report.modules, report.touches = len(modules), _summarise(modules)
    report.fits = max(ranks) <= max_rank
    report.notes = list(parsed.notes)
    if not report.fits:
        report.refused = f"rank {max(ranks)} is over this server's slot rank {max_rank} (FLUX2_MAX_LORA_RANK)"
    return report


def format_report(report: LoraReport) -> str:
    lines = [f"file:     {report.file} ({report.size / 2**20:.1f} MiB, {', '.join(report.dtypes)})"]
    if report.layout:
        ranks = (
            "-".join(str(r) for r in (report.ranks[0], report.ranks[-1]))
            if len(report.ranks) > 1
            else str(report.ranks[0])
        )
        alphas = ", ".join(f"{a:g}" for a in report.alphas) or "none (alpha = rank)"
        lines += [
            f"layout:   {report.layout}",
            f"rank:     {ranks}",
            f"alpha:    {alphas}",
            f"modules:  {report.modules} Linear layers of the FLUX.2 transformer",
            *(f"          {line}" for line in report.touches),
        ]
    verdict = "fits" if report.refused is None else "refused"
    lines.append(f"slots:    {verdict} (slot rank {report.max_rank}, FLUX2_MAX_LORA_RANK)")
    if report.refused:
        lines.append(f"reason:   {report.refused}")
    lines += [f"note:     {note}" for note in report.notes]
    return "\n".join(lines)


def _stored_dtypes(path: Path) -> list[str]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            counts = Counter(str(handle.get_slice(key).get_dtype()) for key in keys)
    except (safetensors.SafetensorError, OSError, ValueError):
        return ["unreadable"]
    return [dtype for dtype, _ in counts.most_common()]


def _summarise(modules: list[str]) -> list[str]:
    """`transformer_blocks 0-7: attn.to_q, ...` lines, and the layers outside the blocks."""
    blocks: dict[str, dict[str, set[int]]] = {}
    outside: list[str] = []
    for module in modules:
        match = _BLOCK.match(module)
        if match is None:
            outside.append(module)
            continue
        kind, index, layer = match.groups()
        blocks.setdefault(kind, {}).setdefault(layer, set()).add(int(index))
    lines = []
    for kind, layers in blocks.items():
        indices = sorted(set().union(*layers.values()))
        span = f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
        lines.append(f"{kind} {span} ({len(indices)} blocks): {', '.join(sorted(layers))}")
    if outside:
        lines.append(f"outside the blocks: {', '.join(outside)}")
    return lines
