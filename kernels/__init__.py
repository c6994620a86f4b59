"""Triton kernels for HMAR (installed as ``hmar.kernels``); imports no model code.

``block_sparse_attention(q, k, v, block_sizes, pattern="block_diagonal", scale=None)``: attention
restricted to blocks of the sequence (HMAR's scales), forward and backward in Triton; traceable by
torch.compile (custom operators ``torch.ops.hmar.block_sparse_attn_fwd`` / ``_bwd``, registered on import).

Submodules: ``cosine_qkv`` (cosine attention's q, k, v from a fused projection, forward and backward),
``adaln`` (the blocks' modulated LayerNorms, alone or after the gated residual add, forward and
backward) and ``channels_last`` (GroupNorm+SiLU and bias adds for the half-precision decoder);
``devices`` says where they all run (CUDA, or the CPU under Triton's interpreter); ``launch``
launches a compiled kernel again without Triton's per-call dispatch (the attention passes use it).
"""
from .block_sparse_attention import PATTERNS, block_sparse_attention

__all__ = ["block_sparse_attention", "PATTERNS"]
