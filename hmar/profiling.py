"""Where a benchmarked step spends its time: torch.profiler over a few extra steps, summed into
categories that BENCHMARKS.md reports.

What is counted:

- On CUDA, device time: every kernel, copy and fill the GPU ran, by the kernel's own name (CPU
  operators are left out, or their kernels would count twice). The total is the GPU's busy time; a
  timed step longer than it spent the difference with the GPU idle (launch overhead, host syncs).
- On the CPU, each operator's self CPU time, by operator name (the CPU runs no kernels). Python time
  between operators is not in it.

Categories come from name patterns (`CATEGORIES`, lower-cased names, first match wins, so the
specific patterns come before the generic ones: a fused Inductor kernel named after a log-softmax is
loss, a cuDNN convolution named "…implicit_gemm…" is the VQ-VAE, our attention kernels are attention
although they multiply matrices). Names decide alone: the decoder's element-wise work (SiLU,
residual adds) counts as element-wise, not as VQ-VAE. Whatever matches nothing is "other", so the
categories always add up to the total.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Steps profiled after the timed ones (the functions are warm and compiled by then).
PROFILED_STEPS = 3
TABLE_ROWS = 30

CATEGORIES: tuple[tuple[str, str], ...] = (
    # the trainer's fused AdamW, gradient clipping (foreach norms and scaling) and their annotation
    ("optimizer", r"adam|optimizer|_foreach_|multi_tensor_apply|lpnorm|clip_grad"),
    # our Triton kernels (_attn_fwd, _attn_bwd_dq, _attn_bwd_dkdv), SDPA's flash / memory-efficient /
    # cuDNN kernels and the CPU's SDPA operators
    ("attention", r"_attn_fwd|_attn_bwd|flash|fmha|sdpa|scaled_dot_product|efficient_attention"),
    ("loss/softmax", r"softmax|nll_loss|cross_entropy|logsumexp"),
    # top-k / top-p filtering and the draw (sorts, scans, multinomial's exponential and argmax, or the
    # fused `_guided_draw` of `hmar.kernels.sampling`); in
    # training only the argmax of the loss's accuracy lands here
    ("top-k/top-p/draw", r"multinomial|topk|sort|cumsum|scan|distribution|exponential|argmax|_guided_draw"),
    # the tokenizer: decoder convolutions and group norms (the channels-last decoder's Triton kernels
    # among them), φ convolutions, up/downsampling of f̂
    ("vq-vae", r"convolution|convolve|conv2d|fprop|dgrad|wgrad|group_norm|upsample|interpolate|adaptive_avg_pool"
               r"|_partial_moments|_group_statistics|_normalize_act|_add_bias"),
    # cuBLAS(Lt) / CUTLASS kernels, Inductor GEMM templates, and the CPU's matmul operators
    ("matmul", r"gemm|gemv|nvjet|cutlass|splitkreduce|triton_tem_|aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$|addmmbackward|mmbackward"),
    # Inductor's fused point-wise / reduction kernels, ATen's element-wise and reduction kernels,
    # layer norms, activations, copies, our cosine-attention inputs (_cosine_qkv_fwd/_bwd) and AdaLN
    # (_adaln_fwd/_bwd) kernels
    ("element-wise/norm", r"triton_|_cosine_qkv|_adaln_|elementwise|vectorized|reduce_kernel|norm|gelu|silu|aten::(add|sub|mul|div|neg|exp|pow|clamp|copy|cat|where|fill|masked_fill|sum|mean|to|_to_copy)_?$"),
)
OTHER = "other"
CATEGORY_NAMES = tuple(name for name, _ in CATEGORIES) + (OTHER,)
_PATTERNS = tuple((name, re.compile(pattern)) for name, pattern in CATEGORIES)


def category_of(name: str) -> str:
    """The category of a kernel or operator name (see the module docstring)."""
    lowered = name.lower()
    return next((category for category, pattern in _PATTERNS if pattern.search(lowered)), OTHER)


@dataclass
class StepProfile:
    table: str  # torch.profiler's key_averages table, top TABLE_ROWS by self device (CPU) time
    breakdown: dict  # JSON-ready: per category ms per step and % of the counted time


def _own_time_us(event, on_device: bool) -> float:
    """The time this profiler row adds to the total: a device event's time on CUDA (not the CPU
    operator that launched it, nor a user annotation spanning others), self CPU time on the CPU."""
    if not on_device:
        return event.self_cpu_time_total
    if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
        return 0.0
    return event.self_device_time_total


def breakdown(events, on_device: bool, steps: int) -> dict:
    """Sum the profiler's rows (`key_averages()`) by category, per step."""
    microseconds: dict[str, float] = defaultdict(float)
    for event in events:
        microseconds[category_of(event.key)] += _own_time_us(event, on_device)
    total = sum(microseconds.values())
    return {
        "counted": "device time of kernels" if on_device else "self CPU time of operators",
        "steps": steps,
        "total_ms": total / steps / 1e3,
        "categories": {
            name: {"ms": microseconds[name] / steps / 1e3, "percent": 100 * microseconds[name] / total if total else 0.0}
            for name in CATEGORY_NAMES
        },
    }


def profile_steps(step: Callable[[], object], device: torch.device, steps: int = PROFILED_STEPS) -> StepProfile:
    """Run `step` `steps` times under torch.profiler (CPU, and CUDA on a GPU)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_device else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
    events = profiler.key_averages()
    sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=90)
    return StepProfile(table, breakdown(events, on_device, steps))
