"""Which implementation each switchable step of the models runs: decided once, then read everywhere.

The models have one reference path, PyTorch's ops in float32 (what the CPU runs and the conformance
fixtures check), and faster ones on CUDA: Triton kernels (`hmar.kernels`), the MLP's GELU in a
matmul epilogue, a half-precision channels-last decoder, bf16 autocast, torch.compile and CUDA
graphs. `KernelPolicy.choose` decides all of them from the device, the mode (sampling or training)
and the caller's flags. `Pipeline`, the trainer and the benchmarks build one policy and hand it to
the models (`ScaleTransformer.set_policy`, `MultiScaleVQVAE.set_policy`), whose modules then read
plain attributes; a forward only falls back where a kernel cannot take a tensor's shape or dtype
(the kernel's own `supports`). `hmar env` prints what this machine chooses; sampled images and
benchmark JSON record the policy they ran with.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from hmar.attention import IMPLEMENTATIONS, AttentionFn

PRECISIONS = ("auto", "bf16", "fp32")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels import here (no Triton on some platforms): asked once per process."""
    try:
        import hmar.kernels.block_sparse_attention  # noqa: F401  (imports Triton: seconds, hence asked only for CUDA)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class KernelPolicy:
    """What the models run; the defaults are the reference path (`reference()`)."""

    # all scales in one sequence (training): a name of `hmar.attention.IMPLEMENTATIONS`
    attention: str = "per_scale_sdpa"
    # the blocks' and heads' modulated LayerNorms, and the gated residual add between them: `hmar.kernels.adaln`
    fused_adaln: bool = False
    # cosine attention's q, k, v from the fused projection: `hmar.kernels.cosine_qkv`
    fused_cosine_qkv: bool = False
    # the MLP's tanh GELU and bias in its first matmul's epilogue (cuBLASLt; `torch._addmm_activation`)
    gelu_epilogue: bool = False
    # sampling's guidance, top-k/top-p, softmax and draw per step as one kernel: `hmar.kernels.sampling`
    # (the same random numbers as the reference ops; rounding differs only where its docstring says)
    fused_draw: bool = False
    # the decoder stored and run channels-last: norms and bias adds as `hmar.kernels.channels_last`, sub-pixel upsamples
    channels_last_decoder: bool = False
    # what the decoder is stored and runs in (sampling)
    decoder_dtype: torch.dtype = torch.float32
    # autocast for the transformer; in sampling its Linear weights are stored in it too (`hmar.inference`)
    amp_dtype: torch.dtype | None = None
    # torch.compile of the blocks and heads (`hmar.compile`; in sampling also an NCHW decoder)
    compile: bool = False
    # sampling batches or training steps replayed as CUDA graphs (`hmar.cuda_graph`)
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {self.attention!r}; expected auto or one of {sorted(IMPLEMENTATIONS)}")

    @classmethod
    def reference(cls) -> KernelPolicy:
        """PyTorch's ops in float32, eager: the numerics the conformance tests check."""
        return cls()

    @classmethod
    def choose(cls, device: torch.device | str, *, training: bool, compile: bool | None = None, cuda_graph: bool | None = None,
               attention: str = "auto", precision: str = "auto", world_size: int = 1) -> KernelPolicy:
        """The fast paths this device takes for sampling or `training`, given the caller's flags.

        `compile`: None compiles for training on CUDA, where fusion pays over a long run, and samples
        eagerly (compiling takes tens of seconds per process, and the eager kernels leave it little to
        gain). `cuda_graph`: None replays on CUDA (in training only with one process); sampling never
        replays off CUDA. `attention`: "auto" is the Triton kernel on CUDA, per-scale SDPA elsewhere.
        `precision` (training): "auto" is bf16 autocast on CUDA. On the CPU the defaults give
        `reference()`."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        cuda = torch.device(device).type == "cuda"
        triton = cuda and triton_available()
        compiled = (cuda and training) if compile is None else bool(compile)
        if attention == "auto":
            attention = "block_sparse" if triton else "per_scale_sdpa"
        bf16 = precision == "bf16" or (precision == "auto" and cuda)
        if training:
            # The block kernels' backward passes beat Inductor's fusion of the same ops, so they stay
            # on when compiled. No GELU epilogue and no decoder kernels: they have no backward.
            return cls(attention=attention, fused_adaln=triton, fused_cosine_qkv=triton, amp_dtype=torch.bfloat16 if bf16 else None,
                       compile=compiled, cuda_graph=(cuda and world_size == 1) if cuda_graph is None else bool(cuda_graph))
        # Sampling eagerly, PyTorch runs each element-wise op as its own kernel, which the fused ones
        # replace; compiled, Inductor fuses the same ops its own way, so the blocks keep PyTorch's.
        eager_fused = triton and not compiled
        # The sampling loop itself is never compiled, so the fused draw runs with or without compile.
        return cls(attention=attention, fused_adaln=eager_fused, fused_cosine_qkv=eager_fused, gelu_epilogue=cuda and not compiled,
                   fused_draw=triton, channels_last_decoder=triton, decoder_dtype=torch.float16 if cuda else torch.float32,
                   amp_dtype=torch.bfloat16 if cuda else None, compile=compiled, cuda_graph=cuda and cuda_graph is not False)

    @property
    def is_reference(self) -> bool:
        return self == KernelPolicy.reference()

    def attention_function(self) -> AttentionFn:
        return IMPLEMENTATIONS[self.attention]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: dtypes by name."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KernelPolicy:
        """The policy `as_dict` wrote."""
        dtypes = {"decoder_dtype", "amp_dtype"}
        return cls(**{k: getattr(torch, v) if k in dtypes and v is not None else v for k, v in values.items()})

    def compact(self) -> str:
        """One line for image metadata: "reference", or what differs from it ("fused_adaln,amp_dtype=bfloat16,…")."""
        if self.is_reference:
            return "reference"
        base = KernelPolicy.reference()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(base, f.name):
                parts.append(f.name if value is True else f"{f.name}={_plain(value)}")
        return ",".join(parts)


def _plain(value: Any) -> Any:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
