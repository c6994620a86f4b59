"""Cross entropy over the scales, with the per-scale weights of HMAR's stage 1.

The loss of stage 1 is Σ_k w_k · CE_k, CE_k the mean cross entropy over scale k's tokens and the
weights summing to 1. HMAR found the scales unequally hard to learn, the difficulty following a
log-normal curve over the scale index, and weights the scales by that curve (the default here). The
alternatives it compares against are options:

- `lognormal`: w_k ∝ lognormal density at x_k = (k+1)/K (μ, σ options; the mode is exp(μ − σ²)).
- `unweighted`: every token counts the same (VAR's loss): w_k ∝ pn_k², so large scales dominate.
- `equal`: every scale counts the same: w_k = 1/K.
- `linear`: w_k ∝ k+1.  `sqrt`: w_k ∝ √(k+1).  `exp_decay`: w_k ∝ exp(−rate·k).

Stage 2's loss is the plain mean cross entropy over the masked tokens of all scales.

Both losses start from per-token scores (float32 cross entropy and top-1 hit). Training computes them
with `score_features`: the logits head is applied a chunk of tokens at a time (its matmul in the
autocast dtype, the cross entropy in float32) under activation checkpointing, so the float32 logits
of all B·L tokens × V codes (340 MiB at batch 32, 256 px; more with the log-softmax autograd keeps)
never exist, in the forward or the backward: one chunk's logits at a time do. `score_logits` scores
logits that already exist (the same numbers, for small inputs and tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# At most this many logits exist at once in `score_features` (128 MiB in float32): 8192 tokens at
# V = 4096, so a batch of 32 at 256 px (21,760 tokens) takes three chunks.
LOGITS_PER_CHUNK = 2**25


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


class TokenScores(NamedTuple):
    """Per-token float32 cross entropy and whether the top-1 prediction was the target."""

    ce: torch.Tensor
    correct: torch.Tensor


@dataclass
class ScaleStats:
    """Detached per-scale numbers for logging: mean loss and top-1 accuracy (K,) each; `counts` (K,)
    is how many tokens each scale's numbers are over (stage 2: masked tokens only)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor


def score_logits(logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Scores of logits (..., V) against targets (...), shaped like the targets."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return TokenScores(ce.view(targets.shape), logits.detach().argmax(-1) == targets)


def _score_chunk(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> TokenScores:
    return score_logits(F.linear(features, weight, bias), targets)


def score_features(features: torch.Tensor, head: nn.Linear, targets: torch.Tensor, logits_per_chunk: int = LOGITS_PER_CHUNK) -> TokenScores:
    """`score_logits(head(features), targets)` with features (..., C), without holding all the logits:
    chunks of tokens go through the head and the cross entropy one at a time, and the backward
    recomputes a chunk's logits instead of keeping them."""
    rows, wanted = features.reshape(-1, features.shape[-1]), targets.reshape(-1)
    step = max(1, logits_per_chunk // head.out_features)
    chunks = [
        checkpoint(_score_chunk, rows[i : i + step], head.weight, head.bias, wanted[i : i + step], use_reentrant=False, preserve_rng_state=False)
        for i in range(0, max(len(rows), 1), step)  # no rows: one empty chunk
    ]
    ce, correct = (torch.cat(parts).view(targets.shape) for parts in zip(*chunks))
    return TokenScores(ce, correct)


def _scale_sums(values: torch.Tensor, patch_nums: Sequence[int]) -> torch.Tensor:
    """Sums over each scale's tokens of values (..., L): (..., K), differentiable."""
    sizes = [p * p for p in patch_nums]
    return torch.stack([part.sum(-1) for part in values.split(sizes, dim=-1)], dim=-1)


def next_scale_loss(scores: TokenScores, weights: torch.Tensor, patch_nums: Sequence[int]) -> tuple[torch.Tensor, ScaleStats]:
    """Stage 1: Σ_k w_k · mean CE over scale k, from the scores of all (B, L) tokens."""
    batch, length = scores.ce.shape
    # tokens per scale, counted on the device (a host-to-device copy could not be captured in a CUDA graph)
    counts = _scale_sums(scores.ce.new_full((length,), float(batch), dtype=torch.float32), patch_nums)
    mean_ce = _scale_sums(scores.ce.sum(0), patch_nums) / counts
    accuracy = _scale_sums(scores.correct.sum(0).float(), patch_nums) / counts
    return (weights * mean_ce).sum(), ScaleStats(mean_ce.detach(), accuracy, counts)


def masked_token_loss(scores: TokenScores, masked: torch.Tensor, patch_nums: Sequence[int]) -> tuple[torch.Tensor, ScaleStats]:
    """Stage 2: mean CE over the masked tokens of all scales. `masked` (B, L') marks them in the
    scales of `patch_nums` laid end to end; `scores` are of the masked tokens only, in `masked`'s
    row-major order (as `x[masked]` picks them)."""
    loss = scores.ce.sum() / max(scores.ce.numel(), 1)
    with torch.no_grad():
        counts = _scale_sums(masked.sum(0).float(), patch_nums)
        per_token = torch.zeros((2, *masked.shape), device=masked.device)
        per_token[:, masked] = torch.stack((scores.ce.detach(), scores.correct.float()))
        ce_sums, hits = _scale_sums(per_token.sum(1), patch_nums)
        seen = counts.clamp_min(1)
    return loss, ScaleStats(ce_sums / seen, hits / seen, counts)
