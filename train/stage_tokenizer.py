"""Tokenizer stage: train the multi-scale VQ-VAE on a new domain, from images alone.

Loss: mean squared reconstruction error plus the VQ loss of `MultiScaleVQVAE.forward` (codes pulled
to the encoder's features, features committed to their codes with weight beta). Code usage per
scale is logged; every `dead_code_every` steps, codes whose usage (EMA of hits per batch, summed
over scales) fell below `dead_code_threshold` are restarted at random encoder feature vectors of the
current batch (chosen on the main process and broadcast). Writes `<out>/tokenizer`.

Starting from an existing tokenizer (`init`), `train_part="decoder"` fine-tunes only what turns f̂
into an image (the decoder and the convolution before it) by reconstruction error: the encoder, its
convolution and the code book stay frozen, so every image keeps its token codes and a transformer
trained on them stays valid. No dead-code restarts then (they would move codes). `fresh_decoder`
starts that side from a new initialisation: a decoder whose weights already carry a habit (such as a
spike that a normalisation with fewer groups no longer needs) keeps it when fine-tuned.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hmar.config import TokenizerConfig
from hmar.errors import ConfigError
from hmar.policy import KernelPolicy
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import BatchOrder, ImageFolder, image_batches, load_training_image, with_readable
from hmar.train.distributed import Processes
from hmar.train.loop import Stage, StepInputs
from hmar.train.model_folders import load_tokenizer, tokenizer_files, write_tokenizer_folder
from hmar.train.options import TokenizerTrainConfig

TOKENIZER_FOLDER = "tokenizer"
PREVIEW_IMAGES = 8
DECODER_SIDE = ("decoder", "post_quant_conv")  # what train_part "decoder" trains
# settings a run started from an existing tokenizer may change: neither the weights' shapes nor the codes depend on them
CHANGEABLE_FROM_INIT = ("decoder_norm_groups", "beta")


class ReconstructionObjective(nn.Module):
    def __init__(self, tokenizer: MultiScaleVQVAE):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor):
        reconstruction, vq_loss, usage = self.tokenizer(images)
        reconstruction_loss = F.mse_loss(reconstruction.float(), images)
        numbers = {"reconstruction": reconstruction_loss.detach(), "vq": vq_loss.detach(), "usage_per_scale": usage.detach()}
        return reconstruction_loss + vq_loss, numbers


class DecoderObjective(nn.Module):
    """Reconstruction error of the decoder from the frozen encoder's f̂ (as `encode` and
    `decode_tokens` compute it at inference)."""

    def __init__(self, tokenizer: MultiScaleVQVAE):
        super().__init__()
        self.tokenizer = tokenizer
        tokenizer.requires_grad_(False)
        for name in DECODER_SIDE:
            getattr(tokenizer, name).requires_grad_(True)

    def forward(self, images: torch.Tensor):
        with torch.no_grad():
            f_hat = self.tokenizer.tokens_to_f_hat(self.tokenizer.encode(images))
        reconstruction = self.tokenizer.decoder(self.tokenizer.post_quant_conv(f_hat))
        loss = F.mse_loss(reconstruction.float(), images)
        return loss, {"reconstruction": loss.detach()}


def initial_tokenizer(init: Path, config: TokenizerConfig) -> MultiScaleVQVAE:
    """The tokenizer of folder `init` built with `config`, which may differ from the folder's only in
    CHANGEABLE_FROM_INIT."""
    folder_config, _ = tokenizer_files(init)
    differing = [f.name for f in dataclasses.fields(TokenizerConfig)
                 if f.name not in CHANGEABLE_FROM_INIT and getattr(folder_config, f.name) != getattr(config, f.name)]
    if differing:
        raise ConfigError(f"the tokenizer config differs from the one of --init {init} in {', '.join(differing)}; "
                          f"starting from it, only {' and '.join(CHANGEABLE_FROM_INIT)} may change")
    return load_tokenizer(init, config).train()


class TokenizerStage(Stage):
    name = "tokenizer"

    def __init__(self, config: TokenizerTrainConfig, procs: Processes):
        self.config, self.procs = config, procs
        # the tokenizer trains on PyTorch's modules: the policy decides compilation and autocast
        self.policy = KernelPolicy.choose(procs.device, training=True, compile=config.compile, cuda_graph=False,
                                          precision=config.precision, world_size=procs.world_size)
        self.folder = ImageFolder.scan(config.data)
        torch.manual_seed(config.seed)  # same initial weights on every process
        tokenizer = MultiScaleVQVAE(config.model)
        if config.init is not None:
            fresh, tokenizer = tokenizer, initial_tokenizer(config.init, config.model)
            if config.fresh_decoder:
                for name in DECODER_SIDE:
                    getattr(tokenizer, name).load_state_dict(getattr(fresh, name).state_dict())
        self.tokenizer = tokenizer.to(procs.device)
        self.decoder_only = config.train_part == "decoder"
        self.objective = DecoderObjective(self.tokenizer) if self.decoder_only else ReconstructionObjective(self.tokenizer)
        self.order = BatchOrder(len(self.folder), config.batch_size, config.seed, procs.rank, procs.world_size)
        self.restarted = 0
        self._preview: torch.Tensor | None = None

    def batches(self, start: int) -> Iterator[StepInputs]:
        batches = image_batches(self.folder, self.config.model.image_size, self.order, start, self.config.steps, self.config.num_workers)
        for batch, readable in with_readable(batches, start, self.folder.root, lambda b: b.labels.numel() == 0):
            images = readable.images
            yield StepInputs((images.to(self.procs.device, non_blocking=True),), images.shape[0], batch.skipped)

    @torch.no_grad()
    def after_step(self, step: int, inputs: StepInputs) -> None:
        every = self.config.dead_code_every
        if self.decoder_only or not every or step % every:
            return
        quantize = self.tokenizer.quantize
        dead = quantize.ema_vocab_hit_SV.sum(dim=0) < self.config.dead_code_threshold
        if self.procs.active:  # decide on the main process, restart everywhere alike
            dist.broadcast(dead, src=0)
        count = int(dead.sum())
        if count == 0:
            return
        features = self.tokenizer.features(inputs.tensors[0]).float()
        vectors = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        picks = torch.randint(0, vectors.shape[0], (count,), device=vectors.device)
        codes = quantize.embedding.weight
        codes[dead] = vectors[picks].to(codes.dtype)
        alive = quantize.ema_vocab_hit_SV[:, ~dead]
        quantize.ema_vocab_hit_SV[:, dead] = alive.mean(dim=1, keepdim=True) if alive.numel() else 1.0
        if self.procs.active:
            dist.broadcast(codes, src=0)
            dist.broadcast(quantize.ema_vocab_hit_SV, src=0)
        self.restarted += count

    def extra_state(self) -> dict[str, Any]:
        return {"recorded_batches": self.tokenizer.quantize.recorded_batches, "restarted_codes": self.restarted}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.tokenizer.quantize.recorded_batches = int(state["recorded_batches"])
        self.restarted = int(state["restarted_codes"])

    def sample_images(self) -> torch.Tensor:
        """Originals (first row) over their reconstructions (second row)."""
        if self._preview is None:
            size = self.config.model.image_size
            picks = [load_training_image(f, size, False) for f in self.folder.files[:: max(1, len(self.folder) // PREVIEW_IMAGES)]]
            self._preview = torch.stack([p for p in picks if p is not None][:PREVIEW_IMAGES]).to(self.procs.device)
        reconstruction = self.tokenizer.decode_tokens(self.tokenizer.encode(self._preview))
        return torch.cat((self._preview, reconstruction)).add(1).mul(0.5)

    def export(self, state: dict[str, torch.Tensor]) -> Path:
        return write_tokenizer_folder(self.config.out / TOKENIZER_FOLDER, self.tokenizer, {k.removeprefix("tokenizer."): v for k, v in state.items()}, self.config.export_dtype)
