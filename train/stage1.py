"""Stage 1: Markovian next-scale prediction.

All scales run as one sequence: scale 0 sees the class, scale k ≥ 1 sees f̂ of the scales before it
downsampled to its size (teacher forcing with the ground-truth tokens), and attention stays inside a
scale (block-diagonal: the Triton kernel on CUDA, per-scale SDPA elsewhere). Labels are dropped to
the null class with probability cond_drop_rate for classifier-free guidance. The loss weights the
scales (log-normal by default, see `hmar.train.losses`). Writes `<out>/model`, a model folder that
samples with one step per scale (its mask branch is trained in stage 2).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from hmar.attention import AttentionFn
from hmar.checkpoints import build_models
from hmar.config import ModelConfig, TransformerConfig, transformer_preset
from hmar.policy import KernelPolicy
from hmar.sampler import make_generator, sample
from hmar.schedule import one_step_per_scale
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import BatchOrder, ImageFolder
from hmar.train.distributed import Processes
from hmar.train.loop import Stage, StepInputs
from hmar.train.losses import LOGITS_PER_CHUNK, next_scale_loss, scale_weights, score_features
from hmar.train.model_folders import load_tokenizer, write_model_folder
from hmar.train.options import Stage1Config
from hmar.train.token_batches import token_batches
from hmar.transformer import HMAR, ScaleTransformer

MODEL_FOLDER = "model"
# HMAR's mask branch: untouched in stage 1 (stage 2 starts it from the next-scale branch)
MASK_BRANCH = ("mask_blocks", "mask_head_nm", "mask_head", "mask_embed")
PREVIEW_IMAGES = 16


class NextScaleObjective(nn.Module):
    """The transformer plus its stage-1 loss, as one module (so DDP sees a forward call). The logits
    head runs inside the loss, a chunk of tokens at a time (`score_features`). `attention` None: the
    model's kernel policy's."""

    def __init__(self, model: ScaleTransformer, attention: AttentionFn | None, weights: torch.Tensor, logits_per_chunk: int = LOGITS_PER_CHUNK):
        super().__init__()
        self.model, self.attention, self.logits_per_chunk = model, attention, logits_per_chunk
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor, targets: torch.Tensor):
        features = self.model.forward_next_scale_features(labels, teacher_input, self.attention)
        scores = score_features(features, self.model.next_scale_head, targets, self.logits_per_chunk)
        loss, stats = next_scale_loss(scores, self.weights, self.model.patch_nums)
        return loss, {"loss_per_scale": stats.loss, "acc_per_scale": stats.accuracy}


def freeze_mask_branch(model: ScaleTransformer) -> None:
    """Stage 1 trains the trunk and the next-scale branch; HMAR's mask branch waits for stage 2."""
    if isinstance(model, HMAR):
        for name in MASK_BRANCH:
            getattr(model, name).requires_grad_(False)


def transformer_config(model: str | TransformerConfig, num_classes: int, cond_drop_rate: float) -> TransformerConfig:
    config = transformer_preset(model) if isinstance(model, str) else model
    return dataclasses.replace(config, num_classes=num_classes, cond_drop_rate=cond_drop_rate)


@torch.no_grad()
def teacher_inputs(tokenizer: MultiScaleVQVAE, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing input (B, L − pn₀², Cvae) and targets (B, L) of a token batch."""
    return tokenizer.teacher_forcing_input(list(tokens)), torch.cat(list(tokens), dim=1)


def preview_samples(tokenizer: MultiScaleVQVAE, model: ScaleTransformer, device: torch.device, mask_refinement: bool, schedule) -> torch.Tensor:
    """A fixed-seed sample of each class (up to PREVIEW_IMAGES), cycling through the classes."""
    labels = torch.arange(PREVIEW_IMAGES, device=device) % model.num_classes
    return sample(tokenizer, model, labels, schedule, generator=make_generator(0, device), mask_refinement=mask_refinement).images


class Stage1(Stage):
    name = "stage1"

    def __init__(self, config: Stage1Config, procs: Processes):
        self.config, self.procs = config, procs
        # the step has fixed shapes and reads nothing on the host, so it may be replayed as a CUDA graph
        self.policy = KernelPolicy.choose(procs.device, training=True, compile=config.compile, cuda_graph=config.cuda_graph,
                                          attention=config.attention, precision=config.precision, world_size=procs.world_size)
        self.folder = ImageFolder.scan(config.data)
        self.tokenizer = load_tokenizer(config.tokenizer).to(procs.device).requires_grad_(False)
        transformer = transformer_config(config.model, self.folder.num_classes, config.cond_drop_rate)
        self.model_config = ModelConfig(self.tokenizer.config, transformer, class_names=self.folder.class_names)
        torch.manual_seed(config.seed)  # same initial weights on every process
        model = build_models(self.model_config)[1].to(procs.device)
        model.set_policy(self.policy)
        freeze_mask_branch(model)
        patch_nums = self.tokenizer.patch_nums
        weights = scale_weights(config.loss_weighting, patch_nums, config.lognormal_mu, config.lognormal_sigma, config.exp_decay_rate)
        self.objective = NextScaleObjective(model, None, weights.to(procs.device))
        self.order = BatchOrder(len(self.folder), config.batch_size, config.seed, procs.rank, procs.world_size)

    def batches(self, start: int) -> Iterator[StepInputs]:
        for batch in token_batches(self.folder, self.tokenizer, self.order, self.procs, start, self.config.steps, self.config.token_cache, self.config.num_workers):
            teacher, targets = teacher_inputs(self.tokenizer, batch.tokens)
            yield StepInputs((batch.labels, teacher, targets), batch.labels.numel(), batch.skipped)

    def sample_images(self) -> torch.Tensor:
        return preview_samples(self.tokenizer, self.objective.model, self.procs.device, False, one_step_per_scale(self.tokenizer.patch_nums))

    def export(self, state: dict[str, torch.Tensor]) -> Path:
        transformer_state = {k.removeprefix("model."): v for k, v in state.items()}
        sampling = {"steps": len(self.tokenizer.patch_nums)}  # one step per scale until stage 2
        config = dataclasses.replace(self.model_config, sampling=sampling)
        return write_model_folder(self.config.out / MODEL_FOLDER, config, self.tokenizer.state_dict(), transformer_state, self.config.export_dtype)

