"""Whether two versions of the engine sample the same batches, bit for bit: run it with one version
(`save`), then with the other (`compare`).

It samples random d16-shaped HMAR and VAR models (width 64·depth, seeded) on the given device with that
device's sampling policy, eagerly (`hmar.sampler.sample`; `hmar.cuda_graph` replays these very
kernels), at batch 1 and 4, 14 and 18 steps, top-k/top-p 900/0.96 and 1/0, and stores tokens, f̂
and images. `compare` requires tokens and f̂ to be identical; images are compared too, but on CUDA
the channels-last decoder's cuDNN autotuning may pick other kernels in another process (its last
bits then differ whatever changed), so their largest difference is printed instead of failing.

To check a change against an earlier commit, import that commit's engine (kernels included) first:

    mkdir /tmp/base && git archive COMMIT hmar kernels | tar -x -C /tmp/base && mv /tmp/base/kernels /tmp/base/hmar/
    PYTHONPATH=/tmp/base python recipes/benchmarks/sampling_identity.py save /tmp/base.pt
    python recipes/benchmarks/sampling_identity.py compare /tmp/base.pt

On the CPU the reference policy runs (seconds at --depth 16 with --width 64); `TRITON_INTERPRET=1
... --policy cuda` runs the CUDA policy's kernels under Triton's interpreter (slow; use --depth 4).
"""
from __future__ import annotations

import argparse
import sys

import torch

import hmar
from hmar.benchmark import bench_config
from hmar.config import TokenizerConfig
from hmar.pipeline import Pipeline
from hmar.policy import KernelPolicy
from hmar.sampler import make_generator, sample
from hmar.schedule import resolve_schedule


def _cases(device: torch.device, depth: int, width: int | None, policy: KernelPolicy, tokenizer_width: int) -> dict:
    results = {}
    for family in ("hmar", "var"):
        torch.manual_seed(0)
        config = bench_config(family, depth, width, TokenizerConfig(ch=tokenizer_width))
        pipe = Pipeline.random(config, device, kernels=policy)
        for batch in (1, 4):
            for steps in (14, 18) if family == "hmar" else (10,):
                schedule = resolve_schedule(config.patch_nums, steps, family=family)
                labels = (torch.arange(batch, device=device) * 7) % config.transformer.num_classes
                for top_k, top_p in ((900, 0.96), (1, 0.0)):
                    r = sample(pipe.tokenizer, pipe.transformer, labels, schedule, cfg=1.5, top_k=top_k, top_p=top_p,
                               generator=make_generator(5, device), amp_dtype=policy.amp_dtype)
                    results[(family, batch, steps, top_k)] = {"tokens": [t.cpu() for t in r.tokens], "f_hat": r.f_hat.cpu(),
                                                              "images": r.images.cpu()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=None, help="default: 64·depth on CUDA, 64 on the CPU")
    parser.add_argument("--policy", choices=("device", "cuda"), default="device",
                        help="the device's sampling policy, or CUDA's (on the CPU: under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    policy = KernelPolicy.choose("cuda" if args.policy == "cuda" else device, training=False, cuda_graph=False)
    print(f"hmar from {hmar.__file__}; policy {policy.compact()}", file=sys.stderr)
    results = _cases(device, args.depth, args.width or (64 if cpu else None), policy, 32 if cpu else 160)
    if args.mode == "save":
        torch.save(results, args.path)
        return
    base = torch.load(args.path)
    different = 0
    for key, old in base.items():
        new = results[key]
        same = torch.equal(old["f_hat"], new["f_hat"]) and all(torch.equal(a, b) for a, b in zip(old["tokens"], new["tokens"]))
        image_diff = (old["images"] - new["images"]).abs().max().item()
        different += not same
        print(f"{key}: tokens and f̂ {'identical' if same else 'DIFFERENT'}; images max |diff| {image_diff:.3g}")
    print("all identical" if not different else f"{different} cases DIFFERENT")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
