"""Side-by-side benchmarks of HMAR and VAR in our engine: a stage-1 training step and sampling.

Both families are built at the same depth and width (random weights) and timed alternately in one
run, so that their ratio is measured under the same conditions: warm-up first, then medians of CUDA
event timings (wall clock on the CPU), and peak memory on CUDA. The training step is the stage-1
trainer's (`hmar.train.loop`): its loss, frozen mask branch, gradient clipping, fused AdamW on CUDA,
and blocks compiled on CUDA (`hmar.compile`) — VAR's too, so that the two are compared alike.
Optionally a few more steps run under torch.profiler (`hmar.profiling`). `hmar bench train|sample`
prints these rows; the functions also run on the CPU at small sizes so that CI exercises them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator, Sequence

import torch

from hmar.attention import AttentionFn, select_attention
from hmar.checkpoints import build_models
from hmar.compile import compile_blocks, wanted as compile_wanted
from hmar.config import ModelConfig, TokenizerConfig, TransformerConfig
from hmar.cuda_graph import TRAIN_GRAPH_WARMUP, GraphedTrainStep
from hmar.pipeline import Pipeline
from hmar.profiling import StepProfile, profile_steps
from hmar.sampler import make_generator
from hmar.train.losses import next_scale_loss, scale_weights, score_logits
from hmar.train.options import TrainConfig
from hmar.train.stage1 import MASK_BRANCH, NextScaleObjective
from hmar.transformer import ScaleTransformer

LOSS_PATHS = ("chunked", "logits")
GRAD_CLIP = TrainConfig.grad_clip  # the trainer's default
# Warm-up rounds at least, when compiled. Both families' blocks share compiled code (one Dynamo cache
# per function), and a family's first step after the other family compiled can compile again (seen on
# the CPU: 1.6 s); so warm-up rounds alternate the families as the timed rounds do, and the second
# round takes those late compilations.
COMPILED_WARMUP = 2
# Warm-up rounds at least, with CUDA-graph sampling: the eager batch, then the capture (hmar.cuda_graph).
GRAPHED_WARMUP = 2
# Inductor modes `hmar bench train --compile-mode` takes ("max-autotune" itself would add Inductor's
# own CUDA graphs, which the whole-step graph replaces).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


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


def stage1_loss_fn(transformer: ScaleTransformer, attend: AttentionFn, weights: torch.Tensor, loss: str = "chunked") -> Callable[..., torch.Tensor]:
    """The stage-1 loss of (labels, teacher input, targets) with per-scale `weights`: "chunked" is the
    trainer's (logits head applied in chunks); "logits" scores all float32 logits at once, as the
    trainer did before, to measure what the chunked loss changes."""
    if loss not in LOSS_PATHS:
        raise ValueError(f"unknown loss path {loss!r}; expected one of {LOSS_PATHS}")
    objective = NextScaleObjective(transformer, attend, weights)
    if loss == "chunked":
        return lambda *inputs: objective(*inputs)[0]

    def all_logits(labels: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = transformer.forward_next_scale(labels, teacher, attend)
        return next_scale_loss(score_logits(logits, targets), weights, transformer.patch_nums)[0]

    return all_logits


def train_step_fn(config: ModelConfig, batch_size: int, device: torch.device, attention: str = "auto", loss: str = "chunked",
                  compiled: bool = False, compile_mode: str | None = None, cuda_graph: bool = False) -> Workload:
    """One stage-1 step on random tokens, as the trainer takes it: teacher-forced forward, the stage-1
    loss, backward, gradient clipping, AdamW (fused on CUDA); blocks compiled when `compiled` (in
    Inductor's `compile_mode`); the whole step replayed as a CUDA graph when `cuda_graph`
    (`GraphedTrainStep`)."""
    _, transformer = build_models(config)
    transformer.to(device).train()
    if config.family == "hmar":  # stage 1 leaves the mask branch alone
        for name in MASK_BRANCH:
            getattr(transformer, name).requires_grad_(False)
    if compiled:
        compile_blocks(transformer, mode=None if compile_mode in (None, "default") else compile_mode)
    L, first = sum(p * p for p in config.patch_nums), config.patch_nums[0] ** 2
    labels = torch.randint(0, config.transformer.num_classes, (batch_size,), device=device)
    teacher = torch.randn(batch_size, L - first, config.tokenizer.z_channels, device=device)
    targets = torch.randint(0, config.tokenizer.vocab_size, (batch_size, L), device=device)
    weights = scale_weights("lognormal", config.patch_nums).to(device)  # the trainer's default
    loss_of = stage1_loss_fn(transformer, select_attention(attention, device), weights, loss)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"a CUDA-graph training step needs a CUDA device, not {device}")
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda", capturable=cuda_graph)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        # (a graph must not keep autocast's cached casts: they are freed when the context exits)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=not cuda_graph):
            value = loss_of(labels, teacher, targets)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def resident() -> Iterator[torch.Tensor]:
        yield from transformer.parameters()
        yield from transformer.buffers()
        yield from (t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))

    if not cuda_graph:
        return Workload(step, resident)
    graphed = GraphedTrainStep(step, device)
    return Workload(graphed, resident, lambda: graphed.memory_bytes)


def sample_fn(pipe: Pipeline, batch_size: int, steps: int | None, cfg: float, top_k: int, top_p: float) -> Workload:
    """One batch sampled as `Pipeline.generate` samples it (its devices, dtypes and fast paths)."""
    config, device = pipe.config, pipe.device
    settings = pipe.settings(steps=steps if config.family == "hmar" else None, cfg=cfg, top_k=top_k, top_p=top_p, batch_size=batch_size)
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


def _compare(task: str, workloads: dict[str, Workload], families: dict[str, str], batch_size: int, device, warmup: int,
             iters: int, flops: dict[str, float], compiled: bool = False, profile: bool = False,
             cuda_graph: bool = False) -> list[BenchRow]:
    """`workloads` and `families` keyed by the rows' model names."""
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
                             cuda_graph=cuda_graph, profile=profiled, model=name))
    var_ms = next((r.median_ms for r in rows if r.family == "var"), None)
    for row in rows:
        row.ratio_vs_var = var_ms / row.median_ms if var_ms else None
    return rows


def bench_train(
    tokenizer: TokenizerConfig, depth: int, batch_size: int, device: torch.device, width: int | None = None,
    warmup: int = 3, iters: int = 10, attention: str = "auto", loss: str = "chunked", compile: bool | None = None,
    profile: bool = False, compile_mode: str = "default", cuda_graph: bool = False,
) -> list[BenchRow]:
    """`attention`: the implementation both families use (auto: the Triton kernel on CUDA); `loss`:
    see `stage1_loss_fn`; `compile`: compile both families' blocks (None: on CUDA, as the trainer),
    in Inductor's `compile_mode` (`COMPILE_MODES`); `cuda_graph`: replay each family's whole step as
    a CUDA graph (`GraphedTrainStep`; CUDA only); `profile`: also profile a few steps of each family
    (`BenchRow.profile`)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
    compiled = compile_wanted(compile, device)
    configs = {f: bench_config(f, depth, width, tokenizer) for f in ("hmar", "var")}
    workloads = {f: train_step_fn(c, batch_size, device, attention, loss, compiled, compile_mode, cuda_graph) for f, c in configs.items()}
    # HMAR's stage 1 trains the trunk and next-scale branch: the mask branch takes no part
    flops = {f: 3 * forward_flops(c, batch_size) for f, c in configs.items()}
    warmup = max(warmup, TRAIN_GRAPH_WARMUP + 1) if cuda_graph else warmup
    return _compare("train", workloads, {f: f for f in workloads}, batch_size, device, warmup, iters, flops, compiled, profile,
                    cuda_graph)


def bench_sample(
    tokenizer: TokenizerConfig, depth: int, batch_size: int, device: torch.device, steps: int | None = None,
    width: int | None = None, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, warmup: int = 2, iters: int = 5,
    profile: bool = False, compile: bool | None = None, models: Sequence[str] = (), cuda_graph: bool = True,
) -> list[BenchRow]:
    """HMAR vs VAR sampling: random models of `depth` (and `width`), or the named `models` (registry
    names or folders, already downloaded); `compile`: compile the transformers' blocks (None: on CUDA);
    `cuda_graph`: replay batches as CUDA graphs on CUDA, as `Pipeline` does by default (the warm-up
    takes the eager batch and the capture)."""
    compiled = compile_wanted(compile, device)
    options = dict(compile=compiled, cuda_graph=cuda_graph)
    if models:
        pipes = {str(name): Pipeline.from_pretrained(str(name), device, **options) for name in models}
    else:
        pipes = {f: Pipeline.random(bench_config(f, depth, width, tokenizer), device, **options) for f in ("hmar", "var")}
    workloads = {name: sample_fn(pipe, batch_size, steps, cfg, top_k, top_p) for name, pipe in pipes.items()}
    families = {name: pipe.config.family for name, pipe in pipes.items()}
    graphed = any(pipe.graphed is not None for pipe in pipes.values())
    rows = _compare("sample", workloads, families, batch_size, device, max(warmup, GRAPHED_WARMUP) if graphed else warmup, iters, {},
                    compiled, profile)
    for row in rows:
        row.cuda_graph = pipes[row.model].graphed is not None
    return rows
