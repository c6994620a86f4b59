"""Getting loaded models ready to sample fast on a GPU, each step measured in BENCHMARKS.md.

- `cast_linears`: on CUDA the transformer runs under bf16 autocast, which casts every Linear's weight
  and bias to bf16 at each use (and, as the sampler leaves autocast between scales, again at every
  scale). Casting them once gives the very same numbers, frees the float32 copies (half the weight
  memory) and saves the cast traffic. Everything else (embeddings, the attention temperature, the
  class projection the sampler runs outside autocast) stays float32.
- float16 decoder (`MultiScaleVQVAE.cast_decoder`): the VQ-VAE decoder is half of a 256 px sampling
  batch in float32. Stored and run in float16 (GroupNorm keeps float32 statistics inside), it runs
  on the tensor cores with no casts around its float32 norms, as autocast would add. float16 rather
  than bf16: 3 more mantissa bits keep the pixels within a few levels of 255 of float32's, where
  bf16's stray several times further. Channels-last: cuDNN's half-precision convolutions are
  NHWC-native (NCHW maps are transposed around each of them), but PyTorch's GroupNorm turns
  channels-last maps back into NCHW, which costs more than the convolutions gain; with the norms (and the SiLU
  after them) as Triton kernels that keep the layout, the convolutions' bias adds fused with the
  residual adds after them or into the norm after them, and each nearest 2× upsample with its 3×3
  convolution in sub-pixel form (four 2×2 convolutions over the small map, interleaved by one
  kernel; `hmar.tokenizer_modules.Upsample`), the decoder runs channels-last from end to end
  (`hmar.kernels.channels_last`).
- `compile_for_sampling`: regional `torch.compile` of the blocks and heads with dynamic token counts
  (one graph for scale 0's single token, one for all the others), fusing the element-wise work.
  Since eagerly the blocks run their norms, residual adds and attention inputs as our kernels on
  CUDA (`hmar.transformer`), compiling gains little and is optional. The channels-last decoder stays
  eager: its norms and bias adds are already fused, and Inductor would replace them with its own.

Which of these run is the kernel policy's choice (`hmar.policy.KernelPolicy`).

Models prepared this way are for sampling only (their Linear weights are no longer float32, and the
GELU epilogue and the decoder's kernels have no backward).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hmar.compile import compile_blocks
from hmar.policy import KernelPolicy
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer


def cast_linears(transformer: ScaleTransformer, dtype: torch.dtype) -> int:
    """Store the Linear layers that the sampler runs under autocast in `dtype`; returns how many."""
    outside_autocast = set(transformer.shared_ada_lin.modules())  # `condition` runs before autocast
    linears = [m for m in transformer.modules() if isinstance(m, nn.Linear) and m not in outside_autocast]
    for linear in linears:
        linear.to(dtype)
    return len(linears)


def compile_for_sampling(tokenizer: MultiScaleVQVAE, transformer: ScaleTransformer) -> int:
    """Compile blocks and heads for the sampler's changing token counts, and an NCHW decoder for any
    batch; returns how many regions. (HMAR's blocks take 2 graphs, VAR's 3: its first scale has an
    empty KV cache.)"""
    regions = compile_blocks(transformer, dynamic=None)
    if tokenizer.decoder_memory_format != torch.channels_last:
        tokenizer.decoder.compile(dynamic=True)
        regions += 1
    return regions


def prepare_for_sampling(tokenizer: MultiScaleVQVAE, transformer: ScaleTransformer, policy: KernelPolicy) -> None:
    """The fast paths above that `policy` takes, for models already on their device: the Linear
    weights in its autocast dtype, the decoder's dtype and layout, the blocks' kernels, compilation.
    The reference policy (the CPU's default) keeps the float32 reference numerics."""
    if policy.amp_dtype is not None:
        cast_linears(transformer, policy.amp_dtype)
    tokenizer.set_policy(policy)
    transformer.set_policy(policy)
    if policy.compile:
        compile_for_sampling(tokenizer, transformer)
