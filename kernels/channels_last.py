"""Triton kernels that keep a half-precision decoder channels-last from end to end (inference only):
GroupNorm with the SiLU after it (and, before it, the bias of the convolution that made its input),
a convolution's bias with the residual after it, and the interleaving of a sub-pixel upsample's phases.

Why: the VQ-VAE decoder is a large part of a 256 px sampling batch. cuDNN's half-precision
convolutions are NHWC-native, but PyTorch's GroupNorm works on NCHW, so an eager
decoder either runs NCHW and pays cuDNN's layout transposes around every convolution, or runs
channels-last and pays GroupNorm's. And PyTorch adds a convolution's bias as a separate broadcast
kernel, another pass over the convolution's output before the residual add reads it again.

A channels-last map (N, C, H, W) is a row-major (N, H·W, C) array: rows are pixels, each holding
all C channels contiguously. Every kernel splits the channels into blocks of CB, the largest power
of two that divides C (at most 128: 32 of the decoder's 160 channels, 64 of 320, 128 of 640), and
gives each block its own programs (the grid's first axis, so that the programs of one run of pixels
start together and read it together). A program's tile is then (pixels, CB) with every lane a real
channel, each pixel's CB channels one contiguous (vectorised) run, and the per-channel parameters one
(CB,) vector for the whole tile. Where C has no power-of-two divisor of at least 16 (3 channels, 40,
a prime), one block of C rounded up to a power of two takes all of them, its extra lanes masked off.

`group_norm` is three launches, no torch ops between them (the decoder runs ~30 norms per batch:
their launch count matters at small batches):

1. `_partial_moments`, grid (channel blocks, SPLITS, N): each program streams one span of a sample's
   pixels in its channel block, ROWS pixels at a time, and sums d = x − p and d² per (row lane,
   channel) in float32, where the pivot p is the channel's mean over the span's first tile; at the
   end it reduces the lanes into the span's per-channel mean p + Σd/n and sum of squared deviations
   M2 = Σd² − (Σd)²/n: an add and a multiply-add per element and no division, for a loop that should
   be bound by memory. Sums about a pivot inside the data keep the variance where E[x²] − E[x]² would
   cancel (decoder activations have means far above their spread): the cancellation costs float32's
   ulp times 1 + n·(mean − p)² / M2, and since the first tile's pixels alone give
   M2 ≥ (its pixels)·(mean − p)², that is at most 1 + the span's tile count, however far the first
   tile lies from the rest. A constant channel's M2 is 0 (or the square of its value's float32
   rounding). SPLITS is chosen to give every SM a few programs.
2. `_group_statistics`, grid (G, N): merges the (SPLITS × channels of the group) partials of one
   group, exactly (the group mean first, then each partial's M2 plus its count × squared distance
   from it), into the mean and 1/std of biased variance, as GroupNorm defines them. A partial's
   count is its span's pixels (the last span may be short), so only means and M2s are stored.
   With a `shift` (a convolution's bias not yet added to x), each channel's mean moves by its shift
   before the merge; its M2 does not change.
3. `_normalize_act`, grid (channel blocks, tiles, N): y = (x + shift − mean)·(1/std·weight) + bias,
   then SiLU in float32, rounded once to x's dtype. (Subtracting the mean first, not folding it into
   the offset: x·scale − mean·scale would cancel catastrophically where the mean is large against
   the spread.)

The first launch is skipped where the map's writer already handed over its partials (`Moments`):
`add_bias_` and `interleave_phases` can emit, per tile of their output and channel, the tile's mean
and its M2 about that mean, of the values as stored (rounded to the map's dtype). The tile is in
registers, so it is summed twice for free: once for its mean, then about that mean, the best pivot.
The decoder passes them to the norm that reads the map next (`hmar.tokenizer_modules`). Their tiles
hold at least 256 bytes of the map per channel (or a whole sample of a smaller map), so the partials
(8 bytes per tile and channel) stay within 1/PARTIALS_FRACTION = 1/32 of the map.

`add_bias_`: y += bias (+ residual), in place on a bias-free convolution's output, one pass.

`interleave_phases`: the four phase maps of a 2× upsample computed at low resolution, interleaved
into the large map with the bias added, one pass (`hmar.tokenizer_modules.Upsample`).

Against `F.silu(F.group_norm(x))` in float32: ~1e-6 relative; in half precision the fused results are
rounded once where PyTorch rounds after each step (tests: `tests/test_channels_last_kernels.py`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNEL_BLOCK = 128  # channels per program at most: more programs for wide maps, rows of 256 half-precision bytes
MIN_CHANNEL_BLOCK = 16  # below this, the channels' run per pixel is shorter than a 32-byte sector of half precision
TILE_ELEMENTS = 8192  # pixels × channel block per element-wise program: 16 KiB of half-precision input
ELEMENTWISE_WARPS = 8
# The statistics' launch constants: the best of `recipes/benchmarks/channels_last_kernels.py`'s sweep
# on an H100 at the d16 decoder's maps, among those within a few percent of each other, with the
# fewest partials to merge.
MOMENTS_TILE_ELEMENTS = 8192  # pixels × channel block per step of a statistics program (2 float32 accumulators each)
MOMENTS_WARPS = 4
PROGRAMS_PER_SM = 4  # statistics programs per SM: enough to keep HBM busy, few partials to merge
PARTIALS_FRACTION = 32  # emitted partials (8 bytes per tile and channel) at most this fraction of the map
SPLIT_BLOCK = 64  # partials merged per step of `_group_statistics`
# (`recipes/benchmarks/channels_last_kernels.py` times these kernels at the decoder's shapes and sweeps
# the tile sizes, warps and programs per SM)
# SiLU's division. False: IEEE float32. True: the fast float32 division (a few ulp), fewer operations
# per byte in a kernel that should run at HBM speed (`recipes/benchmarks/decoder.py` times both:
# variant "both, fast divisions").
FAST_DIVISION = False


class Moments(NamedTuple):
    """A map's per-channel moments over tiles of `span` pixels of each sample, as `group_norm` merges
    them: `partials` (2, N, tiles, C) float32, each tile's mean and M2 (its sum of squared deviations
    from that mean); tile t holds pixels t·span … (t + 1)·span − 1 (the last one may be short)."""
    partials: torch.Tensor
    span: int


@triton.jit
def _partial_moments(x_ptr, mean_ptr, m2_ptr, HW, C, SPAN,
                     ROWS: tl.constexpr, CB: tl.constexpr):
    block, split, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    lanes = tl.arange(0, ROWS)
    channels = block * CB + tl.arange(0, CB)
    in_channels = channels < C
    first = split * SPAN
    span = x_ptr + (n.to(tl.int64) * HW + first) * C + channels[None, :]
    pixels = tl.minimum(SPAN, HW - first)
    # pivot: each channel's mean over the span's first tile; the cancellation its distance from the
    # span's mean costs at the end is bounded by the span's tile count (module docstring)
    head = (lanes[:, None] < pixels) & in_channels[None, :]
    x = tl.load(span + lanes[:, None] * C, mask=head, other=0.0).to(tl.float32)
    pivot = tl.sum(x, axis=0) / tl.minimum(pixels, ROWS).to(tl.float32)
    # sums of d = x − pivot and d² per (row lane, channel): an add and a multiply-add per element,
    # no reduction inside the loop
    s1 = tl.where(head, x - pivot[None, :], 0.0)
    s2 = s1 * s1
    for i in range(1, tl.cdiv(pixels, ROWS)):
        rows = i * ROWS + lanes
        valid = (rows[:, None] < pixels) & in_channels[None, :]
        x = tl.load(span + rows[:, None] * C, mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, x - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    count = pixels.to(tl.float32)
    offset = tl.sum(s1, axis=0) / count  # the span's mean minus the pivot
    # M2 = Σd² − n·offset²: both terms exceed M2 by n·offset², which the first tile bounds (see above)
    m2 = tl.maximum(tl.sum(s2, axis=0) - count * offset * offset, 0.0)
    out = (n * splits + split) * C + channels
    tl.store(mean_ptr + out, pivot + offset, mask=in_channels)
    tl.store(m2_ptr + out, m2, mask=in_channels)


@triton.jit
def _tile_moments(y, valid, count, mean_ptr, m2_ptr, out, in_channels):
    """Store the (pixels, channels) tile `y`'s per-channel mean and M2 (over the `valid` entries,
    `count` pixels) at `out`, both summed about the tile's mean: the tile is in registers, so the
    second pass is free."""
    pivot = tl.sum(tl.where(valid, y, 0.0), axis=0) / count
    # Σy of values far above their spread holds the mean only to a few of its float32 ulps; the sum of
    # d = y − pivot corrects it to one (the merge multiplies a mean's error by its distance from the group's)
    d = tl.where(valid, y - pivot[None, :], 0.0)
    offset = tl.sum(d, axis=0) / count
    tl.store(mean_ptr + out, pivot + offset, mask=in_channels)
    tl.store(m2_ptr + out, tl.maximum(tl.sum(d * d, axis=0) - count * offset * offset, 0.0), mask=in_channels)


@triton.jit
def _group_statistics(mean_ptr, m2_ptr, shift_ptr, group_mean_ptr, rstd_ptr, HW, C, SPAN, SPLITS, eps,
                      PER_GROUP: tl.constexpr, SPLIT_BLOCK: tl.constexpr, PER_GROUP_PAD: tl.constexpr,
                      HAS_SHIFT: tl.constexpr):
    group, n = tl.program_id(0), tl.program_id(1)
    lanes = tl.arange(0, SPLIT_BLOCK)
    in_group = tl.arange(0, PER_GROUP_PAD) < PER_GROUP
    channels = group * PER_GROUP + tl.arange(0, PER_GROUP_PAD)
    if HAS_SHIFT:  # a per-channel shift moves each channel's mean and leaves its M2 as it is
        shift = tl.load(shift_ptr + channels, mask=in_group, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros((PER_GROUP_PAD,), tl.float32)
    # the group's mean first: Σ count·mean over the partials, / the group's pixel count
    total = tl.cast(HW, tl.float32) * PER_GROUP
    weighted = tl.zeros((SPLIT_BLOCK, PER_GROUP_PAD), tl.float32)
    for first in range(0, SPLITS, SPLIT_BLOCK):
        splits = first + lanes
        valid = (splits[:, None] < SPLITS) & in_group[None, :]
        count = tl.minimum(SPAN, HW - splits * SPAN).to(tl.float32)[:, None]
        mean = tl.load(mean_ptr + (n * SPLITS + splits[:, None]) * C + channels[None, :], mask=valid, other=0.0)
        weighted += tl.where(valid, count * (mean + shift[None, :]), 0.0)
    group_mean = tl.sum(tl.sum(weighted, axis=1), axis=0) / total
    # then each partial's M2 plus its count × squared distance from the group's mean
    spread = tl.zeros((SPLIT_BLOCK, PER_GROUP_PAD), tl.float32)
    for first in range(0, SPLITS, SPLIT_BLOCK):
        splits = first + lanes
        valid = (splits[:, None] < SPLITS) & in_group[None, :]
        count = tl.minimum(SPAN, HW - splits * SPAN).to(tl.float32)[:, None]
        offsets = (n * SPLITS + splits[:, None]) * C + channels[None, :]
        deviation = tl.load(mean_ptr + offsets, mask=valid, other=0.0) + shift[None, :] - group_mean
        m2 = tl.load(m2_ptr + offsets, mask=valid, other=0.0)
        spread += tl.where(valid, m2 + count * deviation * deviation, 0.0)
    group_m2 = tl.sum(tl.sum(spread, axis=1), axis=0)
    tl.store(group_mean_ptr + n * (C // PER_GROUP) + group, group_mean)
    tl.store(rstd_ptr + n * (C // PER_GROUP) + group, 1.0 / tl.sqrt(group_m2 / total + eps))


@triton.jit
def _normalize_act(x_ptr, y_ptr, shift_ptr, group_mean_ptr, rstd_ptr, weight_ptr, bias_ptr, HW, C,
                   PER_GROUP: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr):
    block, tile, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * ROWS + tl.arange(0, ROWS)
    channels = block * CB + tl.arange(0, CB)
    in_channels = channels < C
    valid = (rows[:, None] < HW) & in_channels[None, :]
    sample = n.to(tl.int64) * HW * C  # (64-bit once per program; the offsets within a sample fit 32 bits)
    offsets = rows[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + sample + offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptr + channels, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    groups = n * (C // PER_GROUP) + channels // PER_GROUP
    mean = tl.load(group_mean_ptr + groups, mask=in_channels, other=0.0)
    scale = tl.load(rstd_ptr + groups, mask=in_channels, other=0.0)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + channels, mask=in_channels, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + channels, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    if SILU:
        if FAST:
            y = tl.fdiv(y, 1.0 + tl.exp(-y))
        else:
            y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + sample + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_bias(y_ptr, bias_ptr, residual_ptr, mean_ptr, m2_ptr, HW, C,
              ROWS: tl.constexpr, CB: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MOMENTS: tl.constexpr):
    block, tile, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * ROWS + tl.arange(0, ROWS)
    channels = block * CB + tl.arange(0, CB)
    in_channels = channels < C
    valid = (rows[:, None] < HW) & in_channels[None, :]
    sample = n.to(tl.int64) * HW * C
    offsets = rows[:, None] * C + channels[None, :]
    y = tl.load(y_ptr + sample + offsets, mask=valid, other=0.0).to(tl.float32)
    y += tl.load(bias_ptr + channels, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + sample + offsets, mask=valid, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + sample + offsets, y, mask=valid)
    if MOMENTS:  # of the values as stored, which is what the next norm reads
        count = tl.minimum(ROWS, HW - tile * ROWS).to(tl.float32)
        _tile_moments(y.to(tl.float32), valid, count, mean_ptr, m2_ptr,
                      (n * tl.num_programs(1) + tile) * C + channels, in_channels)


@triton.jit
def _interleave_phases(o_ptr, bias_ptr, y_ptr, mean_ptr, m2_ptr, H, W, C,
                       ROWS: tl.constexpr, CB: tl.constexpr, HAS_BIAS: tl.constexpr, MOMENTS: tl.constexpr):
    # output pixel (n, 2i + a, 2j + b) is phase (a, b) of the low-resolution pixel (i + a, j + b)
    block, tile, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HW = 4 * H * W  # output pixels per sample
    pixels = tile * ROWS + tl.arange(0, ROWS)
    channels = block * CB + tl.arange(0, CB)
    in_channels = channels < C
    column = pixels % (2 * W)
    row = pixels // (2 * W)
    a, b = row % 2, column % 2
    source = (row // 2 + a) * (W + 1) + column // 2 + b  # in the sample's phase map
    valid = (pixels[:, None] < HW) & in_channels[None, :]
    phases = o_ptr + n.to(tl.int64) * (H + 1) * (W + 1) * (4 * C)
    y = tl.load(phases + (source * (4 * C) + (2 * a + b) * C)[:, None] + channels[None, :], mask=valid, other=0.0)
    y = y.to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + channels, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + n.to(tl.int64) * HW * C + pixels[:, None] * C + channels[None, :], y, mask=valid)
    if MOMENTS:
        count = tl.minimum(ROWS, HW - tile * ROWS).to(tl.float32)
        _tile_moments(y.to(tl.float32), valid, count, mean_ptr, m2_ptr,
                      (n * tl.num_programs(1) + tile) * C + channels, in_channels)


def _warps(count: int) -> dict:
    """Launch options: `count` warps on a GPU, none under the interpreter (which takes none)."""
    return {} if devices.INTERPRETING else {"num_warps": count}


def channel_block(channels: int, most: int = MAX_CHANNEL_BLOCK) -> int:
    """Channels per program: the largest power of two that divides `channels` (at most `most`), or
    `channels` rounded up to a power of two (one block, extra lanes masked) where that divisor is
    below MIN_CHANNEL_BLOCK."""
    block = min(channels & -channels, most)
    return block if block >= MIN_CHANNEL_BLOCK else triton.next_power_of_2(channels)


def _tile_rows(elements: int, pixels: int, block: int) -> int:
    """Pixels per tile: `elements` over the channel block, a power of two, no more than the map needs."""
    return max(1, min(elements // block, triton.next_power_of_2(pixels)))


def _writer_tile(pixels: int, channels: int, x: torch.Tensor, moments: bool) -> tuple[int, int]:
    """(pixels, channel block) per program of `add_bias_` or `interleave_phases` writing a map like
    `x`: TILE_ELEMENTS of them. Where it emits partials, tall enough that they (8 bytes per tile and
    channel) stay within 1/PARTIALS_FRACTION of the map, the channel block narrowed where that keeps
    the tile at TILE_ELEMENTS (registers for the moments' passes)."""
    if not moments:
        block = channel_block(channels)
        return _tile_rows(TILE_ELEMENTS, pixels, block), block
    least = triton.next_power_of_2(8 * PARTIALS_FRACTION // x.element_size())
    block = channel_block(channels, max(MIN_CHANNEL_BLOCK, TILE_ELEMENTS // least))
    return min(max(_tile_rows(TILE_ELEMENTS, pixels, block), least), triton.next_power_of_2(pixels)), block


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a few splits, so that the tests merge several partials
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: a 4-D channels-last map of a supported dtype on CUDA (or on the
    CPU under TRITON_INTERPRET=1)."""
    return (devices.runs_on(x.device) and x.dim() == 4 and x.dtype in DTYPES
            and x.is_contiguous(memory_format=torch.channels_last))


def _check_map(op: str, x: torch.Tensor) -> None:
    if not supports(x):
        raise ValueError(f"{op}: needs a 4-D channels-last {[str(d).removeprefix('torch.') for d in DTYPES]} "
                         f"tensor on CUDA, got shape {tuple(x.shape)}, {x.dtype} on {x.device}")


def _check_channels(op: str, name: str, t: torch.Tensor | None, channels: int) -> None:
    if t is not None and t.shape != (channels,):
        raise ValueError(f"{op}: {name} must have shape ({channels},), got {tuple(t.shape)}")


def _check_moments(x: torch.Tensor, moments: Moments) -> None:
    N, C, H, W = x.shape
    partials, span = moments
    expected = (2, N, triton.cdiv(H * W, span) if span > 0 else -1, C)
    if tuple(partials.shape) != expected or partials.dtype != torch.float32 or partials.device != x.device:
        raise ValueError(f"group_norm: moments over tiles of {span} pixels of a map {tuple(x.shape)} must be float32 "
                         f"{expected} on {x.device}, got {tuple(partials.shape)}, {partials.dtype} on {partials.device}")


def _empty_moments(x: torch.Tensor, tiles: int, span: int) -> Moments:
    return Moments(torch.empty((2, x.shape[0], tiles, x.shape[1]), device=x.device, dtype=torch.float32), span)


def _partials(x: torch.Tensor) -> Moments:
    """The map's per-channel moments over spans of whole tiles, as many spans as give each SM a few
    programs over the batch (`_partial_moments`); `x` a non-empty channels-last map."""
    N, C, H, W = x.shape
    hw, block = H * W, channel_block(C)
    blocks = triton.cdiv(C, block)
    rows = _tile_rows(MOMENTS_TILE_ELEMENTS, hw, block)
    tiles = triton.cdiv(hw, rows)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(x.device), N * blocks)
    tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, wanted)))
    moments = _empty_moments(x, triton.cdiv(tiles, tiles_per_split), tiles_per_split * rows)
    _partial_moments[(blocks, moments.partials.shape[2], N)](x, moments.partials[0], moments.partials[1], hw, C, moments.span,
                                                             ROWS=rows, CB=block, **_warps(MOMENTS_WARPS))
    return moments


def _statistics(x: torch.Tensor, num_groups: int, eps: float, shift: torch.Tensor | None,
                moments: Moments | None = None) -> torch.Tensor:
    """(2, N, num_groups) float32: each group's mean and 1/std of `x + shift` (biased variance + eps),
    merged by `_group_statistics` from `moments` of `x`, or from `_partials`' when None; `x` a
    non-empty channels-last map."""
    N, C, H, W = x.shape
    partials, span = _partials(x) if moments is None else moments
    statistics = torch.empty((2, N, num_groups), device=x.device, dtype=torch.float32)
    per_group = C // num_groups
    _group_statistics[(num_groups, N)](partials[0], partials[1], shift, statistics[0], statistics[1], H * W, C, span,
                                       partials.shape[2], eps, PER_GROUP=per_group, SPLIT_BLOCK=SPLIT_BLOCK,
                                       PER_GROUP_PAD=triton.next_power_of_2(per_group), HAS_SHIFT=shift is not None,
                                       **_warps(4))
    return statistics


@torch.no_grad()
def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False,
               shift: torch.Tensor | None = None, moments: Moments | None = None) -> torch.Tensor:
    """`F.group_norm(x + shift, num_groups, weight, bias, eps)`, then SiLU if `silu`, for a
    channels-last (N, C, H, W) map and an optional per-channel `shift` (C,) (a convolution's bias,
    added here in float32 instead of in a pass of its own); the result is channels-last in x's dtype.
    `moments`: x's per-channel moments as the kernel that wrote x emitted them (`add_bias_`,
    `interleave_phases`), so that the statistics need no pass over x of their own. No autograd
    (inference)."""
    _check_map("group_norm", x)
    N, C, H, W = x.shape
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias), ("shift", shift)):
        _check_channels("group_norm", name, t, C)
    if moments is not None:
        _check_moments(x, moments)
    hw = H * W
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return y
    statistics = _statistics(x, num_groups, eps, shift, moments)
    block = channel_block(C)
    rows = _tile_rows(TILE_ELEMENTS, hw, block)
    _normalize_act[(triton.cdiv(C, block), triton.cdiv(hw, rows), N)](
        x, y, shift, statistics[0], statistics[1], weight, bias, hw, C, PER_GROUP=C // num_groups, ROWS=rows, CB=block,
        HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu,
        FAST=FAST_DIVISION, **_warps(ELEMENTWISE_WARPS))
    return y


@torch.no_grad()
def add_bias_(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
              moments: bool = False) -> torch.Tensor | tuple[torch.Tensor, Moments]:
    """y += bias[channel] (+ residual), in place on a channels-last (N, C, H, W) map, summed in
    float32 and rounded once; returns y, and with `moments` also y's `Moments` for the norm that
    reads it next. For a convolution run without its bias, and the residual connection after it."""
    _check_map("add_bias_", y)
    _check_channels("add_bias_", "bias", bias, y.shape[1])
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype or not supports(residual)):
        raise ValueError(f"add_bias_: the residual must be a channels-last map like y {tuple(y.shape)}, {y.dtype}; "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    N, C, H, W = y.shape
    hw = H * W
    if y.numel() == 0:
        return (y, _empty_moments(y, min(hw, 1), max(hw, 1))) if moments else y
    rows, block = _writer_tile(hw, C, y, moments)
    tiles = triton.cdiv(hw, rows)
    partials = _empty_moments(y, tiles, rows) if moments else None
    _add_bias[(triton.cdiv(C, block), tiles, N)](
        y, bias, residual, *((partials.partials[0], partials.partials[1]) if moments else (None, None)), hw, C,
        ROWS=rows, CB=block, HAS_RESIDUAL=residual is not None, MOMENTS=moments, **_warps(ELEMENTWISE_WARPS))
    return (y, partials) if moments else y


@torch.no_grad()
def interleave_phases(o: torch.Tensor, bias: torch.Tensor | None = None,
                      moments: bool = False) -> torch.Tensor | tuple[torch.Tensor, Moments]:
    """The (N, C, 2H, 2W) map whose pixel (2i + a, 2j + b) is channel block 2a + b of `o`'s pixel
    (i + a, j + b), plus `bias` (C,): `o` (N, 4C, H + 1, W + 1) holds the four phases of a 2× upsampled
    map, each computed at low resolution (the sub-pixel form of a nearest-neighbour 2× upsample and a
    3×3 convolution: `hmar.tokenizer_modules.Upsample`). Channels-last in and out, one pass. With
    `moments`, also the result's `Moments` for the norm that reads it next."""
    _check_map("interleave_phases", o)
    N, C4, H1, W1 = o.shape
    if C4 % 4 or H1 < 2 or W1 < 2:
        raise ValueError(f"interleave_phases: needs (N, 4C, H + 1, W + 1) with H, W >= 1, got {tuple(o.shape)}")
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    _check_channels("interleave_phases", "bias", bias, C)
    y = torch.empty((N, C, 2 * H, 2 * W), device=o.device, dtype=o.dtype, memory_format=torch.channels_last)
    hw = 4 * H * W
    if y.numel() == 0:
        return (y, _empty_moments(y, 1, hw)) if moments else y
    rows, block = _writer_tile(hw, C, y, moments)
    tiles = triton.cdiv(hw, rows)
    partials = _empty_moments(y, tiles, rows) if moments else None
    _interleave_phases[(triton.cdiv(C, block), tiles, N)](
        o, bias, y, *((partials.partials[0], partials.partials[1]) if moments else (None, None)), H, W, C,
        ROWS=rows, CB=block, HAS_BIAS=bias is not None, MOMENTS=moments, **_warps(ELEMENTWISE_WARPS))
    return (y, partials) if moments else y
