"""Stage 2: masked-prediction fine-tuning of HMAR's mask branch.

Starts from a stage-1 model folder, copies the next-scale branch into the mask branch, and freezes
everything else (trunk, next-scale branch, embeddings). For every sample and scale k ≥ 1 a mask
ratio γ ~ U(0, 1) picks ⌈γ·pn²⌉ random tokens (at least one) to hide; the mask branch sees f̂ of the
earlier scales plus the scale's visible tokens and predicts the hidden ones. The loss is the plain
mean cross entropy over the hidden tokens. Writes `<out>/model`, a model folder with both branches.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from hmar.attention import AttentionFn
from hmar.errors import ConfigError, InputError
from hmar.policy import KernelPolicy
from hmar.schedule import resolve_schedule
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import BatchOrder, ImageFolder
from hmar.train.distributed import Processes
from hmar.train.loop import Stage, StepInputs
from hmar.train.losses import LOGITS_PER_CHUNK, masked_token_loss, score_features
from hmar.train.model_folders import load_model_folder, write_model_folder
from hmar.train.options import Stage2Config
from hmar.train.stage1 import MASK_BRANCH, MODEL_FOLDER, preview_samples, teacher_inputs
from hmar.train.token_batches import token_batches
from hmar.transformer import HMAR

def draw_masks(batch: int, patch_nums: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, Σ pn²) bool over the given scales: per sample and scale, ⌈γ·pn²⌉ random positions, γ ~ U(0,1)."""
    parts = []
    for pn in patch_nums:
        l = pn * pn
        ratio = torch.rand(batch, 1, device=device)
        count = (ratio * l).ceil().clamp(1, l)
        rank = torch.rand(batch, l, device=device).argsort(dim=1).argsort(dim=1)
        parts.append(rank < count)
    return torch.cat(parts, dim=1)


class MaskedObjective(nn.Module):
    """The mask branch plus its loss; the logits head runs only on the masked tokens, in chunks.
    `attention` None: the model's kernel policy's."""

    def __init__(self, model: HMAR, attention: AttentionFn | None, logits_per_chunk: int = LOGITS_PER_CHUNK):
        super().__init__()
        self.model, self.attention, self.logits_per_chunk = model, attention, logits_per_chunk

    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor, scale_input: torch.Tensor, targets: torch.Tensor):
        rest = self.model.patch_nums[1:]
        masked = draw_masks(labels.shape[0], rest, labels.device)
        features = self.model.forward_masked_features(labels, teacher_input, scale_input, masked, self.attention)
        hidden = features[:, self.model.block_sizes[0]:][masked]
        scores = score_features(hidden, self.model.mask_head, targets[masked], self.logits_per_chunk)
        loss, stats = masked_token_loss(scores, masked, rest)
        numbers = {}
        for k in range(1, len(self.model.patch_nums)):  # scale 0 has no mask-branch input
            numbers[f"loss_per_scale/scale_{k}"] = stats.loss[k - 1]
            numbers[f"acc_per_scale/scale_{k}"] = stats.accuracy[k - 1]
        return loss, numbers


@torch.no_grad()
def own_scale_inputs(tokenizer: MultiScaleVQVAE, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, L − pn₀², Cvae): each scale k ≥ 1's own tokens as the mask branch sees them."""
    return torch.cat([tokenizer.scale_input(t, k).flatten(2).transpose(1, 2) for k, t in enumerate(tokens) if k > 0], dim=1)


class Stage2(Stage):
    name = "stage2"

    def __init__(self, config: Stage2Config, procs: Processes):
        self.config, self.procs = config, procs
        # no CUDA graph: the step indexes the masked tokens, a shape that depends on the draw
        self.policy = KernelPolicy.choose(procs.device, training=True, compile=config.compile, cuda_graph=False,
                                          attention=config.attention, precision=config.precision, world_size=procs.world_size)
        self.model_config, tokenizer, model = load_model_folder(config.init)
        if self.model_config.family != "hmar":
            raise ConfigError(f"stage 2 trains HMAR's mask branch; {config.init} holds a {self.model_config.family} model")
        self.folder = ImageFolder.scan(config.data)
        if self.model_config.class_names is not None and self.folder.class_names != self.model_config.class_names:
            raise InputError(f"the classes of {config.data} differ from those stage 1 was trained on ({config.init}); use the same data folder")
        self.tokenizer = tokenizer.to(procs.device).requires_grad_(False)
        model.init_mask_branch_from_next_scale()
        model.requires_grad_(False)
        for name in MASK_BRANCH:
            getattr(model, name).requires_grad_(True)
        model.set_policy(self.policy)
        self.objective = MaskedObjective(model.to(procs.device), None)
        self.order = BatchOrder(len(self.folder), config.batch_size, config.seed, procs.rank, procs.world_size)

    def batches(self, start: int) -> Iterator[StepInputs]:
        for batch in token_batches(self.folder, self.tokenizer, self.order, self.procs, start, self.config.steps, self.config.token_cache, self.config.num_workers):
            teacher, targets = teacher_inputs(self.tokenizer, batch.tokens)
            own = own_scale_inputs(self.tokenizer, batch.tokens)
            yield StepInputs((batch.labels, teacher, own, targets[:, self.objective.model.block_sizes[0]:]), batch.labels.numel(), batch.skipped)

    def sample_images(self) -> torch.Tensor:
        schedule = resolve_schedule(self.tokenizer.patch_nums, family="hmar")
        return preview_samples(self.tokenizer, self.objective.model, self.procs.device, True, schedule)

    def export(self, state: dict[str, torch.Tensor]) -> Path:
        transformer_state = {k.removeprefix("model."): v for k, v in state.items()}
        config = dataclasses.replace(self.model_config, files={}, sampling={})  # the published defaults
        return write_model_folder(self.config.out / MODEL_FOLDER, config, self.tokenizer.state_dict(), transformer_state, self.config.export_dtype)
