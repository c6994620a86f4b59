"""The Pipeline API on a model folder assembled from the conformance fixtures (random weights); the
sampler's draw is torch.multinomial's, and its loop reads no tensor value on the host."""
from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hmar.config import ModelConfig
from hmar.editing import keep_masks_per_scale
from hmar.errors import DeviceError, HmarError, InputError, ScheduleError
from hmar.pipeline import Pipeline
from hmar.sampler import EditTarget, SampleResult, check_finite, draw_one, make_generator, sample
from hmar.schedule import format_schedule, one_step_per_scale, resolve_schedule

from tests.conftest import load_fixture

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture(scope="module", params=["hmar", "var"])
def pipe(request, conformance_models):
    return Pipeline.from_folder(conformance_models[request.param], device="cpu")


@pytest.fixture(scope="module")
def fixture_schedule(conformance_dir, conformance_config):
    return json.loads((conformance_dir / conformance_config["mask_schedule"]).read_text())


def _schedule_for(pipe, fixture_schedule):
    return fixture_schedule if pipe.config.family == "hmar" else None


def test_generate_matches_the_reference_and_is_deterministic(pipe, conformance_dir, conformance_config, fixture_schedule):
    labels = conformance_config["labels"]
    io = load_fixture(conformance_dir, conformance_config, f"{pipe.config.family}_io")
    cfg, top_k, top_p, *mask = io["generate0_args"].tolist()  # HMAR's cases also say whether masks refine
    schedule = _schedule_for(pipe, fixture_schedule) if mask != [0] else one_step_per_scale(pipe.config.patch_nums)
    options = dict(schedule=schedule, cfg=cfg, top_k=int(top_k), top_p=top_p, seed=conformance_config["seed"])
    first = pipe.generate(labels, **options)
    torch.testing.assert_close(first.images, io["generate0_image"], atol=1e-4, rtol=0)
    again = pipe.generate(labels, **{**options, "top_k": 8, "top_p": 0.9})
    assert torch.equal(again.images, pipe.generate(labels, **{**options, "top_k": 8, "top_p": 0.9}).images)
    assert [t.shape[1] for t in first.tokens] == [p * p for p in pipe.config.patch_nums]


def test_progress_reports_every_step(pipe, fixture_schedule):
    events = []
    result = pipe.generate([0], schedule=_schedule_for(pipe, fixture_schedule), seed=0, progress=events.append)
    total = sum(len(e) for e in result.settings.schedule)
    assert [e.done for e in events] == list(range(1, total + 1)) and events[-1].total == total


def test_editing_forces_the_known_tokens(pipe, conformance_dir, conformance_config, fixture_schedule):
    io = load_fixture(conformance_dir, conformance_config, "tokenizer_io")
    images = io["image"].add(1).div(2)
    size = pipe.resolution
    keep = torch.ones(images.shape[0], size, size, dtype=torch.bool)
    keep[:, size // 4: size // 2, size // 4: size // 2] = False
    result = pipe.edit(images, keep, schedule=_schedule_for(pipe, fixture_schedule), seed=0, top_k=8, top_p=0.9)
    target_tokens = pipe.tokenizer.encode(images.mul(2).sub(1))
    known_per_scale = keep_masks_per_scale(keep, pipe.config.patch_nums)
    assert not known_per_scale[-1].all(), "the finest scale must have tokens to generate"
    for k, known in enumerate(known_per_scale):
        assert torch.equal(result.tokens[k][known], target_tokens[k][known]), f"scale {k}: a known token changed"
    everything = pipe.edit(images, torch.ones_like(keep), seed=0)
    for k in range(len(pipe.config.patch_nums)):
        assert torch.equal(everything.tokens[k], target_tokens[k])


def test_bad_requests_are_clear_errors(pipe):
    with pytest.raises(InputError, match=f"class {pipe.num_classes} is out of range"):
        pipe.generate([pipe.num_classes], seed=0)
    with pytest.raises(ScheduleError):
        pipe.generate([0], steps=sum(p * p for p in pipe.config.patch_nums) + 1)
    with pytest.raises(InputError, match="top-p"):
        pipe.generate([0], top_p=1.5)


def test_cuda_requested_without_cuda(conformance_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA was requested"):
        Pipeline.random(ModelConfig.from_dict(conformance_config, "hmar"), device="cuda")


def test_schedule_defaults_come_from_the_model_config(conformance_config, fixture_schedule):
    data = {k: v for k, v in conformance_config.items() if k != "var"}
    config = ModelConfig.from_dict({**data, "sampling": {"schedule": format_schedule(fixture_schedule), "cfg": 2.0}})
    settings = Pipeline.random(config, device="cpu").settings()
    assert settings.schedule == fixture_schedule and settings.cfg == 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_the_draw_is_torch_multinomial(device):
    for rows, vocabulary, seed in ((1, 5, 0), (7, 64, 1), (300, 4096, 2), (3, 1, 3)):
        probs = torch.rand(rows, vocabulary, device=device).pow(4)
        probs[:, : vocabulary // 3] = 0  # filtered tokens
        probs /= probs.sum(-1, keepdim=True)
        expected = torch.multinomial(probs, 1, replacement=True, generator=make_generator(seed, device)).squeeze(1)
        assert torch.equal(draw_one(probs, make_generator(seed, device)), expected)


def _steps_of_two(pipe) -> list[list[int]] | None:
    """HMAR: two steps per scale past the first (mask refinement runs); VAR: its own schedule."""
    if pipe.config.family != "hmar":
        return None
    first, *rest = pipe.config.patch_nums
    return [[first * first]] + [[p * p - 1, 1] for p in rest]


def test_the_sampling_loop_reads_no_tensor_value_on_the_host(pipe):
    # Fake tensors have no values: reading one on the host (.item(), .tolist(), bool(), nonzero)
    # raises. (The generator is left out: fake tensors take none; it changes which numbers, not how.)
    schedule = resolve_schedule(pipe.config.patch_nums, schedule=_steps_of_two(pipe), family=pipe.config.family)
    labels = torch.tensor([0, pipe.num_classes - 1])
    keep = [torch.rand(2, p * p) < 0.5 for p in pipe.config.patch_nums]
    edit = EditTarget([torch.zeros(2, p * p, dtype=torch.long) for p in pipe.config.patch_nums], keep)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for target in (None, edit):
            result = sample(pipe.tokenizer, pipe.transformer, labels, schedule, top_k=8, top_p=0.9, edit=target)
            assert result.images.shape == (2, 3, pipe.resolution, pipe.resolution)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_never_waits_for_the_gpu(conformance_models):
    for family in ("hmar", "var"):
        pipe = Pipeline.from_folder(conformance_models[family], device="cuda")
        schedule = resolve_schedule(pipe.config.patch_nums, schedule=_steps_of_two(pipe), family=family)
        labels = torch.tensor([0, pipe.num_classes - 1], device="cuda")

        def run():
            return sample(pipe.tokenizer, pipe.transformer, labels, schedule, generator=make_generator(0, "cuda"), amp_dtype=torch.bfloat16)

        run()  # first calls set up libraries (handles, workspaces)
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _poisoned(folder, head: str) -> Pipeline:
    """A pipeline whose `head` weights overflow the logits to inf (finite weights, changed after loading)."""
    pipe = Pipeline.from_folder(folder, device="cpu")
    with torch.no_grad():
        getattr(pipe.transformer, head).weight.fill_(torch.finfo(torch.float32).max)
    return pipe


@pytest.mark.parametrize("family, head", [("hmar", "ns_head"), ("hmar", "mask_head"), ("var", "head")])
def test_non_finite_logits_stop_sampling_naming_the_scale(conformance_models, fixture_schedule, family, head):
    pipe = _poisoned(conformance_models[family], head)
    schedule = fixture_schedule if family == "hmar" else None
    # the mask branch runs first at the first scale of several steps
    first_bad = next(k for k, entry in enumerate(fixture_schedule) if len(entry) > 1) if head == "mask_head" else 0
    side, K = pipe.config.patch_nums[first_bad], len(pipe.config.patch_nums)
    with pytest.raises(HmarError, match=rf"not finite \(NaN or inf\) at scale {first_bad + 1} of {K} \({side}x{side} tokens\)"):
        pipe.generate([0, pipe.num_classes - 1], schedule=schedule, seed=0, top_k=1)
    with pytest.raises(HmarError, match="not finite"):
        pipe.generate([0], schedule=schedule, seed=0, batch_size=1, top_k=8, top_p=0.9)


def test_a_result_without_flags_is_checked_by_its_f_hat(conformance_models):
    """A caller that keeps only images, tokens and f̂ (as the CUDA graph's replay does) still sees it."""
    pipe = _poisoned(conformance_models["hmar"], "ns_head")
    settings = pipe.settings(count=1, seed=0)
    result = pipe.sample_batch(torch.tensor([0]), settings, make_generator(0, "cpu"))
    assert result.nonfinite.any() and not torch.isfinite(result.f_hat).any()
    with pytest.raises(HmarError, match=r"^sampling stopped: the model's logits are not finite"):
        check_finite(SampleResult(result.images, result.tokens, result.f_hat))
    clean = Pipeline.from_folder(conformance_models["hmar"], device="cpu").sample_batch(torch.tensor([0]), settings, make_generator(0, "cpu"))
    assert not clean.nonfinite.any()
    check_finite(clean)
    check_finite(SampleResult(clean.images, clean.tokens, clean.f_hat))
