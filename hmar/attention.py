"""Attention over a sequence of scales: which implementation runs where.

Training runs all scales in one sequence. HMAR lets a token attend only to tokens of its own scale
(block-diagonal); VAR lets it attend to its own and every earlier scale (block-causal). The block
sizes are the per-scale token counts (1, 4, 9, …). Every implementation here computes the same thing:

- `masked_sdpa`: PyTorch SDPA with a boolean mask: the reference, works everywhere.
- `per_scale_sdpa`: one dense SDPA call per scale (block-diagonal only): no wasted work on the CPU.
- `block_sparse_kernel`: the Triton kernel in `hmar.kernels` (CUDA): skips masked tiles; a custom
  operator, so torch.compile traces through it.

Which one runs is the kernel policy's choice (`hmar.policy.KernelPolicy.attention`).

An attention function takes q, k, v of shape (B, H, N, D), the block sizes, the pattern and the
softmax scale, and returns (B, H, N, D).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# The patterns, their mask and the SDPA forms are defined once, next to the kernel's reference.
from hmar.kernels.reference import sdpa_masked as masked_sdpa
from hmar.kernels.reference import sdpa_per_scale

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[int], str, float], torch.Tensor]


def per_scale_sdpa(q, k, v, block_sizes, pattern="block_diagonal", scale=None):
    if pattern != "block_diagonal":
        return masked_sdpa(q, k, v, block_sizes, pattern, scale)
    return sdpa_per_scale(q, k, v, block_sizes, pattern, scale)


def block_sparse_kernel(q, k, v, block_sizes, pattern="block_diagonal", scale=None):
    # torch.compile traces through it without a graph break: the kernel is a custom operator
    # (torch.ops.hmar.block_sparse_attn_fwd/_bwd, see hmar.kernels), so compiled blocks fuse the
    # q/k normalisation and reshapes around it.
    from hmar.kernels.block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, block_sizes, pattern=pattern, scale=scale)


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "masked_sdpa": masked_sdpa,
    "per_scale_sdpa": per_scale_sdpa,
    "block_sparse": block_sparse_kernel,
}
