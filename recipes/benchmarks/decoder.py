"""The VQ-VAE decoder alone on CUDA: the product's decoder and variants of it, timed in one run.

    python recipes/benchmarks/decoder.py [--images 64] [--variants NAME ...] [--rounds 20] [--json out.json]

d16's tokenizer (vae_ch160v4096z32) at 256 px, random weights, f̂ of random tokens. Each variant
decodes the same f̂ in chunks, as the sampler does; "graphed" variants time replays of one CUDA
graph of the whole decode (the sampler captures the decoder with the rest of a batch), the others
eager calls (a batch's first decode, an edit's). All variants are prepared first, then timed in
rounds, each round one decode of every variant in a rotating order, so that a change of the
machine's state (clocks, other work on its host) reaches every variant alike.

Columns: median ms with the 10th-90th percentile and min-max spread over the rounds, ratio to the
first row, the host's issue time (above the GPU time, the host bounds the decode), the GPU's kernel
time of one decode and the number of kernels (torch.profiler; kernel time well below the median
means the GPU waits for the host), the extra peak memory of an eager decode, and the pixel error in
levels of 255 against the float32 decoder on the CPU (same weights, same f̂, the first
`--reference-images` images). Then a breakdown by kernel family of the profiled variants (default:
the first and the product's), with the convolutions' achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import hmar.tokenizer_modules as modules
from hmar.kernels import channels_last
from hmar.kernels.launch import launch
from hmar.benchmark import first_call_seconds
from hmar.checkpoints import build_models
from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset
from hmar.cuda_graph import capture


@dataclass
class Variant:
    name: str
    chunk: int = 8
    graphed: bool = True
    dtype: torch.dtype = torch.float16
    patches: dict = field(default_factory=dict)  # (object, attribute) -> value while it runs
    cudnn_benchmark: bool | None = None  # None: as MultiScaleVQVAE.decode sets it
    channels_last: bool = True  # False: NCHW, where PyTorch's own modules run (no Triton kernels)


def _conv_only(conv, x, residual=None, fused=False):  # lower bound: the convolutions alone, no bias, norms or adds
    return torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)


def _separate_bias_block(self, x, moments=None):  # ResnetBlock with conv1's bias added in a pass of its own
    fused = self.fused
    h = modules.convolve(self.conv1, modules.normalize(self.norm1, x, fused=fused, moments=moments), fused=fused)
    shortcut = x if isinstance(self.nin_shortcut, torch.nn.Identity) else modules.convolve(self.nin_shortcut, x, fused=fused)
    return modules.convolve_with_moments(self.conv2, modules.normalize(self.norm2, h, fused=fused), shortcut, fused, emit=self.emit_moments)


def _upsample_then_convolve(self, x, moments=None):  # Upsample as written: F.interpolate, then the 3×3 convolution
    upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    return modules.convolve_with_moments(self.conv, upsampled, fused=self.fused, emit=self.emit_moments)


class _DirectLaunch:
    """Stands in for one of the channels-last kernels: ``kernel[grid](...)`` through
    `hmar.kernels.launch`, which skips Triton's per-call dispatch once a binary is known."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launch(self.kernel, grid, args, kwargs)


SEPARATE_BIAS = {(modules.ResnetBlock, "forward"): _separate_bias_block}
INTERPOLATE = {(modules.Upsample, "forward"): _upsample_then_convolve}
DIRECT_LAUNCH = {(channels_last, name): _DirectLaunch(getattr(channels_last, name))
                 for name in ("_partial_moments", "_group_statistics", "_normalize_act", "_add_bias", "_interleave_phases")}
CONV_ONLY = {(modules, "normalize"): lambda norm, x, silu=True, fused=False, moments=None: x, (modules, "convolve"): _conv_only,
             (modules, "convolve_with_moments"): lambda conv, x, *args, **kwargs: (_conv_only(conv, x), None),
             (modules, "convolve_normalize"): lambda conv, x, norm, fused=False: _conv_only(conv, x)}

VARIANTS = {v.name: v for v in (
    Variant("before: separate bias, interpolate", patches={**SEPARATE_BIAS, **INTERPOLATE}),
    Variant("before, eager", graphed=False, patches={**SEPARATE_BIAS, **INTERPOLATE}),
    Variant("bias in the norm", patches=INTERPOLATE),
    Variant("sub-pixel upsample", patches=SEPARATE_BIAS),
    Variant("both (default)"),
    Variant("both, eager", graphed=False),
    Variant("both, eager, direct launch", graphed=False, patches=DIRECT_LAUNCH),
    Variant("NCHW (PyTorch's modules), eager", graphed=False, channels_last=False),
    Variant("NCHW (PyTorch's modules)", channels_last=False),
    Variant("both, fast divisions", patches={(channels_last, "FAST_DIVISION"): True}),
    Variant("both, eager, fast divisions, direct launch", graphed=False, patches={**DIRECT_LAUNCH, (channels_last, "FAST_DIVISION"): True}),
    Variant("both, chunk 16", chunk=16),
    Variant("both, chunk 64", chunk=64),
    Variant("both, bf16", dtype=torch.bfloat16),
    Variant("both, cuDNN heuristics", cudnn_benchmark=False),
    Variant("convolutions only (before)", patches={**CONV_ONLY, **INTERPOLATE}),
    Variant("convolutions only (sub-pixel)", patches=CONV_ONLY),
)}

KERNEL_FAMILIES = (  # first match wins: PyTorch's nearest upsample kernel is named ..._nhwc_...
    ("upsample", r"upsample|interpolate|_interleave_phases"),
    ("group-norm statistics", r"_partial_moments|_group_statistics"),
    ("group-norm normalise", r"_normalize_act"),
    ("bias (+residual)", r"_add_bias"),
    ("attention (SDPA's math path: float32 matmuls, softmax)", r"fmha|flash|attention|softmax|gemm_f32f32"),
    ("convolution (cuDNN)", r"conv|xmma|fprop|sm90_|cutlass|implicit|nhwc"),
)


@contextlib.contextmanager
def applied(variant: Variant, tokenizer):
    """The variant's patches, and its cuDNN mode, while it runs; everything restored after."""
    saved = {key: getattr(*key) for key in variant.patches}
    previous = torch.backends.cudnn.benchmark
    for (owner, name), value in variant.patches.items():
        setattr(owner, name, value)
    if variant.cudnn_benchmark is not None:  # decode() turns benchmark mode on; keep it as the variant says
        tokenizer._convolution_autotuning = contextlib.nullcontext
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def build_tokenizer(state: dict | None):
    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family="hmar", depth=2, width=64, num_heads=1, branch_depth=1))
    tokenizer = build_models(config)[0].eval()
    if state is not None:
        tokenizer.load_state_dict(state)
    return tokenizer


def family_of(name: str) -> str:
    lowered = name.lower()
    return next((family for family, pattern in KERNEL_FAMILIES if re.search(pattern, lowered)), "other")


def profile_decode(decode, conv_flops: float) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    totals, kernels, launches = defaultdict(float), [], 0
    for event in prof.key_averages():
        if event.self_device_time_total <= 0:
            continue
        totals[family_of(event.key)] += event.self_device_time_total / 1e3
        kernels.append((event.self_device_time_total / 1e3, event.count, event.key[:110]))
        launches += event.count
    kernels.sort(reverse=True)
    conv_ms = totals.get("convolution (cuDNN)", 0.0)
    return {"families_ms": dict(totals), "total_ms": sum(totals.values()), "kernels": launches,
            "conv_tflops": conv_flops / conv_ms / 1e9 if conv_ms else None, "top_kernels": kernels[:20]}


@dataclass
class Prepared:
    """A variant ready to be timed: `run` issues one decode (eager, or a graph's replay) under the
    variant's patches; `row` holds what was measured while preparing it."""
    variant: Variant
    run: object
    row: dict
    times: list = field(default_factory=list)
    host: list = field(default_factory=list)
    keep: tuple = ()  # the tokenizer and graph, alive while the variant is timed


def prepare(variant: Variant, state: dict, f_hat: torch.Tensor, reference: torch.Tensor, with_profile: bool) -> Prepared:
    tokenizer = build_tokenizer(state).cuda()
    tokenizer.cast_decoder(variant.dtype, channels_last=variant.channels_last)
    images = f_hat.shape[0]
    out = torch.empty(images, 3, 256, 256, device="cuda")

    def decode():
        with torch.no_grad():
            for i, part in enumerate(f_hat.split(variant.chunk)):
                out[i * variant.chunk:i * variant.chunk + part.shape[0]].copy_(tokenizer.decode(part))
        return out

    with applied(variant, tokenizer):
        first_s = first_call_seconds(decode)
        decode()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        decode()
        torch.cuda.synchronize()
        extra_peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        levels = ((out[:reference.shape[0]].float().cpu() - reference) * 127.5).abs()
        with FlopCounterMode(display=False) as counter:
            decode()
        conv_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
        profiled = profile_decode(decode, conv_flops)  # the kernels an eager decode launches, graphed or not
        graph, pool = None, 0
        if variant.graphed:
            graph, _, pool = capture(decode, f_hat.device)
    row = {"variant": variant.name, "chunk": variant.chunk, "graphed": variant.graphed, "dtype": str(variant.dtype),
           "channels_last": variant.channels_last, "first_call_s": first_s, "extra_peak_gib": extra_peak,
           "graph_pool_gib": pool / 2**30, "max_levels": float(levels.max()), "pct_over_1_level": float((levels > 1).float().mean() * 100),
           "mean_levels": float(levels.mean()), "conv_tflop": conv_flops / 1e12, "kernel_ms": profiled["total_ms"],
           "kernels": profiled["kernels"]}
    if with_profile:
        row["profile"] = profiled

    def run():
        if graph is not None:
            graph.replay()
            return
        with applied(variant, tokenizer):
            decode()

    return Prepared(variant, run, row, keep=(tokenizer, graph, out))


def time_rounds(prepared: list[Prepared], rounds: int) -> None:
    """One decode of every variant per round, the order rotated each round; event times and the
    host's issue time of each."""
    for r in range(rounds):
        shift = r % len(prepared)
        for item in prepared[shift:] + prepared[:shift]:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            item.run()
            item.host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            item.times.append(start.elapsed_time(end))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20, help="timed decodes of each variant, interleaved")
    parser.add_argument("--reference-images", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--profile", nargs="*", default=None, help="variants whose kernel families to print (default: the first and the product's)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the decoder's kernels and graphs are timed there)")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not 1 <= args.images <= 1024 or not 1 <= args.rounds <= 1000 or not 1 <= args.reference_images <= args.images:
        parser.error("--images must be in 1..1024, --rounds in 1..1000, --reference-images in 1..--images")
    import triton

    torch.manual_seed(0)
    reference_tokenizer = build_tokenizer(None)
    state = reference_tokenizer.state_dict()
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 4096, (args.images, p * p), generator=generator) for p in reference_tokenizer.patch_nums]
    with torch.no_grad():
        f_hat = reference_tokenizer.tokens_to_f_hat(tokens)
        t0 = time.perf_counter()
        reference = reference_tokenizer.decode(f_hat[:args.reference_images])  # float32 on the CPU
    environment = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}"
    print(f"{environment}; float32 CPU reference of {args.reference_images} images in {time.perf_counter() - t0:.1f} s", flush=True)
    f_hat = f_hat.cuda()
    profiled = set(args.profile) if args.profile is not None else {args.variants[0], "both (default)"}
    prepared = []
    for name in args.variants:
        try:
            item = prepare(VARIANTS[name], state, f_hat, reference, name in profiled)
        except Exception as exc:  # one variant's failure (a kernel that does not compile) leaves the others' numbers
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            torch.cuda.synchronize()
            continue
        prepared.append(item)
        print(f"prepared {name:<40} first call {item.row['first_call_s']:.1f} s, {item.row['kernels']} kernels, "
              f"{item.row['kernel_ms']:.1f} ms of kernel time", flush=True)
    if not prepared:
        raise SystemExit("no variant could be prepared")
    time_rounds(prepared, args.rounds)
    rows = []
    for item in prepared:
        times = item.times
        item.row.update(ms=statistics.median(times), ms_p10_p90=[_percentile(times, 0.1), _percentile(times, 0.9)],
                        ms_spread=[min(times), max(times)], host_ms=statistics.median(item.host), times_ms=times)
        rows.append(item.row)
    base = rows[0]["ms"]
    print(f"\n{args.images} images at 256 px, d16 tokenizer, random weights, {args.rounds} interleaved rounds; {environment}")
    print("| variant | ms (median) | p10-p90 | min-max | vs first | host issue ms | kernel ms | kernels | extra peak GiB "
          "| vs float32 CPU: max levels | % > 1 level |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['ms_p10_p90'][0]:.1f}-{r['ms_p10_p90'][1]:.1f} | {r['ms_spread'][0]:.1f}-{r['ms_spread'][1]:.1f} "
              f"| {base / r['ms']:.2f}x | {r['host_ms']:.1f} | {r['kernel_ms']:.1f} | {r['kernels']} | {r['extra_peak_gib']:.2f} "
              f"| {r['max_levels']:.0f} | {r['pct_over_1_level']:.3f} |")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            print(f"\nprofile: {r['variant']} (one eager decode, kernels' device time {p['total_ms']:.1f} ms; convolutions "
                  f"{r['conv_tflop']:.1f} TFLOP at {p['conv_tflops'] or 0:.0f} TFLOP/s)")
            for family, ms in sorted(p["families_ms"].items(), key=lambda kv: -kv[1]):
                print(f"  {family:<24} {ms:8.2f} ms")
            for ms, count, name in p["top_kernels"][:12]:
                print(f"    {ms:8.2f} ms {count:5d}x {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "cudnn": torch.backends.cudnn.version(), "images": args.images, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
