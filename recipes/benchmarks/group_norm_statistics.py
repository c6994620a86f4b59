"""The channels-last GroupNorm's statistics pass alone, at the shapes a half-precision d16 decoder
gives it, against a per-element Welford loop; then a sweep of its launch configuration.

    python recipes/benchmarks/group_norm_statistics.py [--out statistics.md] [--no-sweep]
    python recipes/benchmarks/group_norm_statistics.py --decoder [decoder.py's arguments]

The shapes and how often each occurs come from one decode of a chunk of 8 images at 256 px
(vae_ch160v4096z32, float16, channels-last), recorded at `hmar.kernels.channels_last._partials`: the
statistics passes the decoder still runs (the norms whose input's writer handed over its moments
run none).
Each is timed on float16 maps whose channel means are 10³ times their spread, as GPU time per call
(CUDA-graph replays of 20 calls over two maps in turn: an eager loop would time the host's
launches), next to half a copy of the map (read + write: the bytes floor of a pass that reads it),
with each kernel's largest 1/std error against float64. Per decode of 64 images: the sum over the
shapes, times their counts, times 8 chunks.

`_partial_moments` is swapped for `welford_partial_moments` (the same arguments: a running mean and
M2 per row lane and channel, a division per element, Chan's merge of the lanes) by setting the
module attribute, which `_partials` reads at each call. `--decoder` runs
`recipes/benchmarks/decoder.py` with one more variant, "both, Welford statistics", the default
decoder with that kernel (e.g. `--decoder --images 16 --rounds 6 --variants "both (default)"
"both, Welford statistics"`).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import torch
import triton
import triton.language as tl

from hmar.kernels import channels_last

GROUPS = 32
CALLS = 20  # calls per graph


@triton.jit
def welford_partial_moments(x_ptr, mean_ptr, m2_ptr, HW, C, SPAN,
                            ROWS: tl.constexpr, CB: tl.constexpr):
    block, split, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    lanes = tl.arange(0, ROWS)
    cols = block * CB + tl.arange(0, CB)
    sample = x_ptr + n.to(tl.int64) * HW * C
    first = split * SPAN
    pixels = tl.minimum(SPAN, HW - first)
    mean = tl.zeros((ROWS, CB), tl.float32)
    m2 = tl.zeros((ROWS, CB), tl.float32)
    for i in range(0, tl.cdiv(pixels, ROWS)):
        rows = i * ROWS + lanes
        valid = (rows[:, None] < pixels) & (cols[None, :] < C)
        x = tl.load(sample + (first + rows[:, None]) * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        delta = tl.where(valid, x - mean, 0.0)
        mean += delta / (i + 1)
        m2 += delta * tl.where(valid, x - mean, 0.0)
    lane_count = (tl.maximum(pixels - lanes + ROWS - 1, 0) // ROWS).to(tl.float32)[:, None]  # lane r: rows r, r + ROWS, ...
    channel_mean = tl.sum(lane_count * mean, axis=0) / pixels
    deviation = mean - channel_mean[None, :]
    out = (n * splits + split) * C + cols
    tl.store(mean_ptr + out, channel_mean, mask=cols < C)
    tl.store(m2_ptr + out, tl.sum(m2 + lane_count * deviation * deviation, axis=0), mask=cols < C)


SHIFTED = channels_last._partial_moments
DEFAULTS = (channels_last.MOMENTS_TILE_ELEMENTS, channels_last.MOMENTS_WARPS, channels_last.PROGRAMS_PER_SM)


def configure(kernel, tile: int, warps: int, per_sm: int) -> None:
    channels_last._partial_moments = kernel
    channels_last.MOMENTS_TILE_ELEMENTS, channels_last.MOMENTS_WARPS, channels_last.PROGRAMS_PER_SM = tile, warps, per_sm


def decoder_shapes() -> Counter:
    """(N, C, H, W) -> statistics passes (`_partials`) in one decode of 8 images at 256 px by the d16 tokenizer."""
    from hmar.checkpoints import build_models
    from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset

    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family="hmar", depth=2, width=64, num_heads=1, branch_depth=1))
    tokenizer = build_models(config)[0].cuda().eval()
    tokenizer.cast_decoder(torch.float16, channels_last=True)
    tokens = [torch.randint(0, 4096, (8, p * p), device="cuda") for p in tokenizer.patch_nums]
    shapes, partials = Counter(), channels_last._partials

    def recording(x):
        shapes[tuple(x.shape)] += 1
        return partials(x)

    channels_last._partials = recording
    try:
        with torch.no_grad():
            tokenizer.decode(tokenizer.tokens_to_f_hat(tokens))
    finally:
        channels_last._partials = partials
    return shapes


def graph_ms(step, calls: int = CALLS) -> float:
    """GPU ms per `step(i)`, from replays of one CUDA graph of `calls` steps."""
    step(0)
    step(1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i)
    return triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / calls


def statistics_ms(maps) -> float:
    return graph_ms(lambda i: channels_last._statistics(maps[i % len(maps)], GROUPS, 1e-6, None))


def rstd_error(x: torch.Tensor) -> float:
    ref = x.double().reshape(x.shape[0], GROUPS, -1).var(-1, unbiased=False)
    got = channels_last._statistics(x, GROUPS, 1e-6, None)[1].double()
    return float((got * (ref + 1e-6).sqrt() - 1).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the tables to this markdown file as they fill")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of the launch configuration")
    parser.add_argument("--decoder", nargs=argparse.REMAINDER, help="run recipes/benchmarks/decoder.py with these arguments instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.decoder is not None:
        return run_decoder(args.decoder)
    lines = [f"# GroupNorm statistics: {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}", ""]

    def emit(*new: str) -> None:
        lines.extend(new)
        print(*new, sep="\n", flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    shapes = decoder_shapes()
    gen = torch.Generator("cuda").manual_seed(0)
    maps = {}
    for shape in shapes:
        means = 1000 * (1 + 0.1 * torch.rand(1, shape[1], 1, 1, device="cuda", generator=gen))
        maps[shape] = [(torch.randn(shape, device="cuda", generator=gen) + means).half().contiguous(memory_format=torch.channels_last)
                       for _ in range(2)]
    emit("GPU ms per call (float16, channel means 10³ × spread); copy/2: half a copy of the map (its read alone)", "",
         "| N, C, H, W | calls per chunk | MB | copy/2 ms | Welford ms | shifted ms | shifted / Welford | shifted GB/s | "
         "1/std error Welford | 1/std error shifted |", "|---|---|---|---|---|---|---|---|---|---|")
    totals = Counter()
    for shape, count in sorted(shapes.items(), key=lambda kv: kv[0][1] * kv[0][2] * kv[0][3]):
        xs = maps[shape]
        copies = [torch.empty_like(x) for x in xs]
        copy = graph_ms(lambda i: copies[i % 2].copy_(xs[i % 2])) / 2
        configure(welford_partial_moments, *DEFAULTS)
        welford, welford_error = statistics_ms(xs), rstd_error(xs[0])
        configure(SHIFTED, *DEFAULTS)
        shifted, shifted_error = statistics_ms(xs), rstd_error(xs[0])
        totals.update({"copy": count * copy, "welford": count * welford, "shifted": count * shifted})
        mb = xs[0].numel() * xs[0].element_size() / 1e6
        emit(f"| {', '.join(map(str, shape))} | {count} | {mb:.1f} | {copy:.4f} | {welford:.4f} | {shifted:.4f} | {shifted / welford:.2f} | "
             f"{mb / shifted:.0f} | {welford_error:.1e} | {shifted_error:.1e} |")
    emit("", f"Per decode of 64 images (8 chunks): Welford {8 * totals['welford']:.2f} ms, shifted {8 * totals['shifted']:.2f} ms, "
         f"reading the maps once (copy/2) {8 * totals['copy']:.2f} ms; launch configuration (tile, warps, programs/SM) {DEFAULTS}", "")
    if not args.no_sweep:
        emit("| tile elements | warps | programs per SM | shifted ms per decode of 64 images |", "|---|---|---|---|")
        for tile in (2048, 4096, 8192):
            for warps in (4, 8):
                for per_sm in (2, 4, 8):
                    configure(SHIFTED, tile, warps, per_sm)
                    total = 8 * sum(count * statistics_ms(maps[shape]) for shape, count in shapes.items())
                    emit(f"| {tile} | {warps} | {per_sm} | {total:.2f} |")
    configure(SHIFTED, *DEFAULTS)


def run_decoder(arguments: list[str]) -> None:
    path = Path(__file__).with_name("decoder.py")
    spec = importlib.util.spec_from_file_location("decoder_benchmark", path)
    decoder = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = decoder  # (its dataclasses look their module up there)
    spec.loader.exec_module(decoder)
    variant = decoder.Variant("both, Welford statistics", patches={(channels_last, "_partial_moments"): welford_partial_moments})
    decoder.VARIANTS[variant.name] = variant
    sys.argv = [str(path), *arguments]
    decoder.main()


if __name__ == "__main__":
    main()
