"""Replayed CUDA graphs sample what eager sampling samples (`hmar.cuda_graph`): the same tokens and
images bit for bit, seed for seed, and the caller's generator goes on as after eager batches. GPU
only, except that the CPU never builds a graphed sampler."""
from __future__ import annotations

import pytest
import torch

from hmar.pipeline import Pipeline
from hmar.sampler import SamplingProgress

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_cpu_samples_eagerly():
    assert Pipeline.from_pretrained("hmar-tiny", "cpu").graphed is None


@pytest.fixture(scope="module", params=["hmar", "var"])
def pipelines(request, conformance_models):
    folder = conformance_models[request.param]
    graphed = Pipeline.from_folder(folder, "cuda")
    eager = Pipeline.from_folder(folder, "cuda", cuda_graph=False)
    return eager, graphed


def _batches(pipe: Pipeline, count: int, seed: int, labels: list[int], steps: int | None, progress=None):
    """`count` batches from one generator, as `Pipeline.generate` draws several batches."""
    settings = pipe.settings(steps=steps, top_k=16, top_p=0.9, batch_size=len(labels))
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    label_tensor = torch.tensor(labels, device=pipe.device)
    results = [pipe.sample_batch(label_tensor, settings, generator, progress=progress) for _ in range(count)]
    return results, generator.get_state()


@pytest.mark.gpu
@CUDA
def test_replays_give_the_eager_samples_and_generator_states(pipelines):
    eager, graphed = pipelines
    steps = len(eager.config.patch_nums) + (3 if eager.config.family == "hmar" else 0)  # mask refinement runs too
    labels = [0, 3, eager.num_classes]  # the last: unconditional
    expected, expected_state = _batches(eager, 4, seed=5, labels=labels, steps=steps)
    reported: list[SamplingProgress] = []
    got, state = _batches(graphed, 4, seed=5, labels=labels, steps=steps, progress=reported.append)
    assert graphed.graphed.memory_bytes > 0  # batch 1 eager, 2 captured and replayed, 3 and 4 replayed
    for a, b in zip(got, expected):
        assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
        assert torch.equal(a.images, b.images) and torch.equal(a.f_hat, b.f_hat)
    assert not torch.equal(got[1].images, got[2].images)  # the replays drew new numbers
    assert torch.equal(state, expected_state)
    total = sum(len(entry) for entry in graphed.settings(steps=steps).schedule)
    assert [p.done for p in reported] == list(range(1, total + 1)) * 4


@pytest.mark.gpu
@CUDA
def test_new_settings_sample_eagerly_then_capture_again(pipelines):
    eager, graphed = pipelines
    steps = len(eager.config.patch_nums) if eager.config.family == "hmar" else None
    for labels, seed in (([1, 2], 0), ([1, 2, 4, 5], 1), ([1, 2], 2)):
        expected, _ = _batches(eager, 3, seed, labels, steps)
        got, _ = _batches(graphed, 3, seed, labels, steps)
        assert all(torch.equal(a.images, b.images) for a, b in zip(got, expected))
    graphed.graphed.release()
    assert graphed.graphed.memory_bytes == 0
