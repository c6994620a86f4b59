"""How the trained module is spread over the processes: `ddp` replicates it, `fsdp` shards it.

ddp: every process holds all parameters, gradients, AdamW moments and the EMA; DistributedDataParallel
all-reduces the gradients. fsdp: FSDP2 (`fully_shard`) with one group per transformer block and one
for the rest (embeddings, heads); each process keeps 1/N of every group's parameters, gradients,
moments and EMA (as DTensors). A block's whole weights exist only while it runs (all-gathered just
before, freed after), so the model a GPU can train grows with the number of GPUs. Under bf16 training
the blocks' weights are gathered in bf16 and their gradients reduced in float32; the blocks' inputs
keep their dtype, so the residual stream stays float32 as under plain autocast.

Both write the same checkpoints: sharded tensors are gathered into whole ones on the main process
before saving, and a loaded checkpoint is cut into this process's shards, so a run may be resumed
with the other sharding. With one process both are the plain module.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from hmar.train.distributed import Processes
from hmar.transformer import AdaLNBlock


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_as(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole tensor, placed like the DTensor `like`; unchanged when `like`
    is an ordinary tensor. Every process holds `value`, so nothing is sent."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_state(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole state dict (model or EMA) cut like `like`, the current one, for `load_state_dict`."""
    return {k: shard_as(v, like[k]) if k in like else v for k, v in state.items()}


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state dict cut like the optimizer's parameters: the per-element states
    (AdamW's moments, shaped like their parameter) become shards, scalars such as `step` stay."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        index: {k: shard_as(v, params[index]) if torch.is_tensor(v) and v.shape == params[index].shape else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return {**state, "state": per_param}


class Sharding:
    def __init__(self, kind: str, procs: Processes, bf16: bool):
        """`kind`: one of `hmar.train.options.SHARDINGS`; `bf16`: the step runs under bf16 autocast."""
        self.kind, self.procs, self.bf16 = kind, procs, bf16

    @property
    def sharded(self) -> bool:
        """Parameters split over the processes: reading the model (checkpoints, samples, export)
        then needs every process."""
        return self.kind == "fsdp" and self.procs.active

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the training step calls. FSDP shards `module` in place (its parameters become
        DTensors), so build the optimizer and EMA from it afterwards."""
        if not self.procs.active:
            return module
        device = self.procs.device
        if self.kind == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        mesh = init_device_mesh(device.type, (self.procs.world_size,))
        blocks = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False) if self.bf16 else MixedPrecisionPolicy()
        for block in [m for m in module.modules() if isinstance(m, AdaLNBlock)]:
            fully_shard(block, mesh=mesh, mp_policy=blocks)
        fully_shard(module, mesh=mesh)
        return module

    def gather(self, value: Any) -> Any:
        """`value` (nested dicts / lists of tensors, e.g. a state dict) with its shards gathered into
        whole CPU tensors on the main process (None on the others). Every process must call it."""
        if isinstance(value, DTensor):
            full = value.full_tensor()
            return full.cpu() if self.procs.is_main else None
        if isinstance(value, dict):
            return {k: self.gather(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.gather(v) for v in value)
        return value

    @contextlib.contextmanager
    def whole_model(self, module: nn.Module) -> Iterator[None]:
        """Inside, code outside the training step (preview sampling) can call the sharded module's
        parts: the root group's parameters are gathered, the blocks gather theirs as they run, and
        bf16-gathered blocks run under bf16 autocast as in training. Every process must enter it."""
        if not self.sharded:
            yield
            return
        module.unshard()
        try:
            with torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                yield
        finally:
            module.reshard()
