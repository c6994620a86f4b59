"""The channels-last decoder kernels (`hmar.kernels.channels_last`) against a padded baseline, at the
shapes of a half-precision d16 decoder decoding a chunk of 8 images at 256 px, and the whole decoder
with each.

    python recipes/benchmarks/channels_last_kernels.py [--out kernels.md] [--seconds 150] [--no-decoder] [--no-sweep]
    TRITON_INTERPRET=1 python recipes/benchmarks/channels_last_kernels.py --tiny   # the CPU: tiny shapes, runs once

Baseline ("padded", copied below): each program holds whole pixels, their C channels padded to the
next power of two in registers (for 160, 320 and 640 channels 3/8 of the lanes masked off), and
every norm runs its own statistics pass. Measured ("blocked"): the module's kernels, programs per
channel block with no masked lanes, and the statistics handed over by the kernel that wrote the map
(`Moments`) where the decoder has them.

The shapes come from the decoder's config (`tokenizer_preset(256)`: its channels and resolution
per level, and the middle's). Per shape, in float16 with channel means 10³ times their spread (the
statistics' hard case): the statistics alone, GroupNorm + SiLU, the bias + residual add, the add
followed by the norm that reads its output (with handed-over moments on the blocked side), and
where an upsample writes the map, the phase interleave. Each is GPU time per call from replays of
one CUDA graph of calls over enough maps in turn that they do not fit in L2, with the bytes each
must move per µs (GB/s; for the add + norm pair, the 5 passes it needs without a statistics pass),
and the largest error against float64 (the statistics: of 1/std, relative; the others: of the
output, absolute). Then the whole decoder (64 images in chunks of 8, CUDA graph, decoder.py's
harness) with the padded kernels, the blocked ones without handed-over moments, and the default;
then, in the time left, a sweep of the blocked kernels' launch constants (µs per decode of a chunk,
summed over the decoder's norms and adds).

Stops starting new measurements after `--seconds` (the table says what it left out).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import hmar.tokenizer_modules as modules
from hmar.kernels import channels_last as blocked

GROUPS = 32
CHUNK = 8  # images per decoder call, as the sampler decodes
PADDED_TILE_ELEMENTS = 8192  # ROWS × padded channels per element-wise program
PADDED_MOMENTS_TILE_ELEMENTS = 2048  # ROWS × padded channels per step of a statistics program
PADDED_MOMENTS_WARPS = 8
PADDED_PROGRAMS_PER_SM = 4


@triton.jit
def padded_partial_moments(x_ptr, count_ptr, mean_ptr, m2_ptr, HW, C, SPAN,
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
def padded_group_statistics(count_ptr, mean_ptr, m2_ptr, shift_ptr, group_mean_ptr, rstd_ptr, C, SPLITS, eps,
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
def padded_normalize_act(x_ptr, y_ptr, shift_ptr, group_mean_ptr, rstd_ptr, weight_ptr, bias_ptr, HW, C,
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
def padded_add_bias(y_ptr, bias_ptr, residual_ptr, M, C,
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
def padded_interleave_phases(o_ptr, bias_ptr, y_ptr, M, H, W, C,
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


@triton.jit
def contiguous_partial_moments(x_ptr, mean_ptr, m2_ptr, HW, C, SPAN,
                               LANES: tl.constexpr, CB: tl.constexpr, NB: tl.constexpr):
    # A sample's (HW, C) rows as (HW·NB, CB) rows: lane l reads row first·NB + i·LANES' + l, which
    # holds channel block l % NB of pixel first + i·P + l // NB, with LANES' = P·NB of the LANES lanes
    # used, so that each lane's block never changes and a tile is one contiguous run of the map.
    split, n = tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    lanes = tl.arange(0, LANES)
    P: tl.constexpr = LANES // NB  # pixels per step
    used = lanes < P * NB
    block = lanes % NB
    step = lanes // NB
    cols = tl.arange(0, CB)
    first = split * SPAN
    pixels = tl.minimum(SPAN, HW - first)
    span = x_ptr + (n.to(tl.int64) * HW + first) * C + lanes[:, None] * CB + cols[None, :]
    head = (used & (step < pixels))[:, None]
    x = tl.load(span, mask=head, other=0.0).to(tl.float32)
    first_pixels = tl.minimum(pixels, P).to(tl.float32)
    pivot = tl.zeros((LANES, CB), tl.float32)
    for b in tl.static_range(NB):  # each block's mean over the first step, given to its lanes
        mine = (block == b)[:, None]
        pivot = tl.where(mine, (tl.sum(tl.where(mine & head, x, 0.0), axis=0) / first_pixels)[None, :], pivot)
    s1 = tl.where(head, x - pivot, 0.0)
    s2 = s1 * s1
    for i in range(1, tl.cdiv(pixels, P)):
        valid = (used & (i * P + step < pixels))[:, None]
        x = tl.load(span + i * P * C, mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, x - pivot, 0.0)
        s1 += d
        s2 += d * d
    count = pixels.to(tl.float32)
    for b in tl.static_range(NB):
        mine = (block == b)[:, None] & used[:, None]
        offset = tl.sum(tl.where(mine, s1, 0.0), axis=0) / count
        m2 = tl.maximum(tl.sum(tl.where(mine, s2, 0.0), axis=0) - count * offset * offset, 0.0)
        p = tl.max(tl.where(mine, pivot, float("-inf")), axis=0)
        out = (n * splits + split) * C + b * CB + cols
        tl.store(mean_ptr + out, p + offset)
        tl.store(m2_ptr + out, m2)


def contiguous_partials(x: torch.Tensor) -> blocked.Moments:
    """`blocked._partials` by `contiguous_partial_moments` (lanes of a program spread over the channel
    blocks, not a program per block): the same spans' moments, for `blocked._statistics`. Only for maps
    whose channels split into blocks (not padded)."""
    N, C, H, W = x.shape
    hw, block = H * W, blocked.channel_block(C)
    blocks = C // block
    lanes = triton.next_power_of_2(max(blocks, blocked.MOMENTS_TILE_ELEMENTS // block))
    step = lanes // blocks
    steps = triton.cdiv(hw, step)
    wanted = triton.cdiv(blocked.PROGRAMS_PER_SM * blocked._multiprocessors(x.device), N)
    steps_per_split = triton.cdiv(steps, max(1, min(steps, wanted)))
    moments = blocked._empty_moments(x, triton.cdiv(steps, steps_per_split), steps_per_split * step)
    contiguous_partial_moments[(1, moments.partials.shape[2], N)](x, moments.partials[0], moments.partials[1], hw, C, moments.span,
                                                                  LANES=lanes, CB=block, NB=blocks,
                                                                  **blocked._warps(blocked.MOMENTS_WARPS))
    return moments


class Padded:
    """The padded kernels behind the module's interface (the decoder's `_channels_last_kernels`):
    they emit no moments, so every norm runs its statistics pass."""
    supports = staticmethod(blocked.supports)

    @staticmethod
    def statistics(x, num_groups, eps, shift=None):
        N, C, H, W = x.shape
        hw, c_pad = H * W, triton.next_power_of_2(C)
        rows = blocked._tile_rows(PADDED_MOMENTS_TILE_ELEMENTS, hw, c_pad)
        tiles = triton.cdiv(hw, rows)
        wanted = triton.cdiv(PADDED_PROGRAMS_PER_SM * blocked._multiprocessors(x.device), N)
        tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, wanted)))
        splits = triton.cdiv(tiles, tiles_per_split)
        partial = torch.empty((2, N, splits, C), device=x.device, dtype=torch.float32)
        counts = torch.empty((N, splits), device=x.device, dtype=torch.float32)
        statistics = torch.empty((2, N, num_groups), device=x.device, dtype=torch.float32)
        padded_partial_moments[(splits, N)](x, counts, partial[0], partial[1], hw, C, tiles_per_split * rows,
                                            ROWS=rows, C_PAD=c_pad, **blocked._warps(PADDED_MOMENTS_WARPS))
        per_group = C // num_groups
        padded_group_statistics[(num_groups, N)](counts, partial[0], partial[1], shift, statistics[0], statistics[1], C, splits, eps,
                                                 PER_GROUP=per_group, SPLITS_PAD=triton.next_power_of_2(splits),
                                                 PER_GROUP_PAD=triton.next_power_of_2(per_group), HAS_SHIFT=shift is not None,
                                                 **blocked._warps(4))
        return statistics

    @staticmethod
    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, shift=None, moments=None):
        N, C, H, W = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        statistics = Padded.statistics(x, num_groups, eps, shift)
        rows = blocked._tile_rows(PADDED_TILE_ELEMENTS, H * W, triton.next_power_of_2(C))
        padded_normalize_act[(triton.cdiv(H * W, rows), N)](
            x, y, shift, statistics[0], statistics[1], weight, bias, H * W, C, PER_GROUP=C // num_groups, ROWS=rows,
            C_PAD=triton.next_power_of_2(C), HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SILU=silu, FAST=blocked.FAST_DIVISION, **blocked._warps(4))
        return y

    @staticmethod
    def add_bias_(y, bias, residual=None, moments=False):
        C = y.shape[1]
        pixels, c_pad = y.numel() // C, triton.next_power_of_2(C)
        rows = blocked._tile_rows(PADDED_TILE_ELEMENTS, pixels, c_pad)
        padded_add_bias[(triton.cdiv(pixels, rows),)](y, bias, residual, pixels, C, ROWS=rows, C_PAD=c_pad,
                                                      HAS_RESIDUAL=residual is not None, **blocked._warps(4))
        return (y, None) if moments else y

    @staticmethod
    def interleave_phases(o, bias=None, moments=False):
        N, C4, H1, W1 = o.shape
        C, H, W = C4 // 4, H1 - 1, W1 - 1
        y = torch.empty((N, C, 2 * H, 2 * W), device=o.device, dtype=o.dtype, memory_format=torch.channels_last)
        pixels, c_pad = N * 4 * H * W, triton.next_power_of_2(C)
        rows = blocked._tile_rows(PADDED_TILE_ELEMENTS, pixels, c_pad)
        padded_interleave_phases[(triton.cdiv(pixels, rows),)](o, bias, y, pixels, H, W, C, ROWS=rows, C_PAD=c_pad,
                                                               HAS_BIAS=bias is not None, **blocked._warps(4))
        return (y, None) if moments else y


def _without_moments(kernels):
    """`kernels`' interface with the writers' moments left out: every norm runs its statistics pass."""
    def add_bias_(y, bias, residual=None, moments=False):
        y = kernels.add_bias_(y, bias, residual)
        return (y, None) if moments else y

    def interleave_phases(o, bias=None, moments=False):
        y = kernels.interleave_phases(o, bias)
        return (y, None) if moments else y

    return types.SimpleNamespace(supports=kernels.supports, group_norm=kernels.group_norm, add_bias_=add_bias_,
                                 interleave_phases=interleave_phases)


def decoder_shapes(config) -> list[tuple[tuple[int, int, int, int], bool]]:
    """((N, C, H, W), written by an upsample) of the maps the decoder normalises, lowest resolution
    first: the middle's, then each level's (a level below the top one is written by an upsample)."""
    size = config.image_size // config.downsample
    shapes = [((CHUNK, config.ch * config.ch_mult[-1], size, size), False)]
    for level in reversed(range(len(config.ch_mult))):
        shape = (CHUNK, config.ch * config.ch_mult[level], size, size)
        if shape != shapes[-1][0]:
            shapes.append((shape, level < len(config.ch_mult) - 1))
        size *= 2
    return shapes


class Timer:
    """GPU µs per call: replays of one CUDA graph of `calls` calls (CUDA), or one call's wall time
    under the interpreter (which only shows that the code runs)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, step, calls: int) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            step(0)
            return (time.perf_counter() - t0) * 1e6
        step(0)
        step(1)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                step(i)
        us = triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median") * 1e3 / calls
        del graph
        return us


def _maps(shape, count, gen, mean, device) -> list[torch.Tensor]:
    N, C, H, W = shape
    means = mean * (1 + 0.1 * torch.rand(1, C, 1, 1, device=device, generator=gen))
    return [(torch.randn(shape, device=device, generator=gen) + means).half().contiguous(memory_format=torch.channels_last)
            for _ in range(count)]


def _rstd_error(statistics: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.double().reshape(x.shape[0], GROUPS, -1).var(-1, unbiased=False)
    return float((statistics[1].double() * (ref + 1e-6).sqrt() - 1).abs().max())


def _max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max())


def kernel_rows(shape, upsampled: bool, timer: Timer, device) -> list[str]:
    """The table's rows for one map shape: padded and blocked, µs, GB/s, largest error."""
    N, C, H, W = shape
    elements = N * C * H * W
    map_bytes = 2 * elements
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) if timer.cuda else 0
    count = max(2, min(64, math.ceil(3 * l2 / map_bytes)))  # maps in turn: together 3× the L2
    calls = max(20, count)
    gen = torch.Generator(device).manual_seed(0)
    xs = _maps(shape, count, gen, 1000.0, device)
    residuals = _maps(shape, count, gen, 0.0, device)
    weight, bias = torch.randn(C, device=device, generator=gen), torch.randn(C, device=device, generator=gen)
    rows = []

    def row(op, passes, padded_us, blocked_us, padded_err, blocked_err):
        rate = lambda us: passes * map_bytes / us / 1e3  # noqa: E731  (GB/s)
        rows.append(f"| {N}, {C}, {H}, {W} | {op} | {padded_us:.1f} | {rate(padded_us):.0f} | {blocked_us:.1f} | "
                    f"{rate(blocked_us):.0f} | {blocked_us / padded_us:.2f} | {padded_err:.1e} | {blocked_err:.1e} |")

    # the statistics alone
    padded = timer(lambda i: Padded.statistics(xs[i % count], GROUPS, 1e-6), calls)
    new = timer(lambda i: blocked._statistics(xs[i % count], GROUPS, 1e-6, None), calls)
    row("statistics", 1, padded, new, _rstd_error(Padded.statistics(xs[0], GROUPS, 1e-6), xs[0]),
        _rstd_error(blocked._statistics(xs[0], GROUPS, 1e-6, None), xs[0]))
    if C % blocked.channel_block(C) == 0:  # the other way to split the channels, in the "blocked" columns
        contiguous = timer(lambda i: blocked._statistics(xs[i % count], GROUPS, 1e-6, None, contiguous_partials(xs[i % count])), calls)
        row("statistics, lanes over the channel blocks (a program reads a contiguous run)", 1, padded, contiguous,
            _rstd_error(Padded.statistics(xs[0], GROUPS, 1e-6), xs[0]),
            _rstd_error(blocked._statistics(xs[0], GROUPS, 1e-6, None, contiguous_partials(xs[0])), xs[0]))
    # GroupNorm + SiLU: statistics, then a read and a write
    ref = F.silu(F.group_norm(xs[0].double(), GROUPS, weight.double(), bias.double(), 1e-6))
    padded = timer(lambda i: Padded.group_norm(xs[i % count], GROUPS, weight, bias, 1e-6, True), calls)
    new = timer(lambda i: blocked.group_norm(xs[i % count], GROUPS, weight, bias, 1e-6, True), calls)
    row("group_norm + SiLU", 3, padded, new, _max_error(Padded.group_norm(xs[0], GROUPS, weight, bias, 1e-6, True), ref),
        _max_error(blocked.group_norm(xs[0], GROUPS, weight, bias, 1e-6, True), ref))
    del ref
    # bias + residual, in place (the maps drift by the bias each call: the timing does not care)
    ys = _maps(shape, count, gen, 0.0, device)
    ref = ys[0].double() + bias.double().view(-1, 1, 1) + residuals[0].double()
    errors = [_max_error(kernels.add_bias_(ys[0].clone(), bias, residuals[0]), ref) for kernels in (Padded, blocked)]
    del ref
    padded = timer(lambda i: Padded.add_bias_(ys[i % count], bias, residuals[i % count]), calls)
    new = timer(lambda i: blocked.add_bias_(ys[i % count], bias, residuals[i % count]), calls)
    row("add_bias_ + residual", 3, padded, new, *errors)

    # the add, then the norm that reads its output: the blocked add hands its moments over
    def padded_pair(i):
        return Padded.group_norm(Padded.add_bias_(ys[i % count], bias, residuals[i % count]), GROUPS, weight, bias, 1e-6, True)

    def blocked_pair(i):
        y, moments = blocked.add_bias_(ys[i % count], bias, residuals[i % count], moments=True)
        return blocked.group_norm(y, GROUPS, weight, bias, 1e-6, True, moments=moments)

    errors = []
    for pair in (padded_pair, blocked_pair):
        y0 = ys[0].clone()
        out = pair(0)
        ref = F.silu(F.group_norm(ys[0].double(), GROUPS, weight.double(), bias.double(), 1e-6))
        errors.append(_max_error(out, ref))
        ys[0].copy_(y0)
        del ref
    row("add_bias_ + residual, then group_norm + SiLU", 5, timer(padded_pair, calls), timer(blocked_pair, calls), *errors)
    if upsampled:  # the phase interleave that writes this map, with its moments on the blocked side
        phases = [torch.randn(N, 4 * C, H // 2 + 1, W // 2 + 1, device=device, generator=gen).half()
                  .contiguous(memory_format=torch.channels_last) for _ in range(count)]
        ref = Padded.interleave_phases(phases[0], bias).double()  # checked against float64 below
        exact = torch.empty_like(ref)
        for a in (0, 1):
            for b in (0, 1):
                p = 2 * a + b
                exact[:, :, a::2, b::2] = phases[0][:, p * C:(p + 1) * C, a:a + H // 2, b:b + W // 2].double() + bias.double().view(-1, 1, 1)
        errors = [_max_error(ref, exact), _max_error(blocked.interleave_phases(phases[0], bias, moments=True)[0], exact)]
        del ref, exact
        passes = 1 + 4 * (H // 2 + 1) * (W // 2 + 1) / (H * W)  # write the map, read the phases
        row("interleave_phases (blocked: + moments)", passes, timer(lambda i: Padded.interleave_phases(phases[i % count], bias), calls),
            timer(lambda i: blocked.interleave_phases(phases[i % count], bias, moments=True), calls), *errors)
    return rows


def load_decoder_benchmark():
    path = Path(__file__).with_name("decoder.py")
    spec = importlib.util.spec_from_file_location("decoder_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def decoder_rows(images: int, rounds: int) -> list[str]:
    """The whole decoder (decoder.py's harness: chunks of 8, one CUDA graph) with each set of kernels."""
    bench = load_decoder_benchmark()
    variants = [
        bench.Variant("padded kernels, a statistics pass per norm", patches={(modules, "_channels_last_kernels"): lambda: Padded}),
        bench.Variant("blocked kernels, a statistics pass per norm",
                      patches={(modules, "_channels_last_kernels"): lambda: _without_moments(blocked)}),
        bench.Variant("blocked kernels, handed-over moments (default)")]
    torch.manual_seed(0)
    reference_tokenizer = bench.build_tokenizer(None)
    state = reference_tokenizer.state_dict()
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 4096, (images, p * p), generator=generator) for p in reference_tokenizer.patch_nums]
    with torch.no_grad():
        f_hat = reference_tokenizer.tokens_to_f_hat(tokens)
        reference = reference_tokenizer.decode(f_hat[:1])  # float32 on the CPU
    prepared = [bench.prepare(variant, state, f_hat.cuda(), reference, False) for variant in variants]
    bench.time_rounds(prepared, rounds)
    base = sorted(prepared[0].times)[len(prepared[0].times) // 2]
    rows = []
    for item in prepared:
        ms = sorted(item.times)[len(item.times) // 2]
        rows.append(f"| {item.variant.name} | {ms:.2f} | {min(item.times):.2f}-{max(item.times):.2f} | {base / ms:.3f}x | "
                    f"{item.row['kernels']} | {item.row['max_levels']:.0f} | {item.row['pct_over_1_level']:.3f} |")
    return rows


def sweep_rows(shapes, timer: Timer, device, deadline: float) -> list[str]:
    """For launch constants of the blocked kernels, while time is left: µs of the statistics pass, and
    of an add (with moments) then a norm, summed over one map of each shape."""
    gen = torch.Generator(device).manual_seed(1)
    # the adds add zeros (a zero bias and residual), so that the maps stay as they are however often they run
    maps = {shape: (_maps(shape, 2, gen, 1000.0, device), [torch.zeros_like(x) for x in _maps(shape, 2, gen, 0.0, device)])
            for shape, _ in shapes}
    weight = {shape: torch.randn(shape[1], device=device, generator=gen) for shape, _ in shapes}
    saved = (blocked.TILE_ELEMENTS, blocked.ELEMENTWISE_WARPS, blocked.MOMENTS_TILE_ELEMENTS, blocked.MOMENTS_WARPS, blocked.PROGRAMS_PER_SM)
    rows = []

    def chunk_us(kind: str) -> float:
        total = 0.0
        for shape, _ in shapes:
            xs, zeros = maps[shape]
            w = weight[shape]
            if kind == "statistics":
                total += timer(lambda i: blocked._statistics(xs[i % 2], GROUPS, 1e-6, None), 20)
            else:
                no_bias = torch.zeros_like(w)

                def pair(i):
                    y, moments = blocked.add_bias_(xs[i % 2], no_bias, zeros[i % 2], moments=True)
                    return blocked.group_norm(y, GROUPS, w, w, 1e-6, True, moments=moments)
                total += timer(pair, 20)
        return total

    try:
        for tile in (2048, 4096, 8192):
            for warps in (4, 8):
                for per_sm in (2, 4, 8):
                    if time.monotonic() > deadline:
                        return rows + ["| (left out: --seconds reached) | | |"]
                    blocked.MOMENTS_TILE_ELEMENTS, blocked.MOMENTS_WARPS, blocked.PROGRAMS_PER_SM = tile, warps, per_sm
                    rows.append(f"| statistics | tile {tile}, {warps} warps, {per_sm} programs/SM | {chunk_us('statistics'):.1f} |")
        blocked.MOMENTS_TILE_ELEMENTS, blocked.MOMENTS_WARPS, blocked.PROGRAMS_PER_SM = saved[2:]
        for tile in (4096, 8192, 16384):
            for warps in (4, 8):
                if time.monotonic() > deadline:
                    return rows + ["| (left out: --seconds reached) | | |"]
                blocked.TILE_ELEMENTS, blocked.ELEMENTWISE_WARPS = tile, warps
                rows.append(f"| add_bias_ with moments, then group_norm + SiLU | tile {tile}, {warps} warps | {chunk_us('pair'):.1f} |")
    finally:
        (blocked.TILE_ELEMENTS, blocked.ELEMENTWISE_WARPS, blocked.MOMENTS_TILE_ELEMENTS, blocked.MOMENTS_WARPS,
         blocked.PROGRAMS_PER_SM) = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the tables to this markdown file as they fill")
    parser.add_argument("--seconds", type=float, default=150.0, help="start no new measurement after this many seconds")
    parser.add_argument("--images", type=int, default=64, help="images per decode in the whole-decoder rows")
    parser.add_argument("--rounds", type=int, default=10, help="timed decodes of each whole-decoder variant")
    parser.add_argument("--no-decoder", action="store_true", help="skip the whole-decoder rows")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of launch constants")
    parser.add_argument("--tiny", action="store_true", help="tiny maps, one untimed-quality call each: for the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if not 1 <= args.images <= 1024 or not 1 <= args.rounds <= 1000 or not args.seconds > 0:
        parser.error("--images must be in 1..1024, --rounds in 1..1000, --seconds above 0")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("needs a CUDA device (or --tiny under TRITON_INTERPRET=1)")
    if args.tiny and not blocked.devices.INTERPRETING and not torch.cuda.is_available():
        parser.error("--tiny on the CPU needs TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() and not blocked.devices.INTERPRETING else "cpu")
    deadline = time.monotonic() + args.seconds
    from hmar.config import tokenizer_preset

    config = tokenizer_preset(256)
    shapes = decoder_shapes(config)
    if args.tiny:  # the same channel counts on 2 images of a few pixels
        shapes = [((2, C, max(2, H // 64), max(2, W // 64)), upsampled) for (N, C, H, W), upsampled in shapes]
    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}" if device.type == "cuda"
             else f"CPU under Triton's interpreter (timings meaningless), torch {torch.__version__}, Triton {triton.__version__}")
    lines = [f"# Channels-last decoder kernels: padded baseline against channel blocks; {where}", ""]

    def emit(*new: str) -> None:
        lines.extend(new)
        print(*new, sep="\n", flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    timer = Timer(cuda)
    emit(f"Blocked launch constants: element-wise tile {blocked.TILE_ELEMENTS} ({blocked.ELEMENTWISE_WARPS} warps), statistics tile "
         f"{blocked.MOMENTS_TILE_ELEMENTS} ({blocked.MOMENTS_WARPS} warps, {blocked.PROGRAMS_PER_SM} programs/SM)", "",
         "| N, C, H, W | op | padded µs | padded GB/s | blocked µs | blocked GB/s | blocked / padded | padded max error | blocked max error |",
         "|---|---|---|---|---|---|---|---|---|")
    for shape, upsampled in shapes:
        if time.monotonic() > deadline:
            emit(f"| {', '.join(map(str, shape))} | (left out: --seconds reached) | | | | | | | |")
            continue
        try:
            emit(*kernel_rows(shape, upsampled, timer, device))
        except Exception as exc:  # one shape's failure leaves the others' numbers
            emit(f"| {', '.join(map(str, shape))} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | | | | |")
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_decoder and cuda:
        emit("", f"Whole decoder, {args.images} images at 256 px in chunks of {CHUNK}, one CUDA graph, {args.rounds} interleaved rounds "
             "(decoder.py's harness; levels: against the float32 CPU decoder, first image)", "",
             "| kernels | ms (median) | min-max | vs padded | kernels launched | max levels | % > 1 level |", "|---|---|---|---|---|---|---|")
        if time.monotonic() > deadline - 90:  # preparing three graphed decoders (cuDNN's timing, compilation, capture) takes a minute or so
            emit("| (left out: --seconds reached) | | | | | | |")
        else:
            try:
                emit(*decoder_rows(args.images, args.rounds))
            except Exception as exc:
                emit(f"| FAILED: {type(exc).__name__}: {str(exc)[:300]} | | | | | | |")
    if not args.no_sweep:
        emit("", "Launch constants of the blocked kernels: µs summed over one map of each shape above", "",
             "| kernels | constants | µs |", "|---|---|---|")
        try:
            emit(*sweep_rows(shapes, timer, device, deadline))
        except Exception as exc:
            emit(f"| FAILED: {type(exc).__name__}: {str(exc)[:300]} | | |")


if __name__ == "__main__":
    main()
