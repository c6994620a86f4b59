"""One process or many: the same training code under `python`, `torchrun` on one machine, or many.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; with more than one process we join a process group
(NCCL on CUDA, gloo on the CPU); `hmar.train.sharding` then replicates (DDP) or shards (FSDP) the
trained module over it. Alone, every collective here is a no-op.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hmar.pipeline import resolve_device


@dataclass
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we started the process group, so we end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over the processes (a copy, on this process's device)."""
        tensor = tensor.detach().to(self.device, torch.float32).clone()
        if self.active:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to(self.device, torch.float32).clone()
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (e.g. a stop signal seen by one rank first)."""
        return bool(self.total(torch.tensor(float(flag))).item() > 0)

    def close(self, together: bool = True) -> None:
        """End the process group if this process started it. `together`: every process ended the run
        the same way, so they wait for each other first (a process that failed alone must not wait
        for others that may never come)."""
        if not (self.owns_group and dist.is_initialized()):
            return
        # FSDP's and DTensor's state sits in reference cycles with the modules it wraps and holds this
        # group's communicators. Left to the interpreter's finalisation, a gloo group goes with its
        # worker threads still running and the process aborts ("terminate called without an active
        # exception", SIGABRT) after its work is done. Collected here, the group's last references go
        # with `destroy_process_group`, which joins its threads while Python still runs.
        gc.collect()
        if together:
            dist.barrier()  # no process takes its connections down while another may still use them
        dist.destroy_process_group()


def _device(option: str, local_rank: int) -> torch.device:
    # The engine's rules and messages, then a bare CUDA device becomes this process's own card.
    device = resolve_device(option)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_option: str = "auto") -> Processes:
    """This process's place in the run, joining the process group when torchrun started several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        owns = True
    return Processes(rank, world_size, local_rank, device, owns)
