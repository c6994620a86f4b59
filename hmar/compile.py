"""Regional compilation: `torch.compile` each transformer block instead of the whole model.

Every block runs the same code, so Dynamo compiles it once and reuses the graph for all of them (the
weights are graph inputs): seconds of compile time instead of minutes for an unrolled model. What
the compiled blocks gain is fusion of the memory-bound element-wise work around the matmuls
(LayerNorm, AdaLN modulation, L2-normalised q/k, GELU, residuals), which decides the step time of
narrow models. On CUDA the Triton attention kernel is a custom operator inside the graphs (see
`hmar.kernels`): the graphs call it, and fuse the q/k normalisation before it.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn as nn

import hmar.kernels
from hmar.transformer import AdaLNBlock, AdaLNHead


def kernels_fingerprint(folder: Path | None = None) -> str:
    """A short hash of the kernel package's sources (the .py files of `folder`, default: the installed
    `hmar.kernels`; their names and contents)."""
    if folder is None:
        return _installed_kernels_fingerprint()
    digest = hashlib.sha256()
    for source in sorted(folder.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _installed_kernels_fingerprint() -> str:
    return kernels_fingerprint(Path(hmar.kernels.__file__).parent)


def tag_compile_caches() -> str:
    """Add the kernels' fingerprint to `torch.compiler.config.cache_key_tag`, which every key of
    torch.compile's on-disk caches (Inductor's graph cache, AOTAutograd's) includes; returns the tag.

    Those caches key a graph by its code and inputs, not by the implementations of the custom
    operators it calls (`torch.ops.hmar.*`): once an operator's fake implementation changes (an
    output's strides, say), a graph cached against the old one would be reused with the new kernels
    and fail Inductor's stride checks. A tag set by the user is kept in front of ours."""
    ours = f"hmar-kernels-{kernels_fingerprint()}"
    tag = torch.compiler.config.cache_key_tag
    if ours not in tag.split("+"):
        torch.compiler.config.cache_key_tag = f"{tag}+{ours}" if tag else ours
    return torch.compiler.config.cache_key_tag


def compile_blocks(model: nn.Module, dynamic: bool | None = False, mode: str | None = None) -> int:
    """Compile the blocks and heads of `model` in place; returns how many. `dynamic=False` (training:
    one sequence shape) specialises on every shape; None lets Dynamo make a size dynamic once it
    changes (sampling: a different token count at every scale). `mode`: Inductor's (None: its
    default; "max-autotune-no-cudagraphs" also tries Triton matmul templates with fused epilogues).
    Tags the compile caches with the kernels' sources (`tag_compile_caches`)."""
    tag_compile_caches()
    regions = [m for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead))]
    for region in regions:
        region.compile(dynamic=dynamic, mode=mode)
    return len(regions)


def eager():
    """Run compiled blocks eagerly inside this context: for one-off shapes (preview sampling) that
    would otherwise each trigger a recompilation."""
    return torch.compiler.set_stance("force_eager")
