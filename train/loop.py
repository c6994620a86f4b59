"""The training loop every stage shares, and the contract a stage fills in.

A stage supplies an objective module (forward(*inputs) → (loss, logged numbers)), the batches of
each step, and what to write at the end. The loop owns the rest: the run folder, AdamW (fused on
CUDA) with warm-up + cosine decay, bf16 autocast on CUDA, gradient clipping, optional EMA, DDP or
FSDP (`hmar.train.sharding`), checkpoints every N steps and on SIGTERM/SIGINT, resume, metrics,
progress, sample grids, and a clear error when a batch does not fit in memory.

Random numbers are reseeded from (seed, step, rank) before every step: with the data order (also a
function of the step) that makes a resumed run repeat an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_optimizer_state_dict

from hmar.compile import compile_blocks, eager
from hmar.cuda_graph import GraphedTrainStep
from hmar.policy import KernelPolicy
from hmar.train.checkpoint import CHECKPOINT, SAMPLES, StopRequest, check_run_folder, load_checkpoint, save_checkpoint, start_run_folder
from hmar.train.data import BatchOrder
from hmar.train.distributed import Processes
from hmar.train.ema import ParameterEMA
from hmar.train.errors import TrainingError, TrainingInterrupted
from hmar.train.images import save_grid
from hmar.train.lr_schedule import build_scheduler, warmup_cosine
from hmar.train.metrics import MetricsLog, ProgressBar, Throughput
from hmar.train.options import TrainConfig
from hmar.train.sharding import GATHERED, SCATTERED, Sharding, keyed_by_name, whole

StepCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class StepInputs:
    tensors: tuple  # the objective's positional inputs, on the device
    images: int  # images in this process's batch
    skipped: int = 0  # unreadable images left out of it


@dataclass
class RunResult:
    out: Path
    steps: int
    exported: Path  # the model / tokenizer folder written at the end
    last_metrics: dict[str, Any] = field(default_factory=dict)


class Stage:
    """What a stage provides to `train`. Subclasses set `name`, `config`, `procs`, `policy`, `objective`, `order`."""

    name: str
    config: TrainConfig
    procs: Processes
    # The kernel policy its models run with, which also says whether the loop compiles the blocks,
    # uses bf16 autocast and replays the step as one CUDA graph (`hmar.cuda_graph.GraphedTrainStep`:
    # only for a step with fixed shapes that reads nothing on the host).
    policy: KernelPolicy
    objective: nn.Module
    order: BatchOrder

    def batches(self, start: int) -> Iterator[StepInputs]:
        raise NotImplementedError

    def after_step(self, step: int, inputs: StepInputs) -> None:
        """Hook after the optimiser step `step` (1-based), e.g. dead-code restarts."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def sample_images(self) -> torch.Tensor:
        """A few images in [0, 1] showing what the model does now (samples or reconstructions)."""
        raise NotImplementedError

    def export(self, state: dict[str, torch.Tensor]) -> Path:
        """Write the final artefact from the objective's state dict (the EMA's when enabled)."""
        raise NotImplementedError


def seed_step(seed: int, step: int, rank: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def build_optimizer(module: nn.Module, device: torch.device, lr: float, weight_decay: float, betas: tuple[float, float],
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fused on CUDA; weight decay on matrices only). A
    `capturable` one can be replayed in a CUDA graph: it reads its learning rate from a tensor, which
    the schedule fills."""
    return torch.optim.AdamW(_param_groups(module, weight_decay), lr=torch.tensor(lr, device=device) if capturable else lr,
                             betas=betas, fused=device.type == "cuda", capturable=capturable)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], tensors: tuple, device: torch.device,
               bf16: bool, grad_clip: float, cache_casts: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One optimizer step of every stage (and of `hmar bench train`): forward under bf16 autocast
    when `bf16`, backward, gradient clipping of `params` (when `grad_clip` > 0), the optimizer step.
    Returns (loss, logged numbers, gradient norm or None). `model(*tensors)` returns (loss, numbers);
    a step replayed as a CUDA graph passes `cache_casts=False` (the graph must not keep autocast's
    cached casts: they are freed when the context exits)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache_casts):
        loss, numbers = model(*tensors)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    optimizer.step()
    return loss.detach(), numbers, grad_norm


def _flatten(numbers: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for name, value in numbers.items():
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/scale_{k}": float(v) for k, v in enumerate(value.tolist())})
    return out


def train(stage: Stage, on_step: StepCallback | None = None) -> RunResult:
    config, procs = stage.config, stage.procs
    if stage.policy.cuda_graph and (procs.device.type != "cuda" or procs.world_size > 1):
        raise TrainingError(f"--cuda-graph needs one training process on a CUDA device, not {procs.world_size} on {procs.device}")
    _open_run_folder(config, stage.policy, procs)
    run = _Run(stage)
    start = run.resume() if config.resume else 0
    last = _loop(run, start, on_step)
    return run.finish(last)


def _open_run_folder(config: TrainConfig, policy: KernelPolicy, procs: Processes) -> None:
    # run.json also records the kernel policy the run started with (a resume may run another).
    options = {**config.as_dict(), "kernels": policy.as_dict()}
    check_run_folder(config.out, options, config.resume)
    procs.barrier()  # every process has checked before the main one writes
    if procs.is_main and not config.resume:
        start_run_folder(config.out, options)
    procs.barrier()


class _Run:
    """What one training run holds between steps: the wrapped model, the optimizer and its schedule,
    the EMA, and how the model is sharded and compiled. Its methods are the things done to them."""

    def __init__(self, stage: Stage):
        self.stage, self.config, self.procs, self.objective = stage, stage.config, stage.procs, stage.objective
        self.graphed = stage.policy.cuda_graph
        config, procs, objective = self.config, self.procs, self.objective
        self.bf16 = stage.policy.amp_dtype is not None
        self.sharding = Sharding(config.sharding, procs, self.bf16)
        self.compiled = stage.policy.compile
        if self.compiled:
            compile_blocks(objective)
        self.model = self.sharding.wrap(objective)  # before the optimizer and EMA: FSDP replaces the parameters
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(objective, procs.device, config.lr, config.weight_decay, config.betas, capturable=self.graphed)
        self.scheduler = build_scheduler(self.optimizer, config.steps, config.warmup_steps, config.min_lr_ratio)
        self.ema = ParameterEMA(objective, config.ema_decay) if config.ema_decay > 0 else None
        self.run_step = _GraphedSteps(self.eager_step, procs.device) if self.graphed else self.eager_step

    def resume(self) -> int:
        """Load the run folder's checkpoint into this run; returns the step it continues from."""
        config, procs, optimizer, scheduler = self.config, self.procs, self.optimizer, self.scheduler
        state = load_checkpoint(config.out / CHECKPOINT)
        # the stored groups say how the checkpoint's run stepped (fused on CUDA, in a CUDA graph), not this one
        stepping = [{k: group[k] for k in ("fused", "capturable")} for group in optimizer.param_groups]
        # one part at a time, popped: loading leaves device copies of the whole tensors in the dict it reads
        set_model_state_dict(self.objective, state.pop("model"), options=SCATTERED)
        set_optimizer_state_dict(self.objective, optimizer, keyed_by_name(state.pop("optimizer"), self.objective, optimizer), options=SCATTERED)
        scheduler.load_state_dict(state["scheduler"])
        # the stored learning rate came from the old total; --resume may change `steps`
        for group, own, base in zip(optimizer.param_groups, stepping, scheduler.base_lrs):
            group.update(own)
            value = float(base) * warmup_cosine(scheduler.last_epoch, config.steps, config.warmup_steps, config.min_lr_ratio)
            group["lr"] = torch.tensor(value, device=procs.device) if self.graphed else value
        if self.ema is not None:
            self.ema.load_state_dict(state.pop("ema"))
        self.stage.load_extra_state(state["extra"])
        return int(state["step"])

    def eager_step(self, tensors: tuple, cache_casts: bool = True):
        return train_step(self.model, self.optimizer, self.params, tensors, self.procs.device, self.bf16, self.config.grad_clip, cache_casts)

    def step(self, tensors: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """One optimizer step, the schedule and the EMA after it; returns (loss, numbers, grad_norm)."""
        try:
            result = self.run_step(tensors)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise TrainingError(
                    f"out of memory at batch size {self.config.batch_size} per process on {self.procs.device}: lower --batch-size "
                    f"(the global batch is batch size x processes, so more GPUs keep it), or use a smaller model"
                ) from None
            raise
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.objective)
        return result

    def checkpoint(self, step: int) -> None:
        model, optimizer = get_state_dict(self.objective, self.optimizer, options=GATHERED)
        ema = self.ema.state_dict() if self.ema else {}
        if self.procs.is_main:
            save_checkpoint(self.config.out / CHECKPOINT, {"step": step, "model": model, "optimizer": optimizer, "ema": ema,
                                                           "scheduler": self.scheduler.state_dict(), "extra": self.stage.extra_state()})
        self.procs.barrier()

    def write_samples(self, path: Path) -> None:
        if self.procs.is_main or self.sharding.sharded:  # a sharded model samples on every process
            _write_samples(self.stage, path, self.compiled, self.sharding)

    def finish(self, last: dict[str, Any]) -> RunResult:
        """The final sample grid and the exported weights (the EMA's when there is one)."""
        out = self.config.out
        self.write_samples(out / SAMPLES / "final.png")
        final = get_model_state_dict(self.objective, options=GATHERED)
        if self.ema is not None:
            final = self.ema.averaged_state(final)
        exported = self.stage.export(final) if self.procs.is_main else out
        self.procs.barrier()
        return RunResult(out, self.config.steps, exported, last)


def _loop(run: _Run, start: int, on_step: StepCallback | None) -> dict[str, Any]:
    """Steps `start` .. config.steps with logging, samples and checkpoints; returns the last logged row."""
    stage, config, procs, out = run.stage, run.config, run.procs, run.config.out
    log = MetricsLog(out, start if config.resume else None) if procs.is_main else None
    speed, skipped, last = Throughput(), 0, {}
    run.objective.train()
    # closing: however the loop ends, the batch generators finish now, and with them any DataLoader
    # workers (they ignore stop signals, so they must be told to exit)
    with StopRequest() as stop, ProgressBar(config.progress and procs.is_main, stage.name, config.steps, start) as bar, \
            contextlib.closing(stage.batches(start)) as batches:
        for step in range(start, config.steps):
            inputs = next(batches)
            seed_step(config.seed, step, procs.rank)
            loss, numbers, grad_norm = run.step(inputs.tensors)
            done = step + 1
            stage.after_step(done, inputs)
            speed.add(inputs.images * procs.world_size)
            skipped += inputs.skipped

            if done % config.log_every == 0 or done == config.steps:
                last = _log_row(run, done, loss, numbers, grad_norm, speed, skipped)
                if log is not None:
                    log.write(last)
                bar.update(done, last["loss"], last["images_per_s"])
                if on_step is not None:
                    on_step(done, last)
            else:
                bar.update(done)

            if config.sample_every and done % config.sample_every == 0:
                run.write_samples(out / SAMPLES / f"step_{done:07d}.png")
            stopping = procs.any(stop.requested is not None)
            if done % config.checkpoint_every == 0 or done == config.steps or stopping:
                run.checkpoint(done)
            if stopping and done < config.steps:
                raise TrainingInterrupted(f"stopped by {stop.requested or 'a signal'} after step {done}; checkpoint saved in {out}, continue with --resume",
                                         stop.requested)
    return last


def _log_row(run: _Run, done: int, loss: torch.Tensor, numbers: dict[str, torch.Tensor], grad_norm: torch.Tensor | None,
             speed: Throughput, skipped: int) -> dict[str, Any]:
    """One metrics row: the step's numbers averaged over processes, with the schedule and throughput."""
    procs = run.procs
    numbers = {"loss": loss, **numbers}
    if grad_norm is not None:
        numbers["grad_norm"] = whole(grad_norm)
    averaged = {k: procs.mean(v) for k, v in numbers.items()}
    return {"step": done, "lr": float(run.scheduler.get_last_lr()[0]), "images_per_s": speed.read(),
            "skipped_images": int(procs.total(torch.tensor(float(skipped))).item()),
            "epoch": run.stage.order.epoch_of(done), "time": time.time(), **_flatten(averaged)}


class _GraphedSteps:
    """Training steps replayed as one CUDA graph (`GraphedTrainStep`): each batch is copied into the
    graph's static input tensors first. A batch of another shape (one that lost unreadable images)
    takes an eager step instead."""

    def __init__(self, eager_step: Callable[..., tuple], device: torch.device):
        self.eager_step, self.static = eager_step, None
        # (a graph must not keep autocast's cached casts: they are freed when the context exits)
        self.graphed = GraphedTrainStep(lambda: eager_step(self.static, cache_casts=False), device)

    def __call__(self, tensors: tuple) -> tuple:
        if self.static is None:
            self.static = tuple(t.clone() for t in tensors)
        elif [t.shape for t in tensors] != [t.shape for t in self.static]:
            return self.eager_step(tensors)
        else:
            for static, t in zip(self.static, tensors):
                static.copy_(t)
        return self.graphed()


def _write_samples(stage: Stage, path: Path, compiled: bool, sharding: Sharding) -> None:
    stage.objective.eval()
    with torch.no_grad(), (eager() if compiled else contextlib.nullcontext()), sharding.whole_model(stage.objective):
        images = stage.sample_images()
    if stage.procs.is_main:
        save_grid(images, path)
    stage.objective.train()
