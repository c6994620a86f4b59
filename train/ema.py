"""Exponential moving average of the trained parameters (optional; exported instead of the raw weights)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ParameterEMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def averaged_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged parameters in place of the trained ones."""
        state = module.state_dict()
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state
