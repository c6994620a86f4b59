"""Cross entropy over the scales, with the per-scale weights of HMAR's stage 1.

The loss of stage 1 is Σ_k w_k · CE_k, CE_k the mean cross entropy over scale k's tokens and the
weights summing to 1. HMAR found the scales unequally hard to learn, the difficulty following a
log-normal curve over the scale index, and weights the scales by that curve (the default here). The
alternatives it compares against are options:

- `lognormal`: w_k ∝ lognormal density at x_k = (k+1)/K (μ, σ options; the mode is exp(μ − σ²)).
- `unweighted`: every token counts the same (VAR's loss): w_k ∝ pn_k², so large scales dominate.
- `equal`: every scale counts the same: w_k = 1/K.
- `linear`: w_k ∝ k+1.  `sqrt`: w_k ∝ √(k+1).  `exp_decay`: w_k ∝ exp(−rate·k).

Stage 2's loss is the plain mean cross entropy over the masked tokens of all scales. Logits are
scored one scale at a time, and only at the masked positions in stage 2, so no log-softmax of the
whole (B, L, V) tensor is ever held.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


def scale_weights(scheme: str, patch_nums: Sequence[int], mu: float = -0.7, sigma: float = 0.75, decay: float = 0.5) -> torch.Tensor:
    """Per-scale loss weights (K,), float32, summing to 1."""
    K = len(patch_nums)
    k = torch.arange(K, dtype=torch.float64)
    if scheme == "lognormal":
        x = (k + 1) / K
        raw = torch.exp(-((x.log() - mu) ** 2) / (2 * sigma**2)) / (x * sigma * math.sqrt(2 * math.pi))
    elif scheme == "unweighted":
        raw = torch.tensor([p * p for p in patch_nums], dtype=torch.float64)
    elif scheme == "equal":
        raw = torch.ones(K, dtype=torch.float64)
    elif scheme == "linear":
        raw = k + 1
    elif scheme == "sqrt":
        raw = (k + 1).sqrt()
    elif scheme == "exp_decay":
        raw = torch.exp(-decay * k)
    else:
        raise ValueError(f"unknown loss weighting {scheme!r}")
    return (raw / raw.sum()).float()


@dataclass
class ScaleStats:
    """Detached per-scale numbers for logging: mean loss and top-1 accuracy (K,) each; `counts` (K,)
    is how many tokens each scale's numbers are over (stage 2: masked tokens only)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor


def _split(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for p in patch_nums:
        bounds.append((start, start + p * p))
        start += p * p
    return bounds


def next_scale_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, patch_nums: Sequence[int]) -> tuple[torch.Tensor, ScaleStats]:
    """Stage 1: Σ_k w_k · mean CE over scale k. logits (B, L, V), targets (B, L)."""
    V = logits.shape[-1]
    total = logits.new_zeros((), dtype=torch.float32)
    losses, accuracies, counts = [], [], []
    for k, (s, e) in enumerate(_split(patch_nums)):
        scale_logits = logits[:, s:e].reshape(-1, V)
        scale_targets = targets[:, s:e].reshape(-1)
        ce = F.cross_entropy(scale_logits.float(), scale_targets)
        total = total + weights[k] * ce
        losses.append(ce.detach())
        with torch.no_grad():
            accuracies.append((scale_logits.argmax(-1) == scale_targets).float().mean())
        counts.append(scale_targets.numel())
    return total, ScaleStats(torch.stack(losses), torch.stack(accuracies), torch.tensor(counts, dtype=torch.float32))


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, patch_nums: Sequence[int]) -> tuple[torch.Tensor, ScaleStats]:
    """Stage 2: mean CE over the masked tokens of all scales. logits (B, L', V), targets and masked
    (B, L') for the scales in `patch_nums` laid end to end."""
    V = logits.shape[-1]
    total = logits.new_zeros((), dtype=torch.float32)
    losses, accuracies, counts = [], [], []
    for s, e in _split(patch_nums):
        where = masked[:, s:e]
        picked = logits[:, s:e][where]  # (M_k, V): only the masked positions
        wanted = targets[:, s:e][where]
        n = wanted.numel()
        ce_sum = F.cross_entropy(picked.float(), wanted, reduction="sum") if n else total * 0
        total = total + ce_sum
        losses.append(ce_sum.detach() / max(n, 1))
        with torch.no_grad():
            accuracies.append((picked.argmax(-1) == wanted).float().sum() / max(n, 1))
        counts.append(n)
    counts_t = torch.tensor(counts, dtype=torch.float32)
    return total / max(sum(counts), 1), ScaleStats(torch.stack(losses), torch.stack(accuracies), counts_t)
