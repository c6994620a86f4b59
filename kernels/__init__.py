"""Triton kernels for HMAR (installed as ``hmar.kernels``); imports no model code.

Each kernel lives in its own module, imported by its full name (importing the package loads none
of them, nor Triton):

- ``block_sparse_attention``: ``block_sparse_attention(q, k, v, block_sizes, pattern, scale)``,
  attention restricted to blocks of the sequence (HMAR's scales), forward and backward; traceable by
  torch.compile as the custom operators ``torch.ops.hmar.block_sparse_attn_fwd`` / ``_bwd``,
  registered when the module is imported.
- ``cosine_qkv``: cosine attention's q, k, v from a fused projection, forward and backward.
- ``adaln``: the blocks' modulated LayerNorms, alone or after the gated residual add.
- ``channels_last``: GroupNorm+SiLU and bias adds for the half-precision decoder.
- ``sampling``: a sampling step's guidance, top-k, top-p, softmax and draw in one pass.
- ``devices``: where they all run (CUDA, or the CPU under Triton's interpreter).
- ``launch``: launches a compiled kernel again without Triton's per-call dispatch.
- ``reference`` and ``bench``: the PyTorch baselines and ``hmar bench attention``.
- ``scales``: the scale sizes per resolution, plain Python, shared with the model configuration.
"""
