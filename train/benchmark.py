"""`hmar bench train`: a stage-1 training step of HMAR and of VAR, same depth and width (random
weights), timed alternately in one run (`hmar.benchmark.compare`).

The step is the trainer's own (`hmar.train.loop.train_step`, `build_optimizer`) under the kernel
policy the trainer chooses (`hmar.policy`): stage 1's objective with the mask branch frozen, on CUDA
bf16 autocast, the Triton kernels, gradient clipping and fused AdamW, blocks compiled
(`hmar.compile`) and the whole step replayed as one CUDA graph on one CUDA device, as
`hmar train stage1` takes it there — VAR's too, so that the two are compared alike.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from hmar.attention import AttentionFn
from hmar.benchmark import BenchRow, Workload, bench_config, compare, forward_flops
from hmar.checkpoints import build_models
from hmar.compile import compile_blocks
from hmar.config import COMPILE_MODES, ModelConfig, TokenizerConfig
from hmar.cuda_graph import TRAIN_GRAPH_WARMUP, GraphedTrainStep
from hmar.policy import KernelPolicy
from hmar.train.loop import build_optimizer, train_step
from hmar.train.losses import next_scale_loss, scale_weights, score_logits
from hmar.train.options import Stage1Config
from hmar.train.stage1 import NextScaleObjective, freeze_mask_branch
from hmar.transformer import ScaleTransformer

# "chunked": the trainer's loss (logits head applied a chunk of tokens at a time); "logits": all
# float32 logits at once, to measure what the chunking saves.
LOSS_PATHS = ("chunked", "logits")


class AllLogitsObjective(nn.Module):
    """Stage 1's loss from all logits at once (the "logits" path): same value as `NextScaleObjective`."""

    def __init__(self, model: ScaleTransformer, attention: AttentionFn | None, weights: torch.Tensor):
        super().__init__()
        self.model, self.attention = model, attention
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor, targets: torch.Tensor):
        logits = self.model.forward_next_scale(labels, teacher_input, self.attention)
        loss, _ = next_scale_loss(score_logits(logits, targets), self.weights, self.model.patch_nums)
        return loss, {}


def stage1_objective(transformer: ScaleTransformer, attention: AttentionFn | None, weights: torch.Tensor, loss: str = "chunked") -> nn.Module:
    """Stage 1's objective, forward(labels, teacher input, targets) -> (loss, logged numbers), by loss
    path; `attention` None: the model's kernel policy's."""
    if loss not in LOSS_PATHS:
        raise ValueError(f"unknown loss path {loss!r}; expected one of {LOSS_PATHS}")
    objective = NextScaleObjective if loss == "chunked" else AllLogitsObjective
    return objective(transformer, attention, weights)


def train_step_fn(config: ModelConfig, batch_size: int, device: torch.device, policy: KernelPolicy | None = None, loss: str = "chunked",
                  compile_mode: str | None = None) -> Workload:
    """The trainer's stage-1 step on random tokens of `config`'s shapes, with Stage1Config's defaults
    (loss weighting, learning rate, betas, weight decay, clipping), under the kernel `policy` (None:
    the reference): its attention, kernels and autocast; blocks compiled when it says so (in
    Inductor's `compile_mode`); the whole step replayed as a CUDA graph when it says so
    (`GraphedTrainStep`, CUDA only)."""
    policy = KernelPolicy.reference() if policy is None else policy
    cuda_graph = policy.cuda_graph
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"a CUDA-graph training step needs a CUDA device, not {device}")
    defaults = Stage1Config
    _, transformer = build_models(config)
    transformer.to(device).train()
    transformer.set_policy(policy)
    freeze_mask_branch(transformer)
    weights = scale_weights(defaults.loss_weighting, config.patch_nums, defaults.lognormal_mu, defaults.lognormal_sigma,
                            defaults.exp_decay_rate).to(device)
    objective = stage1_objective(transformer, None, weights, loss)
    if policy.compile:
        compile_blocks(objective, mode=None if compile_mode in (None, "default") else compile_mode)
    L, first = sum(p * p for p in config.patch_nums), config.patch_nums[0] ** 2
    labels = torch.randint(0, config.transformer.num_classes, (batch_size,), device=device)
    teacher = torch.randn(batch_size, L - first, config.tokenizer.z_channels, device=device)
    targets = torch.randint(0, config.tokenizer.vocab_size, (batch_size, L), device=device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(objective, device, defaults.lr, defaults.weight_decay, defaults.betas, capturable=cuda_graph)
    def step():
        return train_step(objective, optimizer, params, (labels, teacher, targets), device, policy.amp_dtype is not None, defaults.grad_clip,
                          cache_casts=not cuda_graph)

    def resident() -> Iterator[torch.Tensor]:
        yield from objective.parameters()
        yield from objective.buffers()
        yield from (t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))

    if not cuda_graph:
        return Workload(step, resident)
    graphed = GraphedTrainStep(step, device)
    return Workload(graphed, resident, lambda: graphed.memory_bytes)


def bench_train(
    tokenizer: TokenizerConfig, depth: int, batch_size: int, device: torch.device, width: int | None = None,
    warmup: int = 3, iters: int = 10, attention: str = "auto", loss: str = "chunked", compile: bool | None = None,
    profile: bool = False, compile_mode: str = "default", cuda_graph: bool | None = None, kernels: KernelPolicy | None = None,
) -> list[BenchRow]:
    """HMAR vs VAR training steps under the kernel policy the trainer chooses (`KernelPolicy.choose`)
    from `attention` (auto: the Triton kernel on CUDA), `compile` (both families' blocks; None: on
    CUDA) and `cuda_graph` (each family's whole step as one graph; None: on CUDA), or under `kernels`
    when given. `loss`: `LOSS_PATHS`; `compile_mode`: Inductor's (`COMPILE_MODES`); `profile`: also
    profile a few steps of each family (`BenchRow.profile`)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
    if kernels is None:
        kernels = KernelPolicy.choose(device, training=True, compile=compile, cuda_graph=cuda_graph, attention=attention)
    configs = {f: bench_config(f, depth, width, tokenizer) for f in ("hmar", "var")}
    workloads = {f: train_step_fn(c, batch_size, device, kernels, loss, compile_mode) for f, c in configs.items()}
    # a training step is about three forwards' worth of matrix multiplies (forward, two in backward)
    flops = {f: 3 * forward_flops(c, batch_size) for f, c in configs.items()}
    warmup = max(warmup, TRAIN_GRAPH_WARMUP + 1) if kernels.cuda_graph else warmup
    return compare("train", workloads, {f: f for f in workloads}, batch_size, device, warmup, iters, flops, kernels, profile)
