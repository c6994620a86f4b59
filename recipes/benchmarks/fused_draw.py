"""The fused draw (`hmar.kernels.sampling`) against the PyTorch ops it replaces, in one run (CUDA).

    python recipes/benchmarks/fused_draw.py [--out FOLDER]

1. One step's guidance, top-k, top-p, softmax and draw (`hmar.sampler.guided_draw`, fused and not)
   at d16 batch-64 shapes: 2·64 rows of l tokens × 4096 logits, fp32 and bf16, guidance 1.5, top-k
   900, top-p 0.96; median of CUDA-event timings; the reference's copy of its logits (it guides in
   place) subtracted; the share of equal tokens from the same generator seed.
2. The 14 steps of a batch at 256 px: each scale's step timed and summed over the default schedule.
3. A whole d16 HMAR batch of 64 at 256 px (random weights, CUDA graphs): the default kernel policy
   and the same with `fused_draw` off, alternated in one process (`hmar.benchmark.compare`).
Tables go to stdout and, with --out, to FOLDER/fused_draw.md.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import triton

from hmar.benchmark import bench_config, compare, sample_fn
from hmar.config import DEFAULT_SAMPLING, tokenizer_preset
from hmar.kernels import sampling
from hmar.pipeline import Pipeline
from hmar.policy import KernelPolicy
from hmar.schedule import DEFAULT_STEPS, resolve_schedule
from hmar.sampler import exponential_noise, guided_draw

BATCH, VOCAB, GUIDANCE = 64, 4096, 1.5


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def step_ms(logits: torch.Tensor, generator: torch.Generator) -> tuple[float, float, float, float]:
    """(reference ms, fused ms, kernel-only ms, share of equal tokens) for one step on `logits`."""
    top_k, top_p = DEFAULT_SAMPLING["top_k"], DEFAULT_SAMPLING["top_p"]
    work = torch.empty(logits.shape, device=logits.device)

    def reference():
        work.copy_(logits)
        generator.manual_seed(0)
        return guided_draw(work, GUIDANCE, top_k, top_p, generator, fused=False)

    def fused():
        generator.manual_seed(0)
        return guided_draw(logits, GUIDANCE, top_k, top_p, generator, fused=True)

    rows = logits.shape[0] // 2 * logits.shape[1]
    noise = exponential_noise((rows, logits.shape[2]), torch.float32, logits.device, generator)
    copy = timed(lambda: work.copy_(logits))
    ms = (timed(reference) - copy, timed(fused), timed(lambda: sampling.guided_draw(logits, GUIDANCE, top_k, top_p, noise)))
    same = (reference()[0] == fused()[0]).float().mean().item()
    return (*ms, same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator(device)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}", "",
             "| rows | logits | reference ms | fused ms | kernel only ms | speed | equal tokens |", "|---|---|---|---|---|---|---|"]
    for side in (16, 4):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(2 * BATCH, side * side, VOCAB, device=device) * 3).to(dtype)
            reference, fused, kernel, same = step_ms(logits, generator)
            lines.append(f"| {BATCH * side * side} | {str(dtype).removeprefix('torch.')} | {reference:.3f} | {fused:.3f} | {kernel:.3f} | "
                         f"{reference / fused:.2f}x | {same:.5f} |")
    config = bench_config("hmar", 16, None, tokenizer_preset(256))
    schedule = resolve_schedule(config.patch_nums, DEFAULT_STEPS)
    total_reference = total_fused = 0.0
    for pn, entry in zip(config.patch_nums, schedule):
        reference, fused, _, _ = step_ms(torch.randn(2 * BATCH, pn * pn, VOCAB, device=device) * 3, generator)
        total_reference, total_fused = total_reference + len(entry) * reference, total_fused + len(entry) * fused
    lines += ["", f"the {sum(map(len, schedule))} steps of a batch of {BATCH}: reference {total_reference:.2f} ms, fused {total_fused:.2f} ms"]
    default = KernelPolicy.choose(device, training=False)
    policies = {"fused draw": default, "reference draw": dataclasses.replace(default, fused_draw=False)}
    work = {name: sample_fn(Pipeline.random(config, device, kernels=policy), BATCH, None, None, None, None)
            for name, policy in policies.items()}
    rows = compare("sample", work, {name: "hmar" for name in work}, BATCH, device, 2, 5, {}, default, profile=False)
    lines += [""] + [f"whole batch, {name}: median {row.median_ms:.1f} ms, peak {row.peak_memory_gib:.2f} GiB" for name, row in zip(work, rows)]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_draw.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
