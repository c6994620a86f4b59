"""Building blocks of VAR's VQ-VAE: the convolutional encoder and decoder.

A ResNet-style autoencoder (the Stable Diffusion / taming layout VAR uses): GroupNorm (32 groups; the
decoder's count is a config field), swish, residual blocks, single-head self-attention at the lowest resolution and in the middle, stride-2
downsampling and nearest-neighbour upsampling. Submodule names follow the published checkpoint
(`encoder.down.0.block.0.norm1.weight`, …) so that it loads strictly.

Layout: the modules run in whatever memory format their input has. Where the kernel policy says so
(`KernelPolicy.channels_last_decoder`: half precision on CUDA), the decoder is stored and run
channels-last (`MultiScaleVQVAE.cast_decoder`): cuDNN's convolutions are NHWC-native, its norms
(with the SiLU after them) run as one Triton kernel that keeps the layout, and so do its
convolutions' bias adds with the residual after them (`hmar.kernels.channels_last`); a convolution
followed by a norm leaves its bias to the norm's kernel (`convolve_normalize`), a 1×1 shortcut
convolution leaves its bias to the add that takes it as the residual, and each upsample
runs in sub-pixel form (`Upsample`). Everywhere else these are PyTorch's modules.

Every map the decoder's kernels write (a block's output, an upsample's, `conv_in`'s) is read next by
a norm, except the map an upsample reads: those writers also emit the map's per-channel moments
(`hmar.kernels.channels_last.Moments`), and the norm takes them instead of a statistics pass over
the map (`Decoder.set_fused` chooses the writers). So the blocks, resamplers, levels and the middle
map (a map, its moments or None) to (their output, its moments or None); the moments are None
wherever the kernels do not run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from hmar.kernels.channels_last import Moments


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _channels_last_kernels():
    """`hmar.kernels.channels_last`, for modules whose policy turned the kernels on."""
    from hmar.kernels import channels_last  # here, not at the top: Triton takes seconds to import

    return channels_last


def normalize(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, fused: bool = False, moments: Moments | None = None) -> torch.Tensor:
    """`norm(x)`, then SiLU if `silu`: one Triton kernel when `fused` (a channels-last decoder),
    PyTorch's modules otherwise. `moments`: x's, from the kernel that wrote it (or None)."""
    kernels = _channels_last_kernels() if fused else None
    if kernels is not None and kernels.supports(x):  # (a map in another layout or dtype takes PyTorch's)
        return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu, moments=moments)
    h = norm(x)
    return F.silu(h) if silu else h


def convolve(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False,
             residual_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`conv(x)`, plus `residual` (+ `residual_bias`, a per-channel bias the residual still lacks) if
    given. When `fused`, cuDNN runs the convolution without its bias and one Triton kernel adds the
    bias and the residual in place (PyTorch's separate bias kernel would be another pass over the
    output)."""
    return convolve_with_moments(conv, x, residual, fused, residual_bias)[0]


def convolve_with_moments(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False,
                          residual_bias: torch.Tensor | None = None, emit: bool = False) -> tuple[torch.Tensor, Moments | None]:
    """`convolve`, and the result's moments for the norm that reads it next when `emit` and the
    Triton kernel added the bias (None otherwise)."""
    kernels = _channels_last_kernels() if fused and conv.bias is not None else None
    if kernels is not None and kernels.supports(x) and (residual is None or kernels.supports(residual)):
        bias = conv.bias if residual is None or residual_bias is None else conv.bias + residual_bias
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if kernels.supports(y):
            return kernels.add_bias_(y, bias, residual, moments=True) if emit else (kernels.add_bias_(y, bias, residual), None)
        y = y + bias.view(-1, 1, 1)  # (cuDNN chose another layout)
        return (y if residual is None else y + residual), None
    y = conv(x)
    if residual is not None:
        y = residual + y if residual_bias is None else residual + y + residual_bias.view(-1, 1, 1)
    return y, None


def convolve_normalize(conv: nn.Conv2d, x: torch.Tensor, norm: nn.GroupNorm, fused: bool = False) -> torch.Tensor:
    """`norm(conv(x))`, then SiLU. When `fused`, the convolution's bias is added inside the norm's
    kernel (in float32, before the statistics), saving the pass over the convolution's output that
    adding it alone would take."""
    kernels = _channels_last_kernels() if fused and conv.bias is not None else None
    if kernels is not None and kernels.supports(x):
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        if kernels.supports(y):
            return kernels.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True, shift=conv.bias)
        y = y + conv.bias.view(-1, 1, 1)  # (cuDNN chose another layout)
        return F.silu(norm(y))
    return normalize(norm, convolve(conv, x, fused=fused), fused=fused)


def upsample_weight(weight: torch.Tensor) -> torch.Tensor:
    """The 3×3 kernel (O, I, 3, 3) that follows a nearest-neighbour 2× upsample, as the 2×2 kernels of
    its four output phases (4·O, I, 2, 2), phase (a, b) at rows 2a·O + b·O: output pixel
    (2i + a, 2j + b) reads only input rows i − 1 + a, i + a and columns j − 1 + b, j + b of the small
    map (rows i − 1, i, i for a = 0; i, i, i + 1 for a = 1), so each phase's two taps per axis sum the
    3×3 kernel's rows that land on the same input row. Summed in float32 (or float64), rounded once."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=dtype, device=weight.device)  # (phase, tap, kernel row)
    phases = torch.einsum("atk,bsl,oikl->aboits", taps, taps, weight.to(dtype))
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.fused = False  # the channels-last kernels (KernelPolicy.channels_last_decoder, see Decoder.set_fused)
        self.emit_moments = False  # whether the output's moments go to the norm that reads it next (Decoder.set_fused)

    def forward(self, x: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, Moments | None]:
        fused = self.fused
        h = convolve_normalize(self.conv1, normalize(self.norm1, x, fused=fused, moments=moments), self.norm2, fused)
        shortcut, shortcut_bias = x, None
        if isinstance(self.nin_shortcut, nn.Conv2d) and fused:  # its bias left to conv2's bias add: a pass fewer
            shortcut, shortcut_bias = F.conv2d(x, self.nin_shortcut.weight), self.nin_shortcut.bias
        elif isinstance(self.nin_shortcut, nn.Conv2d):
            shortcut = self.nin_shortcut(x)
        return convolve_with_moments(self.conv2, h, shortcut, fused, shortcut_bias, emit=self.emit_moments)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (one 1x1 conv makes q, k and v)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.fused = False  # see ResnetBlock
        self.emit_moments = False

    def forward(self, x: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, Moments | None]:
        B, C, H, W = x.shape
        qkv = convolve(self.qkv, normalize(self.norm, x, silu=False, fused=self.fused, moments=moments), fused=self.fused)
        q, k, v = qkv.reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax scale C^-1/2
        return convolve_with_moments(self.proj_out, h.transpose(1, 2).reshape(B, C, H, W), x, self.fused, emit=self.emit_moments)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, None]:
        return self.conv(F.pad(x, (0, 1, 0, 1))), None  # asymmetric pad: exact halving for even sizes


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsample, then a 3×3 convolution. With the channels-last kernels, in the
    sub-pixel form: one convolution with the four phases' 2×2 kernels
    (`upsample_weight`) over the small map, then one kernel that interleaves the phases and adds the
    bias (`hmar.kernels.channels_last.interleave_phases`): 16 instead of 36 multiply-adds per small
    pixel and channel pair, and the upsampled map is written once instead of written, read by the
    convolution and written again. Exact up to the order of float rounding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._phase_weight: tuple[tuple, torch.Tensor] | None = None  # (the weight it came from, the phases)
        self.fused = False  # see ResnetBlock
        self.emit_moments = False

    def phase_weight(self) -> torch.Tensor:
        """`upsample_weight` of the convolution's weight, made again only when the weight changes."""
        w = self.conv.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape)
        if self._phase_weight is None or self._phase_weight[0] != key:
            with torch.no_grad():
                self._phase_weight = (key, upsample_weight(w).contiguous(memory_format=torch.channels_last))
        return self._phase_weight[1]

    def forward(self, x: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, Moments | None]:
        kernels = _channels_last_kernels() if self.fused else None
        if kernels is not None and kernels.supports(x):
            phases = F.conv2d(x, self.phase_weight(), None, padding=1)  # (N, 4C, H + 1, W + 1)
            phases = phases.contiguous(memory_format=torch.channels_last)
            if self.emit_moments:
                return kernels.interleave_phases(phases, self.conv.bias, moments=True)
            return kernels.interleave_phases(phases, self.conv.bias), None
        return convolve_with_moments(self.conv, F.interpolate(x, scale_factor=2, mode="nearest"), fused=self.fused, emit=self.emit_moments)


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks (with attention at the lowest
    resolution) and the resampling to the next one."""

    def __init__(self, blocks: list[ResnetBlock], attention: bool, resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(AttnBlock(b.conv2.out_channels, b.norm2.num_groups) for b in blocks) if attention else nn.ModuleList()
        # the checkpoint names the resampler `downsample` (encoder) or `upsample` (decoder)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, Moments | None]:
        for i, block in enumerate(self.block):
            h, moments = block(h, moments)
            if len(self.attn):
                h, moments = self.attn[i](h, moments)
        return getattr(self, self.resample_name)(h, moments) if self.resample_name else (h, moments)


class Middle(nn.Module):
    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, h: torch.Tensor, moments: Moments | None = None) -> tuple[torch.Tensor, Moments | None]:
        return self.block_2(*self.attn_1(*self.block_1(h, moments)))


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            levels.append(Level(blocks, attention=last, resample=None if last else Downsample(block_in), name="downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = Middle(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h, _ = level(h)
        return self.conv_out(normalize(self.norm_out, self.mid(h)[0]))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_channels: int = 3,
                 norm_groups: int = 32):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = Middle(block_in, norm_groups)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[i], norm_groups))
                block_in = ch * ch_mult[i]
            levels.insert(0, Level(blocks, attention=i == len(ch_mult) - 1, resample=Upsample(block_in) if i else None, name="upsample"))
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the lowest resolution up
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)
        self.fused = False  # see ResnetBlock
        self.emit_moments = False  # conv_in's output's, for mid.block_1's norm1 (see ResnetBlock)

    def set_fused(self, fused: bool) -> None:
        """Whether this decoder's norms, bias adds and upsamples run as the channels-last kernels
        (`hmar.kernels.channels_last`): for a half-precision decoder stored channels-last. With them,
        every writer of a map that a norm reads next (a block's norm1, an attention block's norm,
        norm_out) hands that norm the map's moments: all of them but the last before each upsample."""
        for module in self.modules():
            if isinstance(module, (Decoder, ResnetBlock, AttnBlock, Upsample)):
                module.fused = module.emit_moments = fused
        for level in self.up:
            if level.resample_name:
                (level.attn or level.block)[-1].emit_moments = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, moments = self.mid(*convolve_with_moments(self.conv_in, z, fused=self.fused, emit=self.emit_moments))
        for level in reversed(self.up):
            h, moments = level(h, moments)
        return convolve(self.conv_out, normalize(self.norm_out, h, fused=self.fused, moments=moments), fused=self.fused)
