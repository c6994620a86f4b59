"""Where the Triton kernels run: on CUDA, or on the CPU under Triton's interpreter (the tests)."""
from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it decorates the kernels, so the mode is fixed for the process.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can launch on tensors of `device`."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETING)
