"""VAR's multi-scale residual VQ-VAE: images to token maps of K scales and back.

Encoding quantises the encoder's feature map f (B, Cvae, P, P) coarse to fine. At scale k the
residual f − f̂ is area-downsampled to pn_k × pn_k, each vector is replaced by its nearest code
(L2), and the code map is bicubic-upsampled back to P × P, passed through φ_k (a 3×3 conv blended
with the identity) and added to f̂. The final f̂ is what the decoder turns back into an image.

Generation runs the same accumulation from predicted tokens: `add_scale` is one step of it,
`downsample(f̂, k)` is what the transformers see as scale k's input, and `scale_input(tokens, k)`
is HMAR's mask-branch view of a scale's own tokens.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hmar.config import TokenizerConfig
from hmar.errors import ConfigError, InputError
from hmar.policy import KernelPolicy
from hmar.tokenizer_modules import Decoder, Encoder


@lru_cache(maxsize=64)
def bicubic_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """(dst, src) float32 matrix of 1-D bicubic interpolation from src to dst samples: the weights of
    `F.interpolate(mode="bicubic", align_corners=False)`, read off it (in float64) on an identity.
    Cached per device, so that sampling copies nothing from the host (a copy would wait for the GPU)."""
    eye = torch.eye(src, dtype=torch.float64).view(src, 1, src, 1)
    weights = F.interpolate(eye, size=(dst, 1), mode="bicubic").view(src, dst).T
    return weights.to(device=device, dtype=torch.float32).contiguous()


def bicubic_upsample(h: torch.Tensor, size: int) -> torch.Tensor:
    """`F.interpolate(h, (size, size), mode="bicubic")` of (B, C, n, n) as two small matrix products
    (bicubic is separable): the same numbers to float32 rounding, but fast on CUDA, whose bicubic
    kernel gives each thread one output pixel and loops over all B·C maps, so a batch of small maps
    runs serially per thread. Always float32, also under autocast."""
    weights = bicubic_weights(h.shape[-1], size, h.device)
    with torch.autocast(h.device.type, enabled=False):
        return weights @ h.float() @ weights.T


class Phi(nn.Conv2d):
    """φ: (1 − r)·h + r·conv3x3(h), the learned refinement of an upsampled code map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PartiallySharedPhi(nn.Module):
    """`share` φ convs serve all K scales; scale k uses the one whose tick is nearest k/(K−1)."""

    def __init__(self, channels: int, ratio: float, share: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(share))
        # VAR's tick positions: thirds at the ends for 4 shared convs, halves otherwise
        # (computed as numpy.linspace does: the middle scale lies exactly between two ticks and
        # float rounding decides which one it takes, so the arithmetic must match)
        margin = 1 / 3 / share if share == 4 else 1 / 2 / share
        step = ((1 - margin) - margin) / (share - 1)
        self.ticks = [i * step + margin for i in range(share - 1)] + [1 - margin]

    def at(self, position: float) -> Phi:
        distances = [abs(t - position) for t in self.ticks]
        return self.qresi_ls[distances.index(min(distances))]


class Quantizer(nn.Module):
    """The code book, the φ convs and the per-scale code usage statistics (`quantize.*` keys)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if config.share_quant_resi < 2:
            # VAR's fully shared (1) and per-scale (0) φ store their convs under other keys
            raise ConfigError(f"share_quant_resi={config.share_quant_resi} is not supported; use 2 or more (published: 4)")
        if abs(config.quant_resi) <= 1e-6:
            # VAR replaces φ by the identity then, and its checkpoints hold no φ weights
            raise ConfigError("quant_resi must be non-zero (published: 0.5)")
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        self.quant_resi = PartiallySharedPhi(config.z_channels, config.quant_resi, config.share_quant_resi)
        # exponential moving average of code hits per scale, kept for usage tracking in training
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(config.patch_nums), config.vocab_size))
        self.recorded_batches = 0  # not in the state dict, as in VAR: a resumed run restarts the warm-up

    @torch.no_grad()
    def record_hits(self, hits: torch.Tensor) -> None:
        """Fold one batch's code hits (K, V) into the EMA: copied at first, then momentum 0.9 for
        100 batches, 0.99 after (VAR's schedule, counted in batches rather than in scales)."""
        if self.recorded_batches == 0:
            self.ema_vocab_hit_SV.copy_(hits)
        else:
            keep, new = (0.9, 0.1) if self.recorded_batches < 100 else (0.99, 0.01)
            self.ema_vocab_hit_SV.mul_(keep).add_(hits.mul(new))
        self.recorded_batches += 1

    @torch.no_grad()  # argmin has no gradient: don't keep the (N, V) distance graph
    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of `vectors` (N, Cvae), by squared L2 distance."""
        codes = self.embedding.weight
        distances = vectors.square().sum(dim=1, keepdim=True) + codes.square().sum(dim=1)
        distances.addmm_(vectors, codes.T, alpha=-2, beta=1)
        return distances.argmin(dim=1)


class MultiScaleVQVAE(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.patch_nums = config.patch_nums
        z = config.z_channels
        self.encoder = Encoder(config.ch, config.ch_mult, config.num_res_blocks, z)
        self.decoder = Decoder(config.ch, config.ch_mult, config.num_res_blocks, z, norm_groups=config.decoder_norm_groups)
        self.quantize = Quantizer(config)
        self.quant_conv = nn.Conv2d(z, z, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z, z, 3, padding=1)
        self.decoder_memory_format = torch.contiguous_format  # see cast_decoder

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ---- the residual pyramid ----------------------------------------------------------------
    def phi(self, h: torch.Tensor, k: int) -> torch.Tensor:
        return self.quantize.quant_resi.at(k / max(self.num_scales - 1, 1))(h)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code embeddings of a token map (B, pn²) as (B, Cvae, pn, pn)."""
        B, l = tokens.shape
        pn = int(round(l**0.5))
        return self.quantize.embedding(tokens).transpose(1, 2).reshape(B, -1, pn, pn)

    def _upsample(self, h: torch.Tensor) -> torch.Tensor:
        P = self.patch_nums[-1]
        return h if h.shape[-1] == P else bicubic_upsample(h, P)

    def scale_residual(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """What scale k adds to f̂: φ_k of its code map upsampled to the last scale (B, Cvae, P, P)."""
        return self.phi(self._upsample(self.embed(tokens)), k)

    def add_scale(self, f_hat: torch.Tensor | None, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """f̂ after scale k (a new tensor); `f_hat` is None (or zeros) before the first scale."""
        residual = self.scale_residual(tokens, k)
        return residual if f_hat is None else f_hat + residual

    def downsample(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        pn = self.patch_nums[k]
        return f_hat if f_hat.shape[-1] == pn else F.interpolate(f_hat, size=(pn, pn), mode="area")

    def scale_input(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """HMAR's mask-branch view of scale k's own tokens: its residual at scale k's size."""
        return self.downsample(self.scale_residual(tokens, k), k)

    def tokens_to_f_hat(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The cumulative reconstruction f̂ (B, Cvae, P, P) of the token maps of scales 0..len-1."""
        f_hat = None
        for k, idx in enumerate(tokens):
            f_hat = self.add_scale(f_hat, idx, k)
        return f_hat

    def teacher_forcing_input(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, L − pn₀², Cvae): for each scale k ≥ 1, f̂ of the scales before it at scale k's size."""
        inputs, f_hat = [], None
        for k in range(1, self.num_scales):
            f_hat = self.add_scale(f_hat, tokens[k - 1], k - 1)
            inputs.append(self.downsample(f_hat, k).flatten(2).transpose(1, 2))
        if not inputs:  # a single scale has nothing to teacher-force
            return self.quantize.embedding.weight.new_zeros(tokens[0].shape[0], 0, self.config.z_channels)
        return torch.cat(inputs, dim=1)

    # ---- images ------------------------------------------------------------------------------
    def features(self, image: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise InputError(f"the tokenizer takes images of shape (B, 3, {size}, {size}), got {tuple(image.shape)}")
        return self.quant_conv(self.encoder(image))

    def _nearest_tokens(self, rest: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's tokens (B, pn²): the nearest code of each vector of the residual at pn_k × pn_k."""
        z = self.downsample(rest, k)
        B, C, pn, _ = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Token maps (B, pn²), row-major, of an image batch (B, 3, H, W) in [-1, 1]."""
        f = self.features(image).float()
        # quantisation stays float32 even under autocast: nearest-code ties are decided by rounding
        with torch.autocast(f.device.type, enabled=False):
            rest, tokens = f, []
            for k in range(self.num_scales):
                tokens.append(self._nearest_tokens(rest, k))
                rest = rest - self.scale_residual(tokens[-1], k)
        return tokens

    def set_policy(self, policy: KernelPolicy) -> None:
        """Store and run the decoder as the kernel policy says (`decoder_dtype`, `channels_last_decoder`)."""
        self.cast_decoder(policy.decoder_dtype, channels_last=policy.channels_last_decoder)

    def cast_decoder(self, dtype: torch.dtype, channels_last: bool = False) -> None:
        """Store the decoder (and the convolution before it) in `dtype`; `decode` then takes f̂ in it.
        `channels_last`: also store and run them channels-last, with the decoder's norms, bias adds and
        upsamples as the channels-last Triton kernels (for half precision on CUDA, where cuDNN's
        convolutions are NHWC-native; Triton must import, `hmar.policy.triton_available`)."""
        self.decoder_memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in (self.decoder, self.post_quant_conv):
            module.to(dtype=dtype, memory_format=self.decoder_memory_format)
        self.decoder.set_fused(channels_last)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] of a cumulative reconstruction f̂, in the decoder's dtype and memory format."""
        f_hat = f_hat.to(self.post_quant_conv.weight.dtype, memory_format=self.decoder_memory_format)
        with self._convolution_autotuning():
            return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @contextlib.contextmanager
    def _convolution_autotuning(self):
        """cuDNN's benchmark mode for a channels-last decoder on CUDA: its heuristics pick slower NHWC
        kernels than timing does (BENCHMARKS.md has the measurement). Timing runs
        once per input shape, and the decoder sees few (the sampler's chunks); it respects
        `torch.backends.cudnn.deterministic`. The chosen kernels, and so the last bits of a pixel,
        may differ between processes."""
        previous = torch.backends.cudnn.benchmark
        if self.decoder_memory_format == torch.channels_last:  # (no effect off CUDA)
            torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    def decode_tokens(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.tokens_to_f_hat(tokens))

    # ---- training ----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One tokenizer training step's worth: (reconstruction, vq_loss, usage).

        reconstruction: the decoder's image (not clamped) of f̂, with the straight-through estimator
        so that its gradient reaches the encoder. vq_loss: mean over scales of
        ||f̂_k − sg(f)||² + beta·||sg(f̂_k) − f||² (moves codes and φ towards f, and f towards them).
        usage: (K,) percent of the vocabulary in use at each scale, VAR's measure: codes whose hit
        count is at least 8% of a uniform share of the batch's last-scale vectors. In training mode
        the hits (summed over processes when torch.distributed is up) first update
        `quantize.ema_vocab_hit_SV` and usage is read from it; in eval mode usage is this batch's.
        """
        f = self.features(image).float()
        f_detached = f.detach()
        with torch.autocast(f.device.type, enabled=False):
            rest, f_hat = f_detached, None
            hits, vq_loss = [], f.new_zeros(())
            for k in range(self.num_scales):
                idx = self._nearest_tokens(rest, k)
                hits.append(idx.flatten().bincount(minlength=self.config.vocab_size).float())
                h = self.scale_residual(idx, k)
                f_hat = h if f_hat is None else f_hat + h
                rest = rest - h.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat, f_detached) + self.config.beta * F.mse_loss(f_hat.detach(), f)
            vq_loss = vq_loss / self.num_scales
            hits = torch.stack(hits)
        straight_through = f + (f_hat - f).detach()  # value f̂, gradient of the identity to f
        reconstruction = self.decoder(self.post_quant_conv(straight_through))

        world = 1
        if self.training:
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(hits)
                world = dist.get_world_size()
            self.quantize.record_hits(hits)
            hits = self.quantize.ema_vocab_hit_SV
        margin = world * (f.numel() / f.shape[1]) / self.config.vocab_size * 0.08
        usage = (hits >= margin).float().mean(dim=1) * 100
        return reconstruction, vq_loss, usage
