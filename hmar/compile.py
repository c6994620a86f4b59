"""Regional compilation: `torch.compile` each transformer block instead of the whole model.

Every block runs the same code, so Dynamo compiles it once and reuses the graph for all of them (the
weights are graph inputs): seconds of compile time instead of minutes for an unrolled model. What
the compiled blocks gain is fusion of the memory-bound element-wise work around the matmuls
(LayerNorm, AdaLN modulation, L2-normalised q/k, GELU, residuals), which decides the step time of
narrow models. On CUDA the Triton attention kernel is a custom operator inside the graphs (see
`hmar.kernels`): the graphs call it, and fuse the q/k normalisation before it.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from hmar.transformer import AdaLNBlock, AdaLNHead


def compile_blocks(model: nn.Module, dynamic: bool | None = False, mode: str | None = None) -> int:
    """Compile the blocks and heads of `model` in place; returns how many. `dynamic=False` (training:
    one sequence shape) specialises on every shape; None lets Dynamo make a size dynamic once it
    changes (sampling: a different token count at every scale). `mode`: Inductor's (None: its
    default; "max-autotune-no-cudagraphs" also tries Triton matmul templates with fused epilogues)."""
    regions = [m for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead))]
    for region in regions:
        region.compile(dynamic=dynamic, mode=mode)
    return len(regions)


def eager():
    """Run compiled blocks eagerly inside this context: for one-off shapes (preview sampling) that
    would otherwise each trigger a recompilation."""
    return torch.compiler.set_stance("force_eager")
