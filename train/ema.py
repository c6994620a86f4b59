"""Exponential moving average of the trained parameters (optional; exported instead of the raw weights).

The averages are buffers of a module tree that repeats the trained parameters' names, each placed
like its parameter (an FSDP shard's average is the same shard), so that torch.distributed.checkpoint
gathers and cuts them as it does the model (`hmar.train.sharding`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from hmar.train.sharding import GATHERED, SCATTERED


def _named_tree(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose buffer `a.b.c` is `tensors["a.b.c"]`."""
    root = nn.Module()
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, tensor)
    return root


class ParameterEMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.average = _named_tree({n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad})

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        trained = dict(module.named_parameters())
        for name, average in self.average.named_buffers():
            average.lerp_(trained[name].detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as whole CPU tensors on the main process ({} on the others); every process must call it."""
        return get_model_state_dict(self.average, options=GATHERED)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Whole averages (every process passes them) into this process's part."""
        set_model_state_dict(self.average, state, options=SCATTERED)

    def averaged_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state`, the module's state from `get_model_state_dict(..., options=GATHERED)`, with the
        averages in place of the trained parameters; every process must call it."""
        averages = self.state_dict()
        return {name: averages[name].to(value.dtype) if name in averages else value for name, value in state.items()}
