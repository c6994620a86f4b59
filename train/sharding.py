"""How the trained module is spread over the processes: `ddp` replicates it, `fsdp` shards it.

ddp: every process holds all parameters, gradients, AdamW moments and the EMA; DistributedDataParallel
all-reduces the gradients. fsdp: FSDP2 (`fully_shard`) with one group per transformer block and one
for the rest (embeddings, heads); each process keeps 1/N of every group's parameters, gradients,
moments and EMA (as DTensors). A block's whole weights exist only while it runs (all-gathered just
before, freed after), so the model a GPU can train grows with the number of GPUs. Under bf16 training
the blocks' weights are gathered in bf16 and their gradients reduced in float32; the blocks' inputs
keep their dtype, so the residual stream stays float32 as under plain autocast.

Both write the same checkpoints, through torch.distributed.checkpoint.state_dict: `GATHERED` gathers
the shards into whole CPU tensors on the main process for saving, and `SCATTERED` cuts a loaded
checkpoint's whole tensors into this process's shards, with the optimizer state keyed by parameter
name, so a run may be resumed with the other sharding or with another number of processes. With one
process both are the plain module.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from hmar.train.distributed import Processes
from hmar.transformer import AdaLNBlock


# Saving: whole tensors in CPU memory on the main process; the others get empty dicts.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Loading: every process holds the whole (memory-mapped) checkpoint and keeps its own part of it.
SCATTERED = StateDictOptions(full_state_dict=True)


def keyed_by_name(state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name, as `SCATTERED` loading reads it. `state` may
    also be in torch's own layout (`Optimizer.state_dict()`), which numbers the parameters in the
    optimizer's order instead."""
    names = {p: n for n, p in module.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]

    def name(key: int | str) -> str:
        return order[key] if isinstance(key, int) else key
    return {"state": {name(k): v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [name(k) for k in group["params"]]} for group in state["param_groups"]]}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it); others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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
