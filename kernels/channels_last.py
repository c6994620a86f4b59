"""Triton kernels that keep a half-precision decoder channels-last from end to end (inference only):
GroupNorm with the SiLU after it (and, before it, the bias of the convolution that made its input),
a convolution's bias with the residual after it, and the interleaving of a sub-pixel upsample's phases.

Why: the VQ-VAE decoder is a large part of a 256 px sampling batch. cuDNN's half-precision
convolutions are NHWC-native, but PyTorch's GroupNorm works on NCHW, so an eager
decoder either runs NCHW and pays cuDNN's layout transposes around every convolution, or runs
channels-last and pays GroupNorm's. And PyTorch adds a convolution's bias as a separate broadcast
kernel, another pass over the convolution's output before the residual add reads it again.

A channels-last map (N, C, H, W) is a row-major (N, H·W, C) array: rows are pixels, each holding
all C channels (padded to a power of two in registers) contiguously. `group_norm` is three
launches, no torch ops between them (the decoder runs ~30 norms per batch: their launch count matters at small batches):

1. `_partial_moments`, grid (SPLITS, N): each program streams one span of a sample's pixels, ROWS
   rows at a time, and sums d = x − p and d² per (row lane, channel) in float32, where the pivot p
   is the channel's mean over the span's first tile; at the end it reduces the lanes into the
   span's per-channel count, mean p + Σd/n and sum of squared deviations M2 = Σd² − (Σd)²/n: an add
   and a multiply-add per element and no division, for a loop that should be bound by memory. Sums
   about a pivot inside the data keep the variance where E[x²] − E[x]² would cancel (decoder
   activations have means far above their spread): the cancellation costs float32's ulp times
   1 + n·(mean − p)² / M2, and since the first tile's pixels alone give M2 ≥ (its pixels)·(mean − p)²,
   that is at most 1 + the span's tile count, however far the first tile lies from the rest. A
   constant channel's M2 is 0 (or the square of its value's float32 rounding). SPLITS is chosen to
   give every SM a few programs.
2. `_group_statistics`, grid (G, N): merges the (SPLITS × channels of the group) partials of one
   group, exactly (the group mean first, then each partial's M2 plus its count × squared distance
   from it), into the mean and 1/std of biased variance, as GroupNorm defines them.
   With a `shift` (a convolution's bias not yet added to x), each channel's mean moves by its shift
   before the merge; its M2 does not change.
3. `_normalize_act`, grid (tiles, N): y = (x + shift − mean)·(1/std·weight) + bias, then SiLU in float32,
   rounded once to x's dtype. (Subtracting the mean first, not folding it into the offset:
   x·scale − mean·scale would cancel catastrophically where the mean is large against the spread.)

`add_bias_`: y += bias (+ residual), in place on a bias-free convolution's output, one pass.

`interleave_phases`: the four phase maps of a 2× upsample computed at low resolution, interleaved
into the large map with the bias added, one pass (`hmar.tokenizer_modules.Upsample`).

Against `F.silu(F.group_norm(x))` in float32: ~1e-6 relative; in half precision the fused results are
rounded once where PyTorch rounds after each step (tests: `tests/test_channels_last_kernels.py`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_ELEMENTS = 8192  # ROWS × padded channels per normalising program: 16-32 KiB of half-precision input
MOMENTS_TILE_ELEMENTS = 2048  # ROWS × padded channels per step of a statistics program (2 float32 accumulators each)
# (tile, warps and programs per SM for the statistics: not yet swept for the shifted-sum loop;
# `recipes/benchmarks/group_norm_statistics.py` sweeps them on the d16 decoder's shapes)
MOMENTS_WARPS = 8
PROGRAMS_PER_SM = 4  # statistics programs per SM: enough to keep HBM busy, few partials to merge
# SiLU's division. False: IEEE float32. True: the fast float32 division (a few ulp), fewer operations
# per byte in a kernel that should run at HBM speed (`recipes/benchmarks/decoder.py` times both:
# variant "both, fast divisions").
FAST_DIVISION = False


@triton.jit
def _partial_moments(x_ptr, count_ptr, mean_ptr, m2_ptr, HW, C, SPAN,
                     ROWS: tl.constexpr, C_PAD: tl.constexpr):
    split, n = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(0)
    lanes = tl.arange(0, ROWS)
    cols = tl.arange(0, C_PAD)
    in_channels = cols < C
    sample = x_ptr + n.to(tl.int64) * HW * C
    first = split * SPAN
    pixels = tl.minimum(SPAN, HW - first)
    # pivot: each channel's mean over the span's first tile; the cancellation its distance from the
    # span's mean costs at the end is bounded by the span's tile count (module docstring)
    head = (lanes[:, None] < pixels) & in_channels[None, :]
    x = tl.load(sample + (first + lanes[:, None]) * C + cols[None, :], mask=head, other=0.0).to(tl.float32)
    pivot = tl.sum(x, axis=0) / tl.minimum(pixels, ROWS).to(tl.float32)
    # sums of d = x − pivot and d² per (row lane, channel): an add and a multiply-add per element,
    # no reduction inside the loop
    s1 = tl.where(head, x - pivot[None, :], 0.0)
    s2 = s1 * s1
    for i in range(1, tl.cdiv(pixels, ROWS)):
        rows = i * ROWS + lanes
        valid = (rows[:, None] < pixels) & in_channels[None, :]
        x = tl.load(sample + (first + rows[:, None]) * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, x - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    count = pixels.to(tl.float32)
    offset = tl.sum(s1, axis=0) / count  # the span's mean minus the pivot
    # M2 = Σd² − n·offset²: both terms exceed M2 by n·offset², which the first tile bounds (see above)
    m2 = tl.maximum(tl.sum(s2, axis=0) - count * offset * offset, 0.0)
    out = (n * splits + split) * C + cols
    tl.store(count_ptr + n * splits + split, count)
    tl.store(mean_ptr + out, pivot + offset, mask=in_channels)
    tl.store(m2_ptr + out, m2, mask=in_channels)


@triton.jit
def _group_statistics(count_ptr, mean_ptr, m2_ptr, shift_ptr, group_mean_ptr, rstd_ptr, C, SPLITS, eps,
                      PER_GROUP: tl.constexpr, SPLITS_PAD: tl.constexpr, PER_GROUP_PAD: tl.constexpr,
                      HAS_SHIFT: tl.constexpr):
    group, n = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    channels = tl.arange(0, PER_GROUP_PAD)
    valid = (splits[:, None] < SPLITS) & (channels[None, :] < PER_GROUP)
    offsets = (n * SPLITS + splits[:, None]) * C + group * PER_GROUP + channels[None, :]
    count = tl.load(count_ptr + n * SPLITS + splits, mask=splits < SPLITS, other=0.0)[:, None]
    mean = tl.load(mean_ptr + offsets, mask=valid, other=0.0)
    if HAS_SHIFT:  # a per-channel shift moves each channel's mean and leaves its M2 as it is
        mean += tl.load(shift_ptr + group * PER_GROUP + channels, mask=channels < PER_GROUP, other=0.0).to(tl.float32)[None, :]
    m2 = tl.load(m2_ptr + offsets, mask=valid, other=0.0)
    pixels = tl.where(valid, count, 0.0)
    total = tl.sum(tl.sum(pixels, axis=1), axis=0)
    group_mean = tl.sum(tl.sum(pixels * mean, axis=1), axis=0) / total
    deviation = mean - group_mean
    group_m2 = tl.sum(tl.sum(tl.where(valid, m2 + pixels * deviation * deviation, 0.0), axis=1), axis=0)
    tl.store(group_mean_ptr + n * (C // PER_GROUP) + group, group_mean)
    tl.store(rstd_ptr + n * (C // PER_GROUP) + group, 1.0 / tl.sqrt(group_m2 / total + eps))


@triton.jit
def _normalize_act(x_ptr, y_ptr, shift_ptr, group_mean_ptr, rstd_ptr, weight_ptr, bias_ptr, HW, C,
                   PER_GROUP: tl.constexpr, ROWS: tl.constexpr, C_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, FAST: tl.constexpr):
    tile, n = tl.program_id(0), tl.program_id(1)
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, C_PAD)
    in_channels = cols < C
    valid = (rows[:, None] < HW) & in_channels[None, :]
    offsets = n.to(tl.int64) * HW * C + rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    groups = n * (C // PER_GROUP) + cols // PER_GROUP
    mean = tl.load(group_mean_ptr + groups, mask=in_channels, other=0.0)
    scale = tl.load(rstd_ptr + groups, mask=in_channels, other=0.0)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_channels, other=0.0).to(tl.float32)[None, :]
    if SILU:
        if FAST:
            y = tl.fdiv(y, 1.0 + tl.exp(-y))
        else:
            y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_bias(y_ptr, bias_ptr, residual_ptr, M, C,
              ROWS: tl.constexpr, C_PAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, C_PAD)
    valid = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    y += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _interleave_phases(o_ptr, bias_ptr, y_ptr, M, H, W, C,
                       ROWS: tl.constexpr, C_PAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    # output pixel (n, 2i + a, 2j + b) is phase (a, b) of the low-resolution pixel (i + a, j + b)
    pixels = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, C_PAD)
    column = pixels % (2 * W)
    row = (pixels // (2 * W)) % (2 * H)
    n = pixels // (4 * H * W)
    a, b = row % 2, column % 2
    source = (n * (H + 1) + row // 2 + a) * (W + 1) + column // 2 + b
    valid = (pixels[:, None] < M) & (cols[None, :] < C)
    y = tl.load(o_ptr + source[:, None] * (4 * C) + ((2 * a + b) * C)[:, None] + cols[None, :], mask=valid, other=0.0)
    y = y.to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + pixels[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=valid)


def _warps(count: int) -> dict:
    """Launch options: `count` warps on a GPU, none under the interpreter (which takes none)."""
    return {} if devices.INTERPRETING else {"num_warps": count}


def _tile_rows(elements: int, hw: int, c_pad: int) -> int:
    return max(1, min(elements // c_pad, triton.next_power_of_2(hw)))


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


def _statistics(x: torch.Tensor, num_groups: int, eps: float, shift: torch.Tensor | None) -> torch.Tensor:
    """(2, N, num_groups) float32: each group's mean and 1/std of `x + shift` (biased variance + eps),
    by `_partial_moments` then `_group_statistics`; `x` a non-empty channels-last map."""
    N, C, H, W = x.shape
    hw, c_pad = H * W, triton.next_power_of_2(C)
    # spans of whole tiles, as many as give each SM a few programs over the batch
    rows = _tile_rows(MOMENTS_TILE_ELEMENTS, hw, c_pad)
    tiles = triton.cdiv(hw, rows)
    tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(x.device), N))))
    splits = triton.cdiv(tiles, tiles_per_split)
    partial = torch.empty((2, N, splits, C), device=x.device, dtype=torch.float32)
    counts = torch.empty((N, splits), device=x.device, dtype=torch.float32)
    statistics = torch.empty((2, N, num_groups), device=x.device, dtype=torch.float32)
    _partial_moments[(splits, N)](x, counts, partial[0], partial[1], hw, C, tiles_per_split * rows,
                                  ROWS=rows, C_PAD=c_pad, **_warps(MOMENTS_WARPS))
    per_group = C // num_groups
    _group_statistics[(num_groups, N)](counts, partial[0], partial[1], shift, statistics[0], statistics[1], C, splits, eps,
                                       PER_GROUP=per_group, SPLITS_PAD=triton.next_power_of_2(splits),
                                       PER_GROUP_PAD=triton.next_power_of_2(per_group), HAS_SHIFT=shift is not None,
                                       **_warps(4))
    return statistics


@torch.no_grad()
def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """`F.group_norm(x + shift, num_groups, weight, bias, eps)`, then SiLU if `silu`, for a
    channels-last (N, C, H, W) map and an optional per-channel `shift` (C,) (a convolution's bias,
    added here in float32 instead of in a pass of its own); the result is channels-last in x's dtype.
    No autograd (inference)."""
    _check_map("group_norm", x)
    N, C, H, W = x.shape
    if C % num_groups:
        raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias), ("shift", shift)):
        _check_channels("group_norm", name, t, C)
    hw = H * W
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return y
    statistics = _statistics(x, num_groups, eps, shift)
    rows = _tile_rows(TILE_ELEMENTS, hw, triton.next_power_of_2(C))
    _normalize_act[(triton.cdiv(hw, rows), N)](x, y, shift, statistics[0], statistics[1], weight, bias, hw, C,
                               PER_GROUP=C // num_groups, ROWS=rows, C_PAD=triton.next_power_of_2(C), HAS_SHIFT=shift is not None,
                               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, FAST=FAST_DIVISION,
                               **_warps(4))
    return y


@torch.no_grad()
def add_bias_(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y += bias[channel] (+ residual), in place on a channels-last (N, C, H, W) map, summed in
    float32 and rounded once; returns y. For a convolution run without its bias, and the residual
    connection after it."""
    _check_map("add_bias_", y)
    _check_channels("add_bias_", "bias", bias, y.shape[1])
    if residual is not None and (residual.shape != y.shape or residual.dtype != y.dtype or not supports(residual)):
        raise ValueError(f"add_bias_: the residual must be a channels-last map like y {tuple(y.shape)}, {y.dtype}; "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    if y.numel() == 0:
        return y
    C = y.shape[1]
    pixels, c_pad = y.numel() // C, triton.next_power_of_2(C)
    rows = _tile_rows(TILE_ELEMENTS, pixels, c_pad)
    _add_bias[(triton.cdiv(pixels, rows),)](y, bias, residual, pixels, C, ROWS=rows, C_PAD=c_pad,
                                            HAS_RESIDUAL=residual is not None, **_warps(4))
    return y


@torch.no_grad()
def interleave_phases(o: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The (N, C, 2H, 2W) map whose pixel (2i + a, 2j + b) is channel block 2a + b of `o`'s pixel
    (i + a, j + b), plus `bias` (C,): `o` (N, 4C, H + 1, W + 1) holds the four phases of a 2× upsampled
    map, each computed at low resolution (the sub-pixel form of a nearest-neighbour 2× upsample and a
    3×3 convolution: `hmar.tokenizer_modules.Upsample`). Channels-last in and out, one pass."""
    _check_map("interleave_phases", o)
    N, C4, H1, W1 = o.shape
    if C4 % 4 or H1 < 2 or W1 < 2:
        raise ValueError(f"interleave_phases: needs (N, 4C, H + 1, W + 1) with H, W >= 1, got {tuple(o.shape)}")
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    _check_channels("interleave_phases", "bias", bias, C)
    y = torch.empty((N, C, 2 * H, 2 * W), device=o.device, dtype=o.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    pixels, c_pad = N * 4 * H * W, triton.next_power_of_2(C)
    rows = _tile_rows(TILE_ELEMENTS, pixels, c_pad)
    _interleave_phases[(triton.cdiv(pixels, rows),)](o, bias, y, pixels, H, W, C, ROWS=rows, C_PAD=c_pad,
                                                     HAS_BIAS=bias is not None, **_warps(4))
    return y
