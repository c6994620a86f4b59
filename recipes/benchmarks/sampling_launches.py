"""What one sampled batch launches on a GPU, counted on the CPU.

A CUDA graph of a sampling batch replays every kernel the eager batch launched; at batch 1 most of
them run for a few microseconds, so their number sets the time. The number does not depend on the
model's width or the vocabulary's contents, only on its structure (depth, branches, scales, schedule)
and on the kernel policy. So this builds a model of a given depth at a tiny width, takes the CUDA
sampling policy (`KernelPolicy.choose("cuda")`), runs its Triton kernels under Triton's interpreter
on the CPU, and counts, for one `hmar.sampler.sample` call:

- every ATen operator that launches work on a GPU (views, allocations and metadata are left out),
  through a `TorchDispatchMode`;
- every Triton kernel launch (the fused block norms, the cosine-attention inputs, the fused draw, the
  decoder's channels-last kernels), at the launch itself; the custom operators that wrap some of
  them are not counted again.

Each launch is booked to the innermost line of hmar's own code that made it, and to a phase of the
sampler. Usage (the interpreter must be on before Triton is imported):

    TRITON_INTERPRET=1 python recipes/benchmarks/sampling_launches.py --depth 16 --batch-size 1 --top 20

`--json` prints the counts as JSON instead of tables; `--reference` counts the reference policy (no
interpreter needed); `--unfolded` makes each block add its last residual itself rather than leave it
to the next block's first norm (`ScaleTransformer.folds_residuals`), to count what the fold saves.
Under the interpreter a d16 batch takes minutes on a small CPU. `tests/test_sampling_launches.py`
counts a tiny model through `count_sampling_launches`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hmar.benchmark import bench_config
from hmar.config import DEFAULT_SAMPLING, TokenizerConfig
from hmar.pipeline import Pipeline
from hmar.policy import KernelPolicy
from hmar.sampler import make_generator, sample
from hmar.schedule import resolve_schedule

ROOT = Path(__file__).resolve().parents[2]
# Code whose lines the launches are booked to: the engine and the kernels' Python wrappers.
OWN = (str(ROOT / "hmar") + os.sep, str(ROOT / "kernels") + os.sep)

# ATen operators that launch nothing on a GPU: views, allocations, metadata.
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "unsqueeze", "squeeze", "permute", "transpose", "t",
    "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "as_strided", "alias", "detach", "lift_fresh",
    "narrow", "view_as_real", "view_as_complex", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
    "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "diagonal", "unfold", "set_",
    "resize_", "_has_compatible_shallow_copy_type", "_nested_tensor_from_mask_left_aligned", "result_type",
}

# Phases, by the functions on the stack: the first of these found anywhere on it names the phase.
PHASES = (
    ("decode", "decoder"),
    ("add_scale", "f̂ update (add_scale)"),
    ("scale_input", "f̂ mask-branch input (scale_input)"),
    ("downsample", "f̂ downsample"),
    ("guided_draw", "guidance/draw"),
    ("least_confident", "mask schedule"),
    ("AdaLNBlock.forward", "block pass"),
    ("ScaleTransformer._run", "block pass"),
    ("masked_scale_tokens", "block inputs"),
    ("scale_tokens", "block inputs"),
    ("start_tokens", "block inputs"),
    ("next_scale", "heads (norm, logits)"),
    ("masked", "heads (norm, logits)"),
    ("_refine_scale", "mask schedule"),
    ("sample", "sampler (other)"),
)


def _call_site() -> tuple[str, str]:
    """(innermost own line "file:line function", phase) of the current Python stack."""
    frame, site, names = sys._getframe(2), None, set()
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(OWN) and not path.endswith("sampling_launches.py"):
            if site is None:
                site = f"{os.path.relpath(path, ROOT)}:{frame.f_lineno} {frame.f_code.co_name}"
            names.update((frame.f_code.co_name, frame.f_code.co_qualname))
        frame = frame.f_back
    return site or "?", next((label for function, label in PHASES if function in names), "other")


class LaunchCounter(TorchDispatchMode):
    """Counts launches by operator, call site and phase while active."""

    def __init__(self):
        super().__init__()
        self.by_op, self.by_site, self.by_phase = Counter(), Counter(), Counter()

    def record(self, op: str) -> None:
        site, phase = _call_site()
        self.by_op[op] += 1
        self.by_site[(site, op)] += 1
        self.by_phase[phase] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "aten" and name not in NO_LAUNCH:
            self.record(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


@contextlib.contextmanager
def _counting_triton_launches(counter: LaunchCounter):
    """Inside, every interpreted Triton kernel run is booked to `counter` (the interpreter's own tensor
    copies are not launches on a GPU, so they run with the dispatch mode off)."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter.record(f"triton.{self.fn.__name__}")
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = run


def cuda_sampling_policy() -> KernelPolicy:
    """What a GPU samples with (Triton present here), without the CUDA graph, which only replays."""
    cuda = KernelPolicy.choose("cuda", training=False)
    return dataclasses.replace(cuda, cuda_graph=False)


def count_sampling_launches(pipe: Pipeline, labels: torch.Tensor, schedule, **options) -> LaunchCounter:
    """The launches of one `sample` call (after a warm-up call), Triton's included where the pipeline's
    policy is not the reference (the interpreter must then be on)."""
    sample(pipe.tokenizer, pipe.transformer, labels, schedule, generator=make_generator(0, "cpu"), **options)  # warm-up
    counter = LaunchCounter()
    triton = contextlib.nullcontext() if pipe.policy.is_reference else _counting_triton_launches(counter)
    with counter, triton:
        sample(pipe.tokenizer, pipe.transformer, labels, schedule, generator=make_generator(0, "cpu"), **options)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=64, help="tiny: the counts do not depend on it (a multiple of 64)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--reference", action="store_true", help="count the reference (CPU) policy instead of CUDA's")
    parser.add_argument("--unfolded", action="store_true", help="each block adds its last residual itself (no fold into the next norm)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.reference and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("set TRITON_INTERPRET=1 (the CUDA policy's Triton kernels run under the interpreter)")

    torch.manual_seed(0)
    patch_nums = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}[args.resolution]
    # the published tokenizer's structure at a narrow width (ch must be a multiple of 32)
    tokenizer = TokenizerConfig(ch=32, patch_nums=patch_nums, image_size=args.resolution)
    config = bench_config("hmar", args.depth, args.width, tokenizer)
    policy = KernelPolicy.reference() if args.reference else cuda_sampling_policy()
    pipe = Pipeline.random(config, "cpu", kernels=policy)
    if args.unfolded:
        pipe.transformer.folds_residuals = False
    schedule = resolve_schedule(config.patch_nums, args.steps)
    labels = torch.arange(args.batch_size) % config.transformer.num_classes
    options = dict(cfg=DEFAULT_SAMPLING["cfg"], top_k=DEFAULT_SAMPLING["top_k"], top_p=DEFAULT_SAMPLING["top_p"],
                   amp_dtype=policy.amp_dtype)

    counter = count_sampling_launches(pipe, labels, schedule, **options)

    if args.json:
        print(json.dumps({"total": counter.total, "phases": dict(counter.by_phase.most_common()),
                          "ops": dict(counter.by_op.most_common()),
                          "sites": [[site, op, n] for (site, op), n in counter.by_site.most_common()]}, indent=1))
        return
    fold = "" if args.reference else f", {'un' if args.unfolded else ''}folded residual adds"
    print(f"launches per sample() call: {counter.total} (depth {args.depth}, batch {args.batch_size}, "
          f"schedule {schedule}, policy {policy.compact()}{fold})\n")
    print("by phase")
    for phase, n in counter.by_phase.most_common():
        print(f"  {n:6d}  {phase}")
    print(f"\ntop {args.top} call sites")
    for (site, op), n in counter.by_site.most_common(args.top):
        print(f"  {n:6d}  {op:38s} {site}")
    print("\nby operator")
    for op, n in counter.by_op.most_common():
        print(f"  {n:6d}  {op}")


if __name__ == "__main__":
    main()
