"""Zero-shot editing primitives: which tokens of an image are known and forced while sampling.

A keep mask says, per pixel at the model's resolution, what must stay. A token of the finest scale is
known only when every pixel of its patch is kept (a partly edited patch must be regenerated). Coarser
scales are known where at least `coarse_threshold` of the finest tokens they cover are known: they carry
the kept surroundings' colours and layout into the generation, which keeps the fill consistent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hmar.sampler import EditTarget
from hmar.tokenizer import MultiScaleVQVAE


def keep_masks_per_scale(keep_pixels: torch.Tensor, patch_nums, coarse_threshold: float = 0.5) -> list[torch.Tensor]:
    """`keep_pixels` (B, H, W) bool at the model resolution → per scale (B, pn²) bool."""
    P = patch_nums[-1]
    kept = F.interpolate(keep_pixels[:, None].float(), size=(P, P), mode="area")
    finest = kept >= 1.0 - 1e-6
    masks = []
    for pn in patch_nums:
        if pn == P:
            masks.append(finest.flatten(1))
        else:
            share = F.interpolate(finest.float(), size=(pn, pn), mode="area")
            masks.append((share >= coarse_threshold).flatten(1))
    return masks


@torch.no_grad()
def edit_target(tokenizer: MultiScaleVQVAE, image: torch.Tensor, keep_pixels: torch.Tensor, coarse_threshold: float = 0.5) -> EditTarget:
    """Tokens of `image` (B, 3, H, W) in [0, 1] to force where `keep_pixels` (B, H, W) is True."""
    tokens = tokenizer.encode(image.float().mul(2).sub(1))
    keep = keep_masks_per_scale(keep_pixels.to(image.device), tokenizer.config.patch_nums, coarse_threshold)
    return EditTarget(tokens=tokens, keep=keep)
