"""Sampling a batch, or taking a training step, by replaying one CUDA graph.

A sampling batch launches thousands of small kernels: per scale the blocks, guidance, filtering, the
draw and f̂'s update, then the decoder. At the early scales (1 to 25 tokens a row) the GPU finishes
each kernel before the host has launched the next, so the GPU sits idle for much of a batch. The
sampler reads nothing on the host and every shape is fixed by the batch
size and the schedule, so the whole batch, decoder included, can be captured once as a CUDA graph and
replayed with one launch.

`GraphedSampler` does that for plain generation (no forced tokens): the first batch of given
settings runs eagerly (which also warms up lazy initialisation and compilation, as capture requires);
the second captures the graph; every batch from then on replays it. A replay runs the very kernels
that the eager run launches, on the same random numbers: the graph draws from the device's default
CUDA generator, which PyTorch advances by the graph's whole offset at each replay, and the caller's
generator state is swapped in around the replay and read back after it. So a seed gives the same
images eagerly and replayed, and the generator goes on exactly as after an eager batch.

The graph keeps its own memory pool (the batch's transient peak, as eager sampling reaches it) while
it is held; `memory_bytes` says how much, and `release` frees it. One graph is held at a time.

`GraphedTrainStep` does the same for a training step whose shapes stay fixed (`hmar train stage1
--cuda-graph`, `hmar bench train --cuda-graph`), which otherwise leaves the GPU idle between its
kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import torch

from hmar.sampler import ProgressCallback, SampleResult, report_steps, sample
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer

T = TypeVar("T")


def capture(run: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T, int]:
    """`run` captured as a CUDA graph (not executed): the graph, what `run` returned (tensors in the
    graph's pool, which each replay rewrites) and the pool's size in bytes, the growth of reserved
    memory over the capture (the allocator's cache is emptied first, so that the growth is the pool)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph, result, torch.cuda.memory_reserved(device) - reserved


# Eager steps before a training step is captured (on a side stream, as capture requires: lazy
# initialisation, compilation and autotuning happen there); the capture takes the next call.
TRAIN_GRAPH_WARMUP = 3


class GraphedTrainStep(Generic[T]):
    """A training step (forward, backward, clipping, optimizer step) on static tensors, run eagerly
    `TRAIN_GRAPH_WARMUP` times on a side stream, then captured as one CUDA graph and replayed: one
    launch per step instead of thousands, so the GPU never waits for the host. The step must read
    nothing on the host, its optimizer must be capturable (a tensor learning rate, which a schedule
    may change between replays), and its autocast must not cache casts. Each call returns what the
    step returned: from the graph, the same tensors each time, rewritten by each replay. Its
    gradients and activations live in the graph's pool (`memory_bytes`) between steps. Random
    numbers come from the default CUDA generator, whose seed and offset each replay reads anew, so
    reseeding before a replay gives what reseeding before an eager step gives."""

    def __init__(self, step: Callable[[], T], device: torch.device):
        self.step, self.device = step, device
        self.memory_bytes, self._eager_steps = 0, 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: T | None = None

    def __call__(self) -> T:
        if self._graph is not None:
            self._graph.replay()
            return self._outputs
        if self._eager_steps < TRAIN_GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                outputs = self.step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._eager_steps += 1
            return outputs
        self._graph, self._outputs, self.memory_bytes = capture(self.step, self.device)
        self._graph.replay()
        return self._outputs


@dataclass(frozen=True)
class _Settings:
    """What fixes the captured kernels: shapes, schedule and the sampling constants baked into them."""

    batch_size: int
    schedule: tuple[tuple[int, ...], ...]
    cfg: float
    top_k: int
    top_p: float


class GraphedSampler:
    """`hmar.sampler.sample` for models on a CUDA device, replaying a CUDA graph from the second batch
    of the same settings on (see the module docstring)."""

    def __init__(self, tokenizer: MultiScaleVQVAE, transformer: ScaleTransformer, amp_dtype: torch.dtype | None):
        self.tokenizer, self.transformer, self.amp_dtype = tokenizer, transformer, amp_dtype
        self.memory_bytes = 0
        self._seen: _Settings | None = None  # settings of the last eager batch
        self._captured: _Settings | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._labels: torch.Tensor | None = None
        self._result: SampleResult | None = None

    def __call__(self, labels: torch.Tensor, schedule: Sequence[Sequence[int]], *, cfg: float, top_k: int, top_p: float,
                 generator: torch.Generator | None = None, progress: ProgressCallback | None = None) -> SampleResult:
        settings = _Settings(labels.shape[0], tuple(tuple(e) for e in schedule), float(cfg), int(top_k), float(top_p))
        if settings != self._captured:
            if settings != self._seen:
                self._seen = settings
                return sample(self.tokenizer, self.transformer, labels, schedule, cfg=cfg, top_k=top_k, top_p=top_p,
                              generator=generator, progress=progress, amp_dtype=self.amp_dtype)
            self._capture(labels, settings)
        self._replay(labels, generator)
        report_steps(schedule, progress)
        result = self._result
        return SampleResult(result.images.clone(), [t.clone() for t in result.tokens], result.f_hat.clone())

    def _capture(self, labels: torch.Tensor, settings: _Settings) -> None:
        torch.cuda.synchronize(labels.device)  # the held graph may still be replaying
        self.release()
        self._labels = labels.clone()
        self._graph, self._result, self.memory_bytes = capture(
            lambda: sample(self.tokenizer, self.transformer, self._labels, settings.schedule, cfg=settings.cfg,
                           top_k=settings.top_k, top_p=settings.top_p, generator=None, amp_dtype=self.amp_dtype),
            labels.device)
        self._captured = settings

    def _replay(self, labels: torch.Tensor, generator: torch.Generator | None) -> None:
        self._labels.copy_(labels)
        if generator is None:
            self._graph.replay()
            return
        default = torch.cuda.default_generators[labels.device.index or 0]
        own_state = default.get_state()
        default.set_state(generator.get_state())
        try:
            self._graph.replay()
            generator.set_state(default.get_state())
        finally:
            default.set_state(own_state)

    def release(self) -> None:
        """Free the held graph and its memory pool."""
        self._graph = self._labels = self._result = self._captured = None
        self.memory_bytes = 0
        torch.cuda.empty_cache()
