"""References and baselines for block-sparse attention (no model code here).

- `reference_attention`: explicit masked softmax in a chosen precision (float64 on the CPU for the
  tests, float32 on the GPU): the definition every implementation is checked against.
- Baselines the benchmark times against the Triton kernel on the same tensors:
  `sdpa_masked` (PyTorch SDPA with a boolean mask), `sdpa_per_scale` (one dense SDPA call per block,
  block-diagonal only) and `flex_attention_baseline` (FlexAttention with a compiled block mask).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

PATTERNS = ("block_diagonal", "block_causal")


@lru_cache(maxsize=32)
def _block_ids(block_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    sizes = torch.tensor(block_sizes, device=device)
    return torch.repeat_interleave(torch.arange(len(block_sizes), device=device), sizes)


def block_ids(block_sizes: Sequence[int], device="cpu") -> torch.Tensor:
    return _block_ids(tuple(int(b) for b in block_sizes), torch.device(device))


def block_mask(block_sizes: Sequence[int], pattern: str, device="cpu") -> torch.Tensor:
    """(N, N) bool, True where query i may attend to key j."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    ids = block_ids(block_sizes, device)
    if pattern == "block_diagonal":
        return ids[:, None] == ids[None, :]
    return ids[:, None] >= ids[None, :]


def reference_attention(q, k, v, block_sizes, pattern="block_diagonal", scale=None, dtype=torch.float64):
    """softmax(scale * q k^T masked) v, computed in `dtype` (differentiable)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~block_mask(block_sizes, pattern, q.device), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def useful_pairs(block_sizes: Sequence[int], pattern: str) -> int:
    """Query-key pairs the pattern allows (the useful work)."""
    sizes = [int(b) for b in block_sizes]
    if pattern == "block_diagonal":
        return sum(s * s for s in sizes)
    total, seen = 0, 0
    for s in sizes:
        seen += s
        total += s * seen
    return total


# ---------------------------------------------------------------- baselines


def sdpa_masked(q, k, v, block_sizes, pattern="block_diagonal", scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask(block_sizes, pattern, q.device), scale=scale)


def sdpa_per_scale(q, k, v, block_sizes, pattern="block_diagonal", scale=None):
    if pattern != "block_diagonal":
        raise ValueError("sdpa_per_scale computes the block-diagonal pattern only")
    outs, start = [], 0
    for size in block_sizes:
        sl = slice(start, start + int(size))
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], scale=scale))
        start += int(size)
    return torch.cat(outs, dim=2)


_FLEX = {}


def flex_attention_baseline(q, k, v, block_sizes, pattern="block_diagonal", scale=None):
    """FlexAttention (compiled) with a block mask built once per (sizes, pattern, device)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    key = (tuple(int(b) for b in block_sizes), pattern, q.device)
    if key not in _FLEX:
        ids = block_ids(block_sizes, q.device)
        if pattern == "block_diagonal":
            def mask_mod(b, h, qi, ki):
                return ids[qi] == ids[ki]
        else:
            def mask_mod(b, h, qi, ki):
                return ids[qi] >= ids[ki]
        _FLEX[key] = create_block_mask(mask_mod, None, None, n, n, device=q.device)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"](q, k, v, block_mask=_FLEX[key], scale=scale)
