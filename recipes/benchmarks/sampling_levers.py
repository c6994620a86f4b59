"""Each sampling lever of `hmar.inference` measured on its own, cumulatively, in one run (CUDA).

    python recipes/benchmarks/sampling_levers.py [--batch 64] [--json out.json]

d16 HMAR and VAR at 256 px, random weights, hmar's default sampling settings (steps, guidance and
filtering: `hmar.schedule.DEFAULT_STEPS`, `hmar.config.DEFAULT_SAMPLING`), bf16 autocast for the
transformer. Rows add one lever at a time to the one before; every row builds fresh
models from the same weights. "before" is the sampler without any lever: F.interpolate's bicubic,
float32 weights cast by autocast at every use, a float32 decoder, top-p sorting all rows at once.
`--decoders` times decoder variants alone instead (dtypes, layouts, compiled or not, chunk sizes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import hmar.sampler as sampler_module
import hmar.tokenizer as tokenizer_module
from hmar.benchmark import bench_config, first_call_seconds
from hmar.checkpoints import build_models
from hmar.config import tokenizer_preset
from hmar.inference import cast_linears, compile_for_sampling
from hmar.policy import KernelPolicy
from hmar.sampler import make_generator, sample
from hmar.schedule import resolve_schedule

LEVERS = ("before", "bicubic as matmuls", "bf16 Linear weights", "fp16 decoder", "channels-last decoder", "compiled blocks")
FAST_BICUBIC, CHUNK = tokenizer_module.bicubic_upsample, sampler_module.TOP_P_CHUNK


def interpolate_bicubic(h: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(h, size=(size, size), mode="bicubic")


def build(family: str, levers: int, states: dict):
    config = bench_config(family, 16, None, tokenizer_preset(256))
    with torch.device("meta"):
        tokenizer, transformer = build_models(config)
    tokenizer.load_state_dict(states["tokenizer"], assign=True)
    transformer.load_state_dict(states[family], assign=True)
    tokenizer, transformer = tokenizer.cuda().eval(), transformer.cuda().eval()
    tokenizer_module.bicubic_upsample = FAST_BICUBIC if levers >= 1 else interpolate_bicubic
    sampler_module.TOP_P_CHUNK = CHUNK if levers >= 1 else 1 << 40
    if levers >= 2:
        cast_linears(transformer, torch.bfloat16)
    if levers >= 3:
        tokenizer.cast_decoder(torch.float16, channels_last=levers >= 4)  # NHWC: fused norms and bias adds (hmar.kernels.channels_last)
    # the blocks' kernels as sampling on CUDA takes them: fused eagerly, Inductor's when compiled
    transformer.set_policy(KernelPolicy.choose("cuda", training=False, compile=levers >= 5))
    if levers >= 5:
        compile_for_sampling(tokenizer, transformer)
    return config, tokenizer, transformer


def time_sampling(config, tokenizer, transformer, batch: int, iters: int, compiled: bool) -> dict:
    schedule = resolve_schedule(config.patch_nums, family=config.family)  # hmar's default steps; VAR one per scale
    labels = torch.randint(0, 1000, (batch,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run():
        return sample(tokenizer, transformer, labels, schedule, generator=make_generator(0, "cuda"), amp_dtype=torch.bfloat16)

    first_s = first_call_seconds(run)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_call_s": first_s, "images": result.images, "compiled": compiled}


# NHWC eager = the product's CUDA decoder: channels-last, norms+SiLU and bias+residual fused (hmar.kernels.channels_last);
# compiled NHWC uses Inductor's norms instead.
DECODERS = ("fp32 NCHW", "fp16 weights NCHW", "fp16 weights NHWC fused kernels", "fp16 weights NCHW compiled",
            "fp16 weights NHWC compiled")


def time_decoders(states: dict, images: int, chunks: list[int]) -> list[dict]:
    """Decoding `images` random-token images at 256 px, each decoder variant and chunk size."""
    rows, reference = [], None
    config = bench_config("hmar", 16, None, tokenizer_preset(256))
    for name in DECODERS:
        with torch.device("meta"):
            tokenizer, _ = build_models(config)
        tokenizer.load_state_dict(states["tokenizer"], assign=True)
        tokenizer = tokenizer.cuda().eval()
        generator = torch.Generator("cuda").manual_seed(0)
        tokens = [torch.randint(0, 4096, (images, p * p), device="cuda", generator=generator) for p in config.patch_nums]
        f_hat = tokenizer.tokens_to_f_hat(tokens)
        tokenizer.cast_decoder(torch.float16 if "fp16" in name else torch.float32, channels_last="NHWC" in name)
        if "compiled" in name:
            tokenizer.decoder.set_fused(False)  # Inductor's norms instead of the kernels
            tokenizer.decoder.compile(dynamic=True)  # as hmar.inference.compile_for_sampling does

        def decode(part):
            return tokenizer.decode(part).float()

        for chunk in chunks:
            def run():
                with torch.no_grad():
                    return torch.cat([decode(part) for part in f_hat.split(chunk)])

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            pixels = (out.add(1).mul(127.5)).round()
            if reference is None:
                reference = pixels
            diff = (pixels - reference).abs()
            row = {"decoder": name, "chunk": chunk, "images": images, "ms": statistics.median(times), "first_call_s": first_s,
                   "extra_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                   "max_levels_vs_fp32": diff.max().item(), "pixels_off_by_more_than_1_pct": (diff > 1).float().mean().item() * 100}
            rows.append(row)
            print(f"decoder {name:<28} chunk {chunk:>3}: {row['ms']:7.1f} ms for {images}  +{row['extra_peak_gib']:5.2f} GiB  "
                  f"first {first_s:5.1f} s  vs fp32: max {row['max_levels_vs_fp32']:.0f} levels, {row['pixels_off_by_more_than_1_pct']:.3f}% > 1", flush=True)
        torch.cuda.empty_cache()  # the next variant's models replace these
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=["hmar", "var"])
    parser.add_argument("--decoders", action="store_true", help="time the decoder variants only")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    states = {}
    for family in args.families:
        tokenizer, transformer = build_models(bench_config(family, 16, None, tokenizer_preset(256)))
        states["tokenizer"] = tokenizer.state_dict()
        states[family] = transformer.state_dict()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = time_decoders(states, 64, [8, 16, 32, 64]) if args.decoders else time_levers(states, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def time_levers(states: dict, args) -> list[dict]:
    rows = []
    for family in args.families:
        reference = {}
        for levers, name in enumerate(LEVERS):
            config, tokenizer, transformer = build(family, levers, states)
            for batch in args.batch:
                r = time_sampling(config, tokenizer, transformer, batch, args.iters if batch > 1 else 2 * args.iters, levers >= 5)
                images = r.pop("images")
                if levers == 0:
                    reference[batch] = images
                diff = ((images * 255).round() - (reference[batch] * 255).round()).abs()
                row = {"family": family, "lever": name, "batch": batch, **r,
                       "max_levels_vs_before": diff.max().item(), "pixels_off_by_more_than_1_pct": (diff > 1).float().mean().item() * 100}
                rows.append(row)
                print(f"{family:>4} {name:<22} batch {batch:>3}: {r['ms']:8.1f} ms  peak {r['peak_gib']:5.2f} GiB  "
                      f"first call {r['first_call_s']:6.1f} s  vs before: max {row['max_levels_vs_before']:.0f} levels, "
                      f"{row['pixels_off_by_more_than_1_pct']:.2f}% > 1", flush=True)
            del tokenizer, transformer
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
