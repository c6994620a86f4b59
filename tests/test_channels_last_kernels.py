"""Tests for the channels-last decoder kernels (hmar.kernels.channels_last: GroupNorm(+SiLU) with an
optional per-channel shift, bias (+residual) adds, the sub-pixel upsample's phase interleaving) and
the decoder that runs on them.

CPU: the kernels run under Triton's interpreter in a subprocess (`tests.interpreter`) against a
float64 `F.group_norm` (+ `F.silu`), or float64 sums, of the same rounded input, by ||y − ref|| / ||ref||: fp32 ≤ 1e-5,
fp16 ≤ 1e-3, bf16 ≤ 8e-3 (one rounding of the output: ~2e-4 / ~3e-3 measured). Shapes with partial
tiles, statistics merged over several spans of several tiles, the decoder's channel counts (160, 320,
640: blocks of 32, 64, 128 channels) and others (3 and 40: one padded block; 48, 96: blocks of 16 and
32; 128, 256: powers of two), one-pixel maps, no affine parameters, and maps whose mean is 10³ times
their spread (where E[x²] − E[x]² in float32 would lose
the variance; bound 1e-4 there, see BOUND_OVERRIDES); three of these cases again with
`FAST_DIVISION` (SiLU's division) on, within the same bounds. The statistics alone (each group's
mean and 1/std) against float64 on adversarial inputs (STATISTICS_CASES: means 10³ times the spread
in fp32/fp16/bf16, constant groups, one-channel groups, one-pixel maps, odd H·W and channel counts,
a first tile 10³·std off the rest), with and without a shift: mean within 8 float32 ulps of the
mean + 1e-5·std, 1/std within 5e-6 relative (1e-5 with the far first tile). group_norm on the
moments that add_bias_ (± residual) or interleave_phases emit for the map they write
(FUSED_CASES), with and without a shift: against float64, its statistics within the same bounds, and
against group_norm without the moments; moments of another map refused. The shift against float64 group_norm(x + shift);
the interleaved phases against float64 nearest upsample + 3×3 convolution; `upsample_weight`'s
sub-pixel form exact in float64. A tiny tokenizer's decoder stored channels-last (fused norms and
bias adds, sub-pixel upsamples), and one whose channel count changes (1×1 shortcut convolutions,
their bias left to the residual's add), decodes like the NCHW one (float32, ≤ 1e-5), with a
statistics pass only for each block's norm2 (the other norms take the moments of their input's
writer, which `Decoder.set_fused` picks).

GPU (marked `gpu`): the d16 tokenizer's decoder shapes in float16 against the float64 reference, the
statistics at those shapes on the adversarial inputs (the CPU bounds), group_norm on the writers'
moments at those shapes, add_bias_ and interleave_phases there against float64, and the float16
channels-last and NCHW decoders at 256 px against the float32 one (pixel levels).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

BOUNDS = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
CASES = [
    # (name, (N, C, H, W), groups, dtype, silu, affine, mean, std)
    ("fp32-partial-tiles", (2, 160, 9, 7), 32, "float32", True, True, 0.0, 1.0),
    ("fp16-silu", (2, 160, 9, 7), 32, "float16", True, True, 3.0, 2.0),
    ("bf16-silu", (2, 96, 6, 5), 32, "bfloat16", True, True, 0.0, 1.0),
    ("fp32-multi-tile-no-silu", (1, 64, 16, 16), 32, "float32", False, True, 0.0, 1.0),
    # the decoder's channel counts (blocks of 32, 64, 128 of 160, 320, 640) and others: powers of two
    # (one block of 128, two of 128), one padded block (3 in 4 lanes, 40 in 64), blocks of 16 (48)
    ("fp16-320-odd-map", (2, 320, 5, 3), 32, "float16", True, True, 1.0, 2.0),
    ("bf16-640-tiny", (1, 640, 3, 3), 32, "bfloat16", True, True, 0.0, 1.0),
    ("fp32-160-one-pixel", (3, 160, 1, 1), 32, "float32", True, True, 0.0, 1.0),
    ("fp32-3-channels", (2, 3, 7, 5), 1, "float32", True, True, 0.5, 1.0),
    ("fp16-128", (1, 128, 9, 5), 32, "float16", True, True, 0.0, 1.0),
    ("fp32-256", (1, 256, 5, 5), 32, "float32", False, True, 0.0, 1.0),
    ("bf16-48", (2, 48, 7, 9), 8, "bfloat16", True, True, 0.0, 1.0),
    ("fp32-no-affine-4-groups", (3, 96, 5, 5), 4, "float32", True, False, -1.0, 3.0),
    ("fp32-large-mean", (2, 64, 12, 12), 8, "float32", False, True, 100.0, 0.1),
    # statistics over 25 tiles of 64 pixels (the last 63) in 7 spans of up to 4 (the interpreter's 8 programs)
    ("fp32-spans-of-tiles", (1, 64, 39, 41), 8, "float32", True, True, 2.0, 0.5),
    ("fp32-large-mean-spans", (1, 64, 39, 41), 8, "float32", False, True, 100.0, 0.1),
    # half-precision maps whose mean is 10³ times their spread, odd H·W, channels not a power of two
    ("fp16-mean-1e3-spread", (2, 40, 13, 11), 8, "float16", True, True, 1000.0, 1.0),
    ("bf16-mean-1e3-spread", (2, 40, 13, 11), 8, "bfloat16", True, True, 1000.0, 1.0),
]
# The large-mean case: float32 holds the mean to ~4e-6 (half an ulp at 100), 4e-5 of the spread, which
# bounds any float32 computation; E[x²] − E[x]² would be off by ~10 % of the variance there.
BOUND_OVERRIDES = {"fp32-large-mean": 1e-4, "fp32-large-mean-spans": 1e-4}


FAST_CASES = ("fp32-partial-tiles", "fp16-silu", "fp32-large-mean-spans")  # FAST_DIVISION on: the same bounds


# The statistics alone (`_statistics`: each group's mean and 1/std) against float64 on the same rounded
# input, on inputs built to break them: (name, (N, C, H, W), groups, dtype, mean, std, kind), kind
# "normal" (every channel its own mean, mean ± 10 % around `mean`), "constant" (every other group
# holds one value), "far-head" (the map's first 64 pixels, the first span's first tile under the
# interpreter, 10³·std above the rest: the pivot as far from the span's mean as it can be). Several spans of several tiles where the map is large enough.
STATISTICS_CASES = [
    ("fp32-mean-1e3-spread", (2, 160, 9, 7), 32, "float32", 1000.0, 1.0, "normal"),
    ("fp16-mean-1e3-spread", (2, 160, 9, 7), 32, "float16", 1000.0, 1.0, "normal"),
    ("bf16-mean-1e3-spread", (2, 160, 9, 7), 32, "bfloat16", 1000.0, 1.0, "normal"),
    ("fp32-mean-1e3-spread-spans", (1, 64, 39, 41), 8, "float32", 1000.0, 1.0, "normal"),
    ("fp16-mean-1e3-spread-spans", (1, 40, 39, 41), 8, "float16", -1000.0, 1.0, "normal"),
    ("fp32-constant-groups", (2, 64, 12, 12), 8, "float32", 3.0, 1.0, "constant"),
    ("fp16-constant-groups", (2, 48, 7, 9), 8, "float16", -500.0, 1.0, "constant"),
    ("fp32-one-channel-groups", (2, 24, 13, 11), 24, "float32", 100.0, 0.5, "normal"),
    ("fp32-one-pixel", (3, 24, 1, 1), 4, "float32", 10.0, 1.0, "normal"),
    ("fp32-odd-map-odd-channels", (2, 96, 17, 23), 32, "float32", 0.0, 1.0, "normal"),
    ("fp32-pivot-far-from-mean", (1, 64, 39, 41), 8, "float32", 1000.0, 1.0, "far-head"),
    ("fp16-320-mean-1e3-spread", (2, 320, 7, 9), 32, "float16", 1000.0, 1.0, "normal"),
    ("bf16-640-mean-1e3-spread", (1, 640, 5, 3), 32, "bfloat16", -1000.0, 1.0, "normal"),
    ("fp16-pivot-far-from-mean", (2, 40, 17, 15), 8, "float16", 0.0, 1.0, "far-head"),
]
# |mean − reference| ≤ MEAN_ULPS float32 ulps of the mean + MEAN_SPREAD × std: float32 holds a mean
# of 10³·std only to ~3e-5·std, and the merge of per-span means adds a few ulps.
MEAN_ULPS, MEAN_SPREAD = 8, 1e-5
# |rstd / reference − 1| (≤ ~2e-6 measured): float32 sums of deviations from a pivot. The pivot is
# the mean of a span's first tile, so (span mean − pivot)² ≤ M2 / (the tile's pixels) and the
# cancellation in Σd² − n·offset² costs at most float32's ulp (6e-8) times 1 + the span's tile count
# in the variance, half that in 1/std: the far-head cases, up to ~1e-6 at the GPU's ~40-tile spans
# of a 256² map. FAR_RSTD_BOUND allows 300 tiles.
RSTD_BOUND = 5e-6
FAR_RSTD_BOUND = 1e-5

# The statistics handed over by the map's writer (`Moments`): add_bias_ (with or without a residual)
# or interleave_phases emits them for the map it writes, and group_norm takes them instead of its own
# statistics pass. (name, (N, C, H, W) of the written map, groups, dtype, mean, std, writer): means
# far above the spread (each channel its own, as in STATISTICS_CASES), the decoder's channel counts
# and others, odd H·W, several tiles with a short last one, one-pixel maps. Against float64 group_norm (+ SiLU) of the written map (the BOUNDS), its
# statistics against float64 (the STATISTICS_CASES' bounds), and the result against group_norm of
# the same map without the moments (within the dtype's bound).
FUSED_CASES = [
    ("fp16-160-mean-1e3-spread", (2, 160, 9, 7), 32, "float16", 1000.0, 1.0, "add_bias_+residual"),
    ("bf16-320-mean-1e3-spread", (1, 320, 13, 11), 32, "bfloat16", -1000.0, 1.0, "add_bias_"),
    ("fp32-640-mean-1e3-spread", (2, 640, 3, 5), 32, "float32", 1000.0, 1.0, "add_bias_+residual"),
    ("fp32-3-channels", (2, 3, 11, 13), 1, "float32", 100.0, 0.5, "add_bias_"),
    ("fp32-40-three-tiles", (1, 40, 17, 19), 8, "float32", 3.0, 1.0, "add_bias_+residual"),
    ("fp16-48-one-pixel", (3, 48, 1, 1), 8, "float16", 10.0, 1.0, "add_bias_+residual"),
    ("fp32-96", (2, 96, 6, 5), 32, "float32", 0.0, 1.0, "add_bias_"),
    ("fp16-128-two-tiles", (1, 128, 15, 17), 32, "float16", 500.0, 1.0, "add_bias_+residual"),
    ("fp32-256", (1, 256, 9, 9), 32, "float32", 0.0, 2.0, "add_bias_"),
    ("fp16-160-upsample", (2, 160, 6, 10), 32, "float16", 1000.0, 1.0, "interleave_phases"),
    ("bf16-96-upsample", (1, 96, 10, 14), 32, "bfloat16", 0.0, 1.0, "interleave_phases"),
    ("fp32-40-upsample-tiles", (1, 40, 18, 16), 8, "float32", -100.0, 1.0, "interleave_phases"),
]


def _worker() -> dict:
    from hmar.kernels import channels_last

    results = _group_norm_cases(CASES)
    results["statistics"] = _statistics_worker()
    channels_last.FAST_DIVISION = True
    try:
        results.update({f"fast {name}": r for name, r in _group_norm_cases([c for c in CASES if c[0] in FAST_CASES]).items()})
    finally:
        channels_last.FAST_DIVISION = False
    results["fused"] = _fused_worker()
    results["shift"] = _shift_worker()
    results["add_bias_"] = _add_bias_worker()
    results["interleave_phases"] = _interleave_worker()
    results["decoder"] = _decoder_worker()
    results["decoder with 1×1 shortcuts"] = _decoder_worker((1, 2, 1, 1, 1))  # 32 → 64 → 32 channels
    return results


def _group_norm_cases(cases) -> dict:
    from hmar.kernels.channels_last import group_norm

    results = {}
    for name, shape, groups, dtype_name, silu, affine, mean, std in cases:
        gen = torch.Generator().manual_seed(len(results))
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(getattr(torch, dtype_name))
        x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = (torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)) if affine else (None, None)
        y = group_norm(x, groups, weight, bias, 1e-6, silu)
        ref = F.group_norm(x.double(), groups, None if weight is None else weight.double(), None if bias is None else bias.double(), 1e-6)
        ref = F.silu(ref) if silu else ref
        results[name] = {"err": float((y.double() - ref).norm() / ref.norm()), "finite": bool(torch.isfinite(y).all()),
                         "dtype": str(y.dtype), "channels_last": y.is_contiguous(memory_format=torch.channels_last)}
    return results


def _statistics_input(shape, dtype, mean, std, kind, gen) -> torch.Tensor:
    N, C, H, W = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    x += mean * (1 + 0.1 * torch.rand(1, C, 1, 1, generator=gen, dtype=torch.float64))
    groups = x.view(N, 8, C // 8, H, W)  # (every case's channels split into 8 groups or into finer ones)
    if kind == "constant":
        groups[:, ::2] = groups[:, ::2, :1, :1, :1].clone()
    elif kind == "far-head":
        x.view(N, C, H * W)[:, :, :64] += 1000 * std
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _statistics_worker() -> dict:
    """`_statistics` (mean, 1/std per group) against float64 on STATISTICS_CASES, with and without a shift."""
    from hmar.kernels.channels_last import _statistics

    results, gen = {}, torch.Generator().manual_seed(11)
    for name, shape, groups, dtype_name, mean, std, kind in STATISTICS_CASES:
        x = _statistics_input(shape, getattr(torch, dtype_name), mean, std, kind, gen)
        for shifted in (False, True):
            shift = torch.randn(shape[1], generator=gen) * 5 if shifted else None
            got = _statistics(x, groups, 1e-6, shift).double()
            ref = x.double() + (0 if shift is None else shift.double().view(-1, 1, 1))
            ref = ref.reshape(shape[0], groups, -1)
            ref_mean, ref_var = ref.mean(-1), ref.var(-1, unbiased=False)
            ulp = torch.finfo(torch.float32).eps * ref_mean.abs()
            mean_excess = ((got[0] - ref_mean).abs() / (MEAN_ULPS * ulp + MEAN_SPREAD * ref_var.sqrt() + 1e-30)).max()
            rstd_err = (got[1] * (ref_var + 1e-6).sqrt() - 1).abs().max()
            results[f"{name}{' shifted' if shifted else ''}"] = {
                "mean_over_bound": float(mean_excess), "rstd_err": float(rstd_err),
                "finite": bool(torch.isfinite(got).all()), "constant_groups": int((ref_var == 0).sum())}
    return results


def _statistics_errors(got: torch.Tensor, x: torch.Tensor, groups: int) -> dict:
    """`_statistics`' (mean, 1/std) of the map `x` against float64: the mean's error over its bound
    (MEAN_ULPS, MEAN_SPREAD) and 1/std's relative error."""
    ref = x.double().reshape(x.shape[0], groups, -1)
    ref_mean, ref_var = ref.mean(-1), ref.var(-1, unbiased=False)
    ulp = torch.finfo(torch.float32).eps * ref_mean.abs()
    return {"mean_over_bound": float(((got[0].double() - ref_mean).abs() / (MEAN_ULPS * ulp + MEAN_SPREAD * ref_var.sqrt() + 1e-30)).max()),
            "rstd_err": float((got[1].double() * (ref_var + 1e-6).sqrt() - 1).abs().max()), "finite": bool(torch.isfinite(got).all())}


def _written_map(shape, groups, dtype, mean, std, writer, gen):
    """The map a writer of FUSED_CASES writes, with the moments it emits (bias and residual drawn here,
    on the generator's device)."""
    from hmar.kernels.channels_last import add_bias_, interleave_phases

    N, C, H, W = shape
    device = gen.device
    bias = torch.randn(C, generator=gen, device=device)
    # every channel its own mean, mean ± 10 % around `mean` (as in _statistics_input)
    means = mean * (1 + 0.1 * torch.rand(C, generator=gen, dtype=torch.float64, device=device))
    if writer == "interleave_phases":
        phases = torch.randn(N, 4 * C, H // 2 + 1, W // 2 + 1, generator=gen, dtype=torch.float64, device=device)
        phases = phases * std + means.repeat(4).view(-1, 1, 1)
        return interleave_phases(phases.to(dtype).contiguous(memory_format=torch.channels_last), bias, moments=True)
    y = torch.randn(shape, generator=gen, dtype=torch.float64, device=device) * std + means.view(-1, 1, 1)
    y = y.to(dtype).contiguous(memory_format=torch.channels_last)
    residual = (torch.randn(shape, generator=gen, device=device) * std).to(dtype).contiguous(memory_format=torch.channels_last)
    return add_bias_(y, bias, residual if writer.endswith("+residual") else None, moments=True)


def _fused_worker() -> dict:
    """group_norm on the moments that the map's writer emitted (FUSED_CASES), with and without a
    shift: against float64, its statistics against float64, and against group_norm without them."""
    from hmar.kernels.channels_last import _statistics, group_norm

    results, gen = {}, torch.Generator().manual_seed(13)
    for name, shape, groups, dtype_name, mean, std, writer in FUSED_CASES:
        x, moments = _written_map(shape, groups, getattr(torch, dtype_name), mean, std, writer, gen)
        assert tuple(x.shape) == shape
        weight, bias = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
        for shifted in (False, True):
            shift = torch.randn(shape[1], generator=gen) * 5 if shifted else None
            y = group_norm(x, groups, weight, bias, 1e-6, True, shift=shift, moments=moments)
            unfused = group_norm(x, groups, weight, bias, 1e-6, True, shift=shift)
            shifted_x = x.double() + (0 if shift is None else shift.double().view(-1, 1, 1))
            ref = F.silu(F.group_norm(shifted_x, groups, weight.double(), bias.double(), 1e-6))
            statistics = _statistics(x, groups, 1e-6, shift, moments)
            results[f"{name}{' shifted' if shifted else ''}"] = {
                "err": float((y.double() - ref).norm() / ref.norm()),
                "vs_unfused": float((y.double() - unfused.double()).norm() / unfused.double().norm()),
                "channels_last": y.is_contiguous(memory_format=torch.channels_last), "dtype": str(y.dtype),
                "tiles": moments.partials.shape[2], **_statistics_errors(statistics, shifted_x, groups)}
    # moments that do not belong to the map are refused
    x, moments = _written_map((1, 64, 5, 5), 8, torch.float32, 0.0, 1.0, "add_bias_", gen)
    errors = []
    for bad in (moments._replace(span=moments.span // 2), moments._replace(partials=moments.partials[:, :, :, :32]),
                moments._replace(partials=moments.partials.half())):
        try:
            group_norm(x, 8, moments=bad)
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    results["refused"] = errors
    return results


def _shift_worker() -> dict:
    """group_norm with a per-channel shift (a convolution's bias) against float64 group_norm(x + shift),
    where the shift moves each channel's mean far from the others in its group."""
    from hmar.kernels.channels_last import group_norm

    results, gen = {}, torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float16):
        shape = (2, 64, 9, 11)
        x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
        weight, bias, shift = (torch.randn(64, generator=gen) for _ in range(3))
        shift = shift * 5
        y = group_norm(x, 8, weight, bias, 1e-6, silu=True, shift=shift)
        ref = F.silu(F.group_norm(x.double() + shift.double().view(-1, 1, 1), 8, weight.double(), bias.double(), 1e-6))
        results[str(dtype)[6:]] = {"err": float((y.double() - ref).norm() / ref.norm()),
                                   "channels_last": y.is_contiguous(memory_format=torch.channels_last)}
    return results


def _interleave_worker() -> dict:
    """interleave_phases after the sub-pixel convolution against the float64 nearest-upsample + 3×3
    convolution it stands for; float32 and float16 maps, odd sizes, channels not a power of two."""
    from hmar.kernels.channels_last import interleave_phases
    from hmar.tokenizer_modules import upsample_weight

    results, gen = {}, torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 24, 5, 7, generator=gen)
        weight, bias = torch.randn(40, 24, 3, 3, generator=gen), torch.randn(40, generator=gen)
        ref = F.conv2d(F.interpolate(x.double(), scale_factor=2, mode="nearest"), weight.double(), bias.double(), padding=1)
        phases = F.conv2d(x.double(), upsample_weight(weight.double()), None, padding=1).to(dtype)
        y = interleave_phases(phases.contiguous(memory_format=torch.channels_last), bias)
        results[str(dtype)[6:]] = {"err": float((y.double() - ref).norm() / ref.norm()), "dtype": str(y.dtype),
                                   "channels_last": y.is_contiguous(memory_format=torch.channels_last)}
    return results


def _add_bias_worker() -> dict:
    """add_bias_ against float64 sums, with and without a residual, float32 and float16, partial tiles."""
    from hmar.kernels.channels_last import add_bias_

    results, gen = {}, torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float16):
        for with_residual in (False, True):
            shape = (2, 48, 7, 9)
            y = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.randn(48, generator=gen)
            residual = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last) if with_residual else None
            ref = y.double() + bias.double().view(-1, 1, 1) + (residual.double() if with_residual else 0)
            out = add_bias_(y, bias, residual)
            results[f"{str(dtype)[6:]}{'+residual' if with_residual else ''}"] = {
                "err": float((out.double() - ref).norm() / ref.norm()), "in_place": out.data_ptr() == y.data_ptr(),
                "channels_last": out.is_contiguous(memory_format=torch.channels_last)}
    return results


def _decoder_worker(ch_mult: tuple | None = None) -> dict:
    import dataclasses

    from hmar.checkpoints import build_models
    from hmar.config import ModelConfig
    from hmar.kernels import channels_last
    from hmar.tokenizer_modules import ResnetBlock
    from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

    torch.manual_seed(0)
    config = tiny_tokenizer_config()
    config = config if ch_mult is None else dataclasses.replace(config, ch_mult=ch_mult)
    tokenizer = build_models(ModelConfig(config, tiny_transformer_config()))[0].eval()
    tokens = [torch.randint(0, 64, (2, p * p)) for p in tokenizer.patch_nums]
    passes, partials = [], channels_last._partials
    channels_last._partials = lambda x: passes.append(x.shape) or partials(x)
    try:
        with torch.no_grad():
            f_hat = tokenizer.tokens_to_f_hat(tokens)
            reference = tokenizer.decode(f_hat)
            tokenizer.cast_decoder(torch.float32, channels_last=True)
            fused = tokenizer.decode(f_hat)
    finally:
        channels_last._partials = partials
    modules = list(tokenizer.decoder.modules())
    return {"err": float((fused - reference).norm() / reference.norm()),
            "channels_last": fused.is_contiguous(memory_format=torch.channels_last), "statistics_passes": len(passes),
            "norms": sum(isinstance(m, torch.nn.GroupNorm) for m in modules),
            "blocks": sum(isinstance(m, ResnetBlock) for m in modules)}


@pytest.fixture(scope="module")
def interpreted():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, "--interpret-worker")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_matches_float64_group_norm(interpreted, case):
    name, dtype_name = case[0], case[3]
    result = interpreted[name]
    assert result["finite"] and result["channels_last"] and result["dtype"] == f"torch.{dtype_name}"
    assert result["err"] <= BOUND_OVERRIDES.get(name, BOUNDS[dtype_name]), result


@pytest.mark.parametrize("case", STATISTICS_CASES, ids=[c[0] for c in STATISTICS_CASES])
@pytest.mark.parametrize("shifted", [False, True], ids=["", "shifted"])
def test_interpreter_statistics_match_float64(interpreted, case, shifted):
    name = case[0]
    result = interpreted["statistics"][f"{name}{' shifted' if shifted else ''}"]
    assert result["finite"] and result["mean_over_bound"] <= 1, result
    assert result["rstd_err"] <= (FAR_RSTD_BOUND if case[-1] == "far-head" else RSTD_BOUND), result
    if case[-1] == "constant" and not shifted:
        assert result["constant_groups"] > 0  # the case tests what it says


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
@pytest.mark.parametrize("shifted", [False, True], ids=["", "shifted"])
def test_interpreter_group_norm_on_the_writers_moments_matches_float64(interpreted, case, shifted):
    name, dtype_name = case[0], case[3]
    result = interpreted["fused"][f"{name}{' shifted' if shifted else ''}"]
    assert result["finite"] and result["channels_last"] and result["dtype"] == f"torch.{dtype_name}"
    assert result["err"] <= BOUNDS[dtype_name] and result["vs_unfused"] <= BOUNDS[dtype_name], result
    assert result["mean_over_bound"] <= 1 and result["rstd_err"] <= RSTD_BOUND, result
    if "tiles" in name:
        assert result["tiles"] > 1  # the case tests what it says


def test_interpreter_group_norm_refuses_moments_of_another_map(interpreted):
    assert all(error is not None and "group_norm: moments over tiles of" in error for error in interpreted["fused"]["refused"])


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FAST_CASES], ids=FAST_CASES)
def test_interpreter_fast_divisions_match_float64_group_norm(interpreted, case):
    name, dtype_name = case[0], case[3]
    result = interpreted[f"fast {name}"]
    assert result["finite"] and result["channels_last"] and result["dtype"] == f"torch.{dtype_name}"
    assert result["err"] <= BOUND_OVERRIDES.get(name, BOUNDS[dtype_name]), result


@pytest.mark.parametrize("case", ["float32", "float32+residual", "float16", "float16+residual"])
def test_interpreter_add_bias_matches_float64_sums(interpreted, case):
    result = interpreted["add_bias_"][case]
    assert result["in_place"] and result["channels_last"]
    assert result["err"] <= BOUNDS[case.split("+")[0]], result


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interpreter_group_norm_with_shift_matches_float64(interpreted, dtype):
    result = interpreted["shift"][dtype]
    assert result["channels_last"] and result["err"] <= BOUNDS[dtype], result


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interpreter_interleaved_phases_match_float64_upsample_and_convolution(interpreted, dtype):
    result = interpreted["interleave_phases"][dtype]
    assert result["channels_last"] and result["dtype"] == f"torch.{dtype}"
    assert result["err"] <= BOUNDS[dtype], result


def test_upsample_weight_is_the_nearest_upsample_and_convolution_in_float64():
    """The sub-pixel form (`upsample_weight`): each phase of a 2×2 convolution over the small map,
    padded by one, equals the 3×3 convolution of the 2× nearest upsample, to float64 rounding."""
    from hmar.tokenizer_modules import upsample_weight

    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(2, 5, 6, 9, generator=gen, dtype=torch.float64), torch.randn(7, 5, 3, 3, generator=gen, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    phases = F.conv2d(x, upsample_weight(weight), padding=1)
    assert phases.shape == (2, 4 * 7, 7, 10)
    for a in range(2):
        for b in range(2):
            block = phases[:, (2 * a + b) * 7:(2 * a + b + 1) * 7, a:a + 6, b:b + 9]
            torch.testing.assert_close(block, ref[:, :, a::2, b::2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("decoder", ["decoder", "decoder with 1×1 shortcuts"])
def test_channels_last_decoder_with_fused_kernels_decodes_like_nchw(interpreted, decoder):
    result = interpreted[decoder]
    assert result["channels_last"]
    assert result["err"] <= 1e-5, result
    # every norm but each block's norm2 (which reads conv1's output, its bias still to add) takes its
    # statistics from the moments of the map's writer
    assert result["statistics_passes"] == result["blocks"] < result["norms"], result


def test_decoder_chooses_the_writers_that_emit_moments_once():
    """With the kernels, the writers of every map a norm reads next emit moments: conv_in, each block
    and attention block but the last one before an upsample, the upsamples; none without them."""
    from hmar.tokenizer_modules import AttnBlock, Decoder, ResnetBlock, Upsample

    decoder = Decoder(32, (1, 1, 2), 1, 8)
    writers = [decoder, *(m for m in decoder.modules() if isinstance(m, (ResnetBlock, AttnBlock, Upsample)))]
    before_upsample = [(level.attn or level.block)[-1] for level in decoder.up if level.resample_name]
    decoder.set_fused(True)
    assert len(before_upsample) == 2 and all(not m.emit_moments for m in before_upsample)
    assert all(m.emit_moments for m in writers if all(m is not b for b in before_upsample))
    decoder.set_fused(False)
    assert not any(m.emit_moments for m in writers)


def test_channel_blocks_and_the_emitted_moments_bound():
    """Channel blocks: the largest power-of-two divisor (16 to 128), else one padded block; the
    partials a writer emits stay within 1/PARTIALS_FRACTION of the map (plus a short last tile)."""
    from hmar.kernels.channels_last import DTYPES, MIN_CHANNEL_BLOCK, PARTIALS_FRACTION, _writer_tile, channel_block

    blocks = {160: 32, 320: 64, 640: 128, 96: 32, 48: 16, 128: 128, 256: 128, 512: 128, 3: 4, 40: 64, 130: 256}
    assert {c: channel_block(c) for c in blocks} == blocks
    for channels, pixels in ((160, 256 * 256), (160, 128 * 128), (320, 64 * 64), (320, 32 * 32), (640, 16 * 16), (3, 4096), (48, 999)):
        for dtype in DTYPES:
            size = torch.empty(0, dtype=dtype).element_size()
            rows, block = _writer_tile(pixels, channels, torch.empty(0, dtype=dtype), moments=True)
            tiles = -(-pixels // rows)
            assert rows & (rows - 1) == 0 and 8 * channels * (tiles - 1) <= pixels * channels * size / PARTIALS_FRACTION
            assert (channels % block == 0 and block >= MIN_CHANNEL_BLOCK) or block == 1 << (channels - 1).bit_length()


def test_argument_errors():
    from hmar.kernels.channels_last import add_bias_, group_norm, interleave_phases, supports

    x = torch.randn(1, 8, 4, 4)
    assert not supports(x)  # NCHW; and the CPU without the interpreter
    with pytest.raises(ValueError, match="group_norm: needs a 4-D channels-last"):
        group_norm(x, 4)
    with pytest.raises(ValueError, match="add_bias_: needs a 4-D channels-last"):
        add_bias_(x, torch.zeros(8))
    with pytest.raises(ValueError, match="interleave_phases: needs a 4-D channels-last"):
        interleave_phases(x)


def test_the_reference_path_runs_where_the_kernel_does_not():
    """Without CUDA or the interpreter, channels-last maps take PyTorch's GroupNorm and SiLU."""
    from hmar.tokenizer_modules import group_norm, normalize

    norm = group_norm(64)
    x = torch.randn(2, 64, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalize(norm, x), F.silu(norm(x)))
    torch.testing.assert_close(normalize(norm, x, silu=False), norm(x))


# ------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(8, 160, 256, 256), (8, 320, 64, 64), (8, 640, 16, 16), (3, 160, 17, 23)])
def test_gpu_decoder_shapes_fp16(shape):
    from hmar.kernels.channels_last import group_norm

    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=gen) * 4 + 2).half().contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1], device="cuda", generator=gen), torch.randn(shape[1], device="cuda", generator=gen)
    y = group_norm(x, 32, weight, bias, 1e-6, silu=True)
    ref = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6))
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float16
    assert float((y.double() - ref).norm() / ref.norm()) <= BOUNDS["float16"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", [
    ((8, 160, 256, 256), "float16", 1000.0, "normal"), ((8, 160, 256, 256), "float16", 0.0, "far-head"),
    ((8, 320, 128, 128), "bfloat16", -1000.0, "normal"), ((8, 320, 64, 64), "float16", 3.0, "constant"),
    ((8, 640, 32, 32), "float32", 1000.0, "normal"), ((8, 640, 16, 16), "float16", 1000.0, "normal"),
    ((3, 160, 17, 23), "float16", 1000.0, "normal")], ids=str)
def test_gpu_statistics_decoder_shapes_match_float64(case):
    """`_statistics` at the d16 decoder's shapes (a chunk of 8 images at 256 px) on adversarial inputs:
    the CPU cases' bounds, with the GPU's longer spans and more of them."""
    from hmar.kernels.channels_last import _statistics

    shape, dtype_name, mean, kind = case
    x = _statistics_input(shape, getattr(torch, dtype_name), mean, 1.0, kind, torch.Generator().manual_seed(1)).cuda()
    got = _statistics(x, 32, 1e-6, None).double().cpu()
    ref = x.double().reshape(shape[0], 32, -1)
    ref_mean, ref_var = ref.mean(-1).cpu(), ref.var(-1, unbiased=False).cpu()
    ulp = torch.finfo(torch.float32).eps * ref_mean.abs()
    mean_excess = float(((got[0] - ref_mean).abs() / (MEAN_ULPS * ulp + MEAN_SPREAD * ref_var.sqrt() + 1e-30)).max())
    rstd_err = float((got[1] * (ref_var + 1e-6).sqrt() - 1).abs().max())
    print(f"statistics {case}: mean error / bound {mean_excess:.3g}, rstd error {rstd_err:.3g}")
    bound = FAR_RSTD_BOUND if kind == "far-head" else RSTD_BOUND
    assert torch.isfinite(got).all() and mean_excess <= 1 and rstd_err <= bound, (mean_excess, rstd_err)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", [
    ((8, 160, 256, 256), "float16", 1000.0, "add_bias_+residual"), ((8, 160, 128, 128), "float16", 0.0, "interleave_phases"),
    ((8, 320, 64, 64), "bfloat16", -1000.0, "add_bias_"), ((8, 320, 32, 32), "float16", 3.0, "interleave_phases"),
    ((8, 640, 16, 16), "float16", 1000.0, "add_bias_+residual"), ((3, 160, 17, 23), "float32", 1000.0, "add_bias_+residual")], ids=str)
def test_gpu_group_norm_on_the_writers_moments_at_decoder_shapes(case):
    """The moments add_bias_ and interleave_phases emit at the d16 decoder's shapes (a chunk of 8 images
    at 256 px): group_norm on them against float64 and against group_norm without them, their
    statistics against float64, within the CPU cases' bounds."""
    from hmar.kernels.channels_last import _statistics, group_norm

    shape, dtype_name, mean, writer = case
    gen = torch.Generator("cuda").manual_seed(2)
    x, moments = _written_map(shape, 32, getattr(torch, dtype_name), mean, 1.0, writer, gen)
    weight, bias = torch.randn(shape[1], device="cuda", generator=gen), torch.randn(shape[1], device="cuda", generator=gen)
    y = group_norm(x, 32, weight, bias, 1e-6, True, moments=moments)
    unfused = group_norm(x, 32, weight, bias, 1e-6, True)
    ref = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6))
    errors = _statistics_errors(_statistics(x, 32, 1e-6, None, moments), x, 32)
    err, vs_unfused = float((y.double() - ref).norm() / ref.norm()), float((y.double() - unfused.double()).norm() / unfused.double().norm())
    print(f"moments {case}: {errors}, error {err:.3g}, against unfused {vs_unfused:.3g}, partials {tuple(moments.partials.shape)}")
    assert errors["finite"] and errors["mean_over_bound"] <= 1 and errors["rstd_err"] <= RSTD_BOUND, errors
    assert err <= BOUNDS[dtype_name] and vs_unfused <= BOUNDS[dtype_name], (err, vs_unfused)
    assert moments.partials.numel() * 4 <= x.numel() * x.element_size() / 16  # (1/32 of the map, but for short last tiles)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(8, 160, 256, 256), (8, 320, 64, 64), (8, 640, 16, 16), (3, 40, 17, 23)], ids=str)
def test_gpu_add_bias_and_interleave_at_decoder_shapes_match_float64(shape):
    """The element-wise kernels' channel blocks at the decoder's shapes (and a padded block of 40)."""
    from hmar.kernels.channels_last import add_bias_, interleave_phases

    gen = torch.Generator("cuda").manual_seed(4)
    N, C, H, W = shape
    y, residual = (torch.randn(shape, device="cuda", generator=gen).half().contiguous(memory_format=torch.channels_last) for _ in range(2))
    bias = torch.randn(C, device="cuda", generator=gen)
    ref = y.double() + bias.double().view(-1, 1, 1) + residual.double()
    out = add_bias_(y, bias, residual)
    assert float((out.double() - ref).norm() / ref.norm()) <= BOUNDS["float16"]
    phases = torch.randn(N, 4 * C, H // 2 + 1, W // 2 + 1, device="cuda", generator=gen).half().contiguous(memory_format=torch.channels_last)
    up = interleave_phases(phases, bias)
    ref = torch.empty(N, C, H // 2 * 2, W // 2 * 2, device="cuda", dtype=torch.float64)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            ref[:, :, a::2, b::2] = phases[:, p * C:(p + 1) * C, a:a + H // 2, b:b + W // 2].double() + bias.double().view(-1, 1, 1)
    assert float((up.double() - ref).norm() / ref.norm()) <= BOUNDS["float16"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_channels_last_decoder_is_as_close_to_float32_as_nchw_fp16():
    """The two float16 decoders differ from each other by a level or two here and there (cuDNN sums
    NHWC and NCHW convolutions in different orders), so each is held against the float32 decoder:
    the channels-last one with fused norms must be no further from it than the NCHW one."""
    from hmar.checkpoints import build_models
    from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset

    torch.manual_seed(0)
    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family="hmar", depth=2, width=64, num_heads=1, branch_depth=1))
    tokenizer = build_models(config)[0].cuda().eval()
    tokens = [torch.randint(0, 4096, (4, p * p), device="cuda") for p in tokenizer.patch_nums]
    with torch.no_grad():
        f_hat = tokenizer.tokens_to_f_hat(tokens)
        reference = tokenizer.decode(f_hat).float()
        levels = {}
        for channels_last in (False, True):
            tokenizer.cast_decoder(torch.float16, channels_last=channels_last)
            levels[channels_last] = ((tokenizer.decode(f_hat).float() - reference) * 127.5).abs()
    nchw, nhwc = levels[False], levels[True]
    report = {name: (float(e.mean()), float(e.quantile(0.999)), float(e.max())) for name, e in (("nchw", nchw), ("nhwc", nhwc))}
    assert float(nhwc.mean()) <= 1.25 * float(nchw.mean()), report
    assert float(nhwc.quantile(0.999)) <= 1.25 * float(nchw.quantile(0.999)) + 0.25, report
    assert float(nhwc.max()) <= 2 * float(nchw.max()) + 0.5, report


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker()))
