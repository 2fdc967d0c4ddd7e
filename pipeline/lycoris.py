"""LyCORIS LoKr and LoHa adapters as plain LoRA factors, so they load into the same fixed slots.

Both deltas are exactly low-rank products:

- LoKr, `kron(w1, w2) * alpha / r`: write each side as a product `w = P @ Q` (its own factors when it has
  them, else itself and an identity on its smaller side); then `kron(P1, P2) @ kron(Q1, Q2)` is the same
  matrix, a LoRA of rank `k1 * k2`. With `w1` full and `w2 = w2a @ w2b` that is `cols(w1) * r`.
- LoHa, `(w1a @ w1b) ⊙ (w2a @ w2b) * alpha / r`: the row-wise Kronecker product of `w1a` and `w2a` times the
  column-wise one of `w1b` and `w2b`, a LoRA of rank `r1 * r2`.

The scale follows diffusers' LoKr loading (`alpha / rows(w2b)`, else `alpha / rows(w1b)`, else 1) and
LyCORIS' LoHa (`alpha / rows(w1b)`). When the exact rank is over the slots' rank, the delta is either
refused with the rank it needs, or, when allowed, truncated to its best approximation of the slot rank
(the top singular triplets, found from the small factors without forming the full matrix) with the
relative error of the delta reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.lora_slots import LoraFitError

LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_TUCKER = re.compile(r"\.(?:lokr_t\d|hada_t\d)$")
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|alpha)$")


@dataclass(frozen=True)
class LycorisPolicy:
    max_rank: int  # the slots' rank
    truncate: bool = False  # approximate deltas over `max_rank` by SVD instead of refusing them


def is_lycoris_key(key: str) -> bool:
    return ".lokr_" in key or ".hada_" in key


def lycoris_as_lora(
    label: str, weights: Mapping[str, torch.Tensor], policy: LycorisPolicy
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every LoKr/LoHa module of `weights` as `<module>.lora_A.weight` / `.lora_B.weight` with the scale
    folded into B (and `.alpha` = rank, so nothing scales it again); other keys pass through. Returns the
    converted weights and notes for the user (truncations, with their error)."""
    tucker = [key for key in weights if _TUCKER.search(key)]
    if tucker:
        raise LoraFitError(
            f"LoRA {label!r}: LyCORIS Tucker factors ({', '.join(sorted(tucker)[:3])}) are not supported;"
            " train without `use_tucker` (conv-only in FLUX.2's case)"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        match = _FACTOR.match(key)
        if match and (is_lycoris_key(key) or _has_lycoris(weights, match["module"])):
            modules.setdefault(match["module"], {})[match["factor"]] = tensor
        else:
            out[key] = tensor
    notes: list[str] = []
    for module, factors in modules.items():
        is_lokr = "lokr_w1" in factors or "lokr_w1_a" in factors
        exact_rank = _lokr_rank(label, module, factors) if is_lokr else _loha_rank(label, module, factors)
        if exact_rank <= policy.max_rank:
            lora_B, lora_A = _lokr(label, module, factors) if is_lokr else _loha(label, module, factors)
        elif not policy.truncate:
            raise LoraFitError(
                f"LoRA {label!r}: {module} needs rank {exact_rank} as a LoRA, over this server's slot rank"
                f" {policy.max_rank} (FLUX2_MAX_LORA_RANK); raise it, or set FLUX2_LYCORIS_TRUNCATE=true"
                " to approximate it by SVD"
            )
        else:
            if is_lokr:
                lora_B, lora_A, error = _lokr_truncated(label, module, factors, policy.max_rank)
            else:
                lora_B, lora_A, error = truncate(*_loha(label, module, factors), policy.max_rank)
            notes.append(f"{module}: rank {exact_rank} truncated to {policy.max_rank} ({error:.2%} error)")
        down, up = ("lora_down", "lora_up") if module.startswith("lora_unet_") else ("lora_A", "lora_B")
        out[f"{module}.{down}.weight"] = lora_A.contiguous()  # named as the file's layout names LoRAs
        out[f"{module}.{up}.weight"] = lora_B.contiguous()
        out[f"{module}.alpha"] = torch.tensor(float(lora_A.shape[0]))
    return out, notes


def _has_lycoris(weights: Mapping[str, torch.Tensor], module: str) -> bool:
    return any(f"{module}.{factor}" in weights for factor in LOKR + LOHA)


def _lokr(label: str, module: str, factors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = kron(w1, w2) * scale, exactly, at the smallest rank the factors give."""
    (p1, q1), (p2, q2) = _sides(label, module, factors, "lokr_w1"), _sides(label, module, factors, "lokr_w2")
    lora_B = torch.kron(p1.double(), p2.double()) * _lokr_scale(factors)
    lora_A = torch.kron(q1.double(), q2.double())
    return lora_B.to(_dtype(factors)), lora_A.to(_dtype(factors))


def _lokr_rank(label: str, module: str, factors: Mapping[str, torch.Tensor]) -> int:
    (_, q1), (_, q2) = _sides(label, module, factors, "lokr_w1"), _sides(label, module, factors, "lokr_w2")
    return q1.shape[0] * q2.shape[0]


def _lokr_scale(factors: Mapping[str, torch.Tensor]) -> float:
    """diffusers' rule: alpha over the rows of w2b (else w1b); without a factored side alpha is dropped."""
    rank_rows = factors.get("lokr_w2_b", factors.get("lokr_w1_b"))
    if "alpha" in factors and rank_rows is not None:
        return float(factors["alpha"]) / rank_rows.shape[0]
    return 1.0


def _lokr_truncated(
    label: str, module: str, factors: Mapping[str, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of kron(w1, w2): the singular triplets of a Kronecker product are
    the pairs of its sides' triplets, so the largest products s1_i * s2_j are picked from two small SVDs."""
    (p1, q1), (p2, q2) = _sides(label, module, factors, "lokr_w1"), _sides(label, module, factors, "lokr_w2")
    u1, s1, vh1 = _svd(p1, q1)
    u2, s2, vh2 = _svd(p2, q2)
    products = torch.outer(s1, s2).flatten()
    kept, order = products.topk(min(rank, products.numel()))
    i, j = order // s2.numel(), order % s2.numel()
    columns = (u1[:, i].T[:, :, None] * u2[:, j].T[:, None, :]).reshape(len(kept), -1)  # kron(u1_i, u2_j)
    rows = (vh1[i][:, :, None] * vh2[j][:, None, :]).reshape(len(kept), -1)  # kron(v1_i, v2_j)
    lora_B = columns.T * (kept * _lokr_scale(factors))
    total = float(products.square().sum())
    error = (max(0.0, total - float(kept.square().sum())) / total) ** 0.5 if total > 0 else 0.0
    return lora_B.to(_dtype(factors)), rows.to(_dtype(factors)), error


def _sides(
    label: str, module: str, factors: Mapping[str, torch.Tensor], name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of the Kronecker product as P @ Q: its own factors, or itself and an identity."""
    if name in factors:
        full = factors[name]
        if full.ndim != 2:
            raise LoraFitError(f"LoRA {label!r}: {module}.{name} is not a matrix (a convolution LoKr?)")
        rows, cols = full.shape
        if cols <= rows:
            return full, torch.eye(cols, dtype=full.dtype)
        return torch.eye(rows, dtype=full.dtype), full
    a, b = factors.get(f"{name}_a"), factors.get(f"{name}_b")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise LoraFitError(f"LoRA {label!r}: {module} has an incomplete LoKr factor {name}")
    return a, b


def _loha(label: str, module: str, factors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = (w1a @ w1b) ⊙ (w2a @ w2b) * scale, exactly: rank r1 * r2."""
    w1a, w1b, w2a, w2b = _loha_factors(label, module, factors)
    scale = float(factors["alpha"]) / w1b.shape[0] if "alpha" in factors else 1.0
    lora_B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1) * scale  # row-wise Kronecker
    lora_A = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])  # column-wise Kronecker
    return lora_B.to(_dtype(factors)), lora_A.to(_dtype(factors))


def _loha_factors(
    label: str, module: str, factors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        w1a, w1b, w2a, w2b = (factors[name].double() for name in LOHA)
    except KeyError:
        raise LoraFitError(
            f"LoRA {label!r}: {module} has an incomplete LoHa (hada_w1_a/b, hada_w2_a/b)"
        ) from None
    fits = w1a.ndim == w2a.ndim == w1b.ndim == w2b.ndim == 2
    if not fits or w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
        raise LoraFitError(f"LoRA {label!r}: {module}'s LoHa factors do not fit together (a convolution?)")
    return w1a, w1b, w2a, w2b


def _loha_rank(label: str, module: str, factors: Mapping[str, torch.Tensor]) -> int:
    w1a, _, w2a, _ = _loha_factors(label, module, factors)
    return w1a.shape[1] * w2a.shape[1]


def _dtype(factors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float32 at least: the products are formed in float64 and would lose digits in half precision."""
    return torch.promote_types(next(iter(factors.values())).dtype, torch.float32)


def truncate(
    lora_B: torch.Tensor, lora_A: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of B @ A (Eckart-Young), and the relative Frobenius error of the
    delta it leaves."""
    u, s, vh = _svd(lora_B, lora_A)
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return (u[:, :rank] * s[:rank]).to(lora_B.dtype), vh[:rank].to(lora_A.dtype), error


def _svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of P @ Q from QR of each factor and the SVD of the small core, in float64: it costs
    the factors' size, never the full matrix's."""
    q_p, r_p = torch.linalg.qr(p.double())
    q_q, r_q = torch.linalg.qr(q.double().T)
    u, s, vh = torch.linalg.svd(r_p @ r_q.T)
    return q_p @ u, s, vh @ q_q.T
