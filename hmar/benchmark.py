"""Side-by-side benchmarks of HMAR and VAR in our engine: the timing and memory accounting every
`hmar bench` task shares, and sampling.

Both families are built at the same depth and width (random weights), or loaded by name, and timed
alternately in one run, so that their ratio is measured under the same conditions: warm-up first,
then medians of CUDA event timings (wall clock on the CPU), and peak memory on CUDA. Optionally a few
more steps run under torch.profiler (`hmar.profiling`). The training step's benchmark lives on the
training side (`hmar.train.benchmark`); `hmar bench train|sample` prints the rows. Everything also
runs on the CPU at small sizes, so that CI exercises it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator, Sequence

import torch

from hmar.config import ModelConfig, TokenizerConfig, TransformerConfig
from hmar.pipeline import Pipeline
from hmar.policy import KernelPolicy
from hmar.profiling import StepProfile, profile_steps
from hmar.sampler import make_generator

# Warm-up rounds at least, when compiled. Both families' blocks share compiled code (one Dynamo cache
# per function), and a family's first step after the other family compiled can compile again; so
# warm-up rounds alternate the families as the timed rounds do, and the second round takes those
# late compilations.
COMPILED_WARMUP = 2
# Warm-up rounds at least, with CUDA-graph sampling: the eager batch, then the capture (hmar.cuda_graph).
GRAPHED_WARMUP = 2


@dataclass
class BenchRow:
    family: str
    task: str
    median_ms: float
    images_per_s: float
    peak_memory_gib: float | None
    tflops: float | None
    ratio_vs_var: float | None = None
    compiled: bool = False  # transformer blocks compiled (hmar.compile)
    cuda_graph: bool = False  # sampling batches replayed as CUDA graphs (hmar.cuda_graph)
    profile: StepProfile | None = None
    model: str = ""  # the family for random models, else the model's registry name or folder
    kernels: dict | None = None  # the kernel policy the step ran with (KernelPolicy.as_dict)

    def as_dict(self) -> dict:
        """JSON-ready: the profile as its category breakdown (its table goes to a file)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "profile"}
        return {**row, "profile": self.profile.breakdown if self.profile else None}


@dataclass
class Workload:
    """A benchmarked step and what its model keeps on the device between steps (weights, buffers,
    optimizer state), so that its peak memory can be told apart from another model's held alongside."""

    step: Callable[[], object]
    resident: Callable[[], Iterable[torch.Tensor]]
    held_bytes: Callable[[], int] = lambda: 0  # device memory held outside tensors: a CUDA graph's pool

    def resident_bytes(self) -> int:
        storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in self.resident()}
        return sum(storages.values()) + self.held_bytes()  # shared storages (views, tied weights) once


def first_call_seconds(step: Callable[[], object]) -> float:
    """Wall seconds of one CUDA call of `step`, from an idle device until its work is done (a first
    call's compilation and autotuning included)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(work: Workload, device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Median milliseconds of the step, and on CUDA its peak memory in GiB: the model's resident
    state plus the most one step allocates on top of what was allocated before it (so other models
    held on the device do not count)."""
    for _ in range(warmup):
        work.step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        transient = 0
        for _ in range(iters):
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work.step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            transient = max(transient, torch.cuda.max_memory_allocated(device) - before)
        return statistics.median(times), (work.resident_bytes() + transient) / 2**30
    for _ in range(iters):
        t0 = time.perf_counter()
        work.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def bench_config(family: str, depth: int, width: int | None, tokenizer: TokenizerConfig, num_classes: int = 1000) -> ModelConfig:
    """A model of the published shape family (width 64·depth, head dim 64) unless width is given."""
    width = width or 64 * depth
    heads = max(1, width // 64)
    branch = min(8, max(1, depth // 2))
    transformer = TransformerConfig(family=family, depth=depth, width=width, num_heads=heads, num_classes=num_classes, branch_depth=branch)
    return ModelConfig(tokenizer, transformer)


def forward_flops(config: ModelConfig, batch: int) -> float:
    """Matrix-multiply FLOPs of one teacher-forced forward over all scales (attention counted over the
    pairs the pattern allows)."""
    C, depth = config.transformer.width, config.transformer.depth
    mlp = round(C * config.transformer.mlp_ratio)
    sizes = [p * p for p in config.patch_nums]
    L = sum(sizes)
    linear = 2 * L * (4 * C * C + 2 * C * mlp)
    if config.family == "hmar":
        pairs = sum(s * s for s in sizes)
    else:
        pairs = sum(s * sum(sizes[: k + 1]) for k, s in enumerate(sizes))
    attention = 4 * pairs * C
    head = 2 * L * C * config.tokenizer.vocab_size
    return batch * (depth * (linear + attention) + head)


def sample_fn(pipe: Pipeline, batch_size: int, steps: int | None, cfg: float | None, top_k: int | None,
              top_p: float | None) -> Workload:
    """One batch sampled as `Pipeline.generate` samples it (its devices, dtypes and fast paths; a
    setting left None is the model's default, else hmar's)."""
    config, device = pipe.config, pipe.device
    # count: the whole batch is sampled at once, so the memory check must see all of it
    settings = pipe.settings(steps=steps if config.family == "hmar" else None, cfg=cfg, top_k=top_k, top_p=top_p, batch_size=batch_size,
                             count=batch_size)
    labels = torch.randint(0, config.transformer.num_classes, (batch_size,), device=device)

    def run() -> None:
        pipe.sample_batch(labels, settings, make_generator(0, device))

    def resident() -> Iterator[torch.Tensor]:
        for model in (pipe.tokenizer, pipe.transformer):
            yield from model.parameters()
            yield from model.buffers()

    def held_bytes() -> int:
        return pipe.graphed.memory_bytes if pipe.graphed is not None else 0

    return Workload(run, resident, held_bytes)


def compare(task: str, workloads: dict[str, Workload], families: dict[str, str], batch_size: int, device, warmup: int,
             iters: int, flops: dict[str, float], policy: KernelPolicy, profile: bool = False) -> list[BenchRow]:
    """Time `workloads` round by round (each round steps every model once), after `warmup` rounds;
    rows in the workloads' order with medians, peaks, TFLOP/s where `flops` has the step's FLOPs,
    speed relative to the VAR row, and profiles when `profile`. `workloads` and `families` are keyed
    by the rows' model names; `policy`: the kernel policy every workload runs with."""
    compiled, cuda_graph = policy.compile, policy.cuda_graph
    # alternate the models round by round so that all see the same machine state
    samples: dict[str, list[float]] = {name: [] for name in workloads}
    peaks: dict[str, float | None] = {}
    for _ in range(max(warmup, COMPILED_WARMUP) if compiled else warmup):
        for work in workloads.values():
            work.step()
    for _ in range(iters):
        for name, work in workloads.items():
            ms, peak = measure(work, device, 0, 1)
            samples[name].append(ms)
            peaks[name] = max(peaks.get(name) or 0.0, peak) if peak is not None else None
    rows = []
    for name, work in workloads.items():
        ms = statistics.median(samples[name])
        tflops = flops[name] / (ms / 1e3) / 1e12 if name in flops else None
        # profiled after timing, so that the profiler's overhead never enters the medians
        profiled = profile_steps(work.step, device) if profile else None
        rows.append(BenchRow(families[name], task, ms, batch_size / (ms / 1e3), peaks[name], tflops, compiled=compiled,
                             cuda_graph=cuda_graph, profile=profiled, model=name, kernels=policy.as_dict()))
    var_ms = next((r.median_ms for r in rows if r.family == "var"), None)
    for row in rows:
        row.ratio_vs_var = var_ms / row.median_ms if var_ms else None
    return rows


def bench_sample(
    tokenizer: TokenizerConfig, depth: int, batch_size: int, device: torch.device, steps: int | None = None,
    width: int | None = None, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None, warmup: int = 2, iters: int = 5,
    profile: bool = False, compile: bool | None = None, models: Sequence[str] = (), cuda_graph: bool = True,
    kernels: KernelPolicy | None = None,
) -> list[BenchRow]:
    """HMAR vs VAR sampling: random models of `depth` (and `width`), or the named `models` (registry
    names or folders, already downloaded); `compile`: compile the transformers' blocks (None: as `KernelPolicy.choose` samples: not);
    `cuda_graph`: replay batches as CUDA graphs on CUDA, as `Pipeline` does by default (the warm-up
    takes the eager batch and the capture); `steps`, `cfg`, `top_k`, `top_p`: None takes the model's
    default, else hmar's, as `hmar generate` does; `kernels`: a kernel policy instead of the one these
    flags choose (`KernelPolicy.choose`)."""
    if kernels is None:
        kernels = KernelPolicy.choose(device, training=False, compile=compile, cuda_graph=cuda_graph)
    options = dict(kernels=kernels)
    if models:
        pipes = {str(name): Pipeline.from_pretrained(str(name), device, **options) for name in models}
    else:
        pipes = {f: Pipeline.random(bench_config(f, depth, width, tokenizer), device, **options) for f in ("hmar", "var")}
    workloads = {name: sample_fn(pipe, batch_size, steps, cfg, top_k, top_p) for name, pipe in pipes.items()}
    families = {name: pipe.config.family for name, pipe in pipes.items()}
    graphed = any(pipe.graphed is not None for pipe in pipes.values())
    return compare("sample", workloads, families, batch_size, device, max(warmup, GRAPHED_WARMUP) if graphed else warmup, iters, {},
                   kernels, profile)
