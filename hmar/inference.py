"""Getting loaded models ready to sample fast on a GPU, each step measured in BENCHMARKS.md.

- `cast_linears`: on CUDA the transformer runs under bf16 autocast, which casts every Linear's weight
  and bias to bf16 at each use (and, as the sampler leaves autocast between scales, again at every
  scale). Casting them once gives the very same numbers, frees the float32 copies (half the weight
  memory) and saves the cast traffic. Everything else (embeddings, the attention temperature, the
  class projection the sampler runs outside autocast) stays float32.
- channels-last decoder (`MultiScaleVQVAE.use_channels_last`): cuDNN's convolutions work in NHWC;
  an NCHW decoder pays a layout transpose around every convolution.
- `compile_for_sampling`: regional `torch.compile` of the blocks and heads with dynamic token counts
  (one graph for scale 0's single token, one for all the others), fusing the element-wise work that
  otherwise runs as dozens of separate kernels per block.

Models prepared this way are for sampling only (their Linear weights are no longer float32).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hmar.compile import compile_blocks
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer

def cast_linears(transformer: ScaleTransformer, dtype: torch.dtype) -> int:
    """Store the Linear layers that the sampler runs under autocast in `dtype`; returns how many."""
    outside_autocast = set(transformer.shared_ada_lin.modules())  # `condition` runs before autocast
    linears = [m for m in transformer.modules() if isinstance(m, nn.Linear) and m not in outside_autocast]
    for linear in linears:
        linear.to(dtype)
    return len(linears)


def compile_for_sampling(transformer: ScaleTransformer) -> int:
    """Compile blocks and heads for the sampler's changing token counts; returns how many. (HMAR's
    blocks take 2 graphs, VAR's 3: its first scale has an empty KV cache.)"""
    return compile_blocks(transformer, dynamic=None)


def prepare_for_sampling(tokenizer: MultiScaleVQVAE, transformer: ScaleTransformer, amp_dtype: torch.dtype | None,
                         compile: bool = False) -> None:
    """The fast paths above for models already on their device (nothing changes on the CPU unless
    `compile`)."""
    if amp_dtype is not None:
        cast_linears(transformer, amp_dtype)
    if next(tokenizer.parameters()).device.type == "cuda":
        tokenizer.use_channels_last()
    if compile:
        compile_for_sampling(transformer)
