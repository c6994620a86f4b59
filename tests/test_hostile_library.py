"""Hostile calls of the library API (`Pipeline.generate`, `edit`, `settings`, `Pipeline.random`): each
must be refused with an `HmarError` of one line that names the problem (never a raw ValueError or
TypeError, never a silently rounded class or a garbage image), before any sampling starts, and
leave no file behind. Sizes come from the fixture model."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import hmar.pipeline
from hmar.config import MEMORY_BUDGET_VARIABLE, ModelConfig
from hmar.errors import ConfigError, HmarError, InputError, ScheduleError
from hmar.pipeline import Pipeline, default_batch_size


@pytest.fixture(scope="module")
def pipe(conformance_models) -> Pipeline:
    return Pipeline.from_folder(conformance_models["hmar"], device="cpu")


@pytest.fixture
def no_sampling(monkeypatch, tmp_path):
    """Fails the test if sampling starts, and runs it in an empty folder that must stay empty."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the problem was found")

    monkeypatch.setattr(hmar.pipeline, "sample", refuse)
    monkeypatch.setattr(hmar.pipeline, "edit_target", refuse)
    monkeypatch.chdir(tmp_path)
    yield
    assert not os.listdir(tmp_path), "a file was left behind"


def refused(kind: type, call, *fragments: str) -> str:
    with pytest.raises(HmarError) as caught:
        call()
    assert isinstance(caught.value, kind), (type(caught.value), caught.value)
    message = str(caught.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---- labels ----------------------------------------------------------------------------------------
LABEL_CASES = [
    ("float", lambda p: [0.7], ["label 0.7 is not a class"]),
    ("integral-float", lambda p: [1.0], ["label 1.0 is not a class"]),
    ("bool", lambda p: [True], ["label True is not a class"]),
    ("nan", lambda p: [math.nan], ["is not a class"]),
    ("float-tensor", lambda p: torch.tensor([0.7]), ["torch.float32"]),
    ("bool-tensor", lambda p: torch.tensor([True, False]), ["torch.bool"]),
    ("2d-tensor", lambda p: torch.zeros(2, 2, dtype=torch.long), ["1-D integer tensor", "2-D"]),
    ("float-scalar-tensor-in-list", lambda p: [torch.tensor(0.5)], ["is not a class"]),
    ("numpy-float", lambda p: [np.float32(2.0)], ["is not a class"]),
    ("bare-int", lambda p: 3, ["single value 3", "[3]"]),
    ("bare-string", lambda p: "class 1", ["single value"]),
    ("none", lambda p: None, ["labels must be a list"]),
    ("object", lambda p: [object()], ["is not a class"]),
    ("empty", lambda p: [], ["no labels given"]),
    ("out-of-range", lambda p: [p.num_classes], ["class {} is out of range"]),
    ("negative", lambda p: [-1], ["class -1 is out of range"]),
    ("unknown-name", lambda p: ["no such class"], ["unknown class name 'no such class'"]),
    ("ambiguous-name", lambda p: ["class"], ["is ambiguous", "classes"]),
]


@pytest.mark.parametrize("make, fragments", [pytest.param(m, f, id=n) for n, m, f in LABEL_CASES])
def test_bad_labels_are_input_errors(pipe, no_sampling, make, fragments):
    fragments = [f.replace("{}", str(pipe.num_classes)) for f in fragments]
    refused(InputError, lambda: pipe.generate(make(pipe), seed=0), *fragments)


@pytest.mark.parametrize("labels", [
    pytest.param([0, 1], id="ints"),
    pytest.param(torch.tensor([0, 1]), id="long-tensor"),
    pytest.param(torch.tensor([0, 1], dtype=torch.int32), id="int32-tensor"),
    pytest.param([np.int64(0), torch.tensor(1)], id="numpy-and-scalar-tensor"),
    pytest.param(["class 0", "1"], id="names"),
])
def test_valid_labels_resolve_to_the_same_classes(pipe, labels):
    assert pipe.check_labels(labels) == [0, 1]


# ---- options ---------------------------------------------------------------------------------------
OPTION_CASES = [
    ("cfg-nan", {"cfg": math.nan}, InputError, ["cfg must be a finite number, got NaN"]),
    ("cfg-inf", {"cfg": math.inf}, InputError, ["cfg must be a finite number, got Infinity"]),
    ("cfg-text", {"cfg": "high"}, InputError, ["cfg must be a finite number"]),
    ("top-k-negative", {"top_k": -1}, InputError, ["top-k must be an integer of at least 0"]),
    ("top-k-fraction", {"top_k": 2.5}, InputError, ["top-k", "2.5"]),
    ("top-k-text", {"top_k": "many"}, InputError, ["top-k", '"many"']),
    ("top-p-above-one", {"top_p": 1.5}, InputError, ["top-p", "1.5"]),
    ("top-p-nan", {"top_p": math.nan}, InputError, ["top-p", "NaN"]),
    ("steps-fraction", {"steps": 6.5}, InputError, ["steps must be a positive integer, got 6.5"]),
    ("steps-bool", {"steps": True}, InputError, ["steps must be a positive integer, got true"]),
    ("steps-too-many", {"steps": 10**9}, ScheduleError, ["steps must be between"]),
    ("schedule-garbage", {"schedule": "a;b"}, ScheduleError, ["schedule entry 1"]),
    ("seed-negative", {"seed": -1}, InputError, ["seed must be an integer from 0 to 2**64 - 1, got -1"]),
    ("seed-too-large", {"seed": 2**70}, InputError, ["seed must be an integer"]),
    ("seed-fraction", {"seed": 1.5}, InputError, ["seed must be an integer"]),
    ("batch-zero", {"batch_size": 0}, InputError, ["batch size must be a positive integer, got 0"]),
    ("batch-bool", {"batch_size": True}, InputError, ["batch size must be a positive integer, got True"]),
    ("batch-fraction", {"batch_size": 2.5}, InputError, ["batch size must be a positive integer"]),
    ("unknown-option", {"temperature": 0.5}, InputError, ["unknown sampling option temperature"]),
    ("steps-and-schedule", {"steps": 20, "schedule": "1"}, ScheduleError, ["not both"]),
]


@pytest.mark.parametrize("options, kind, fragments", [pytest.param(o, k, f, id=n) for n, o, k, f in OPTION_CASES])
def test_bad_options_are_refused_before_sampling(pipe, no_sampling, options, kind, fragments):
    refused(kind, lambda: pipe.generate([0], **options), *fragments)


def test_the_default_batch_is_bounded(pipe):
    settings = pipe.settings(count=100_000)
    assert settings.batch_size == default_batch_size(pipe.resolution) <= 16
    assert [default_batch_size(r) for r in (256, 512, 1024)] == [16, 4, 1]


def test_a_batch_beyond_the_budget_is_refused_with_the_batch_that_fits(pipe, no_sampling):
    message = refused(InputError, lambda: pipe.generate([0] * 10**5, batch_size=10**5), "a batch of 100000 images",
                      "use a batch size of", MEMORY_BUDGET_VARIABLE)
    fits = int(message.split("use a batch size of ")[1].split()[0])
    pipe.settings(count=fits, batch_size=fits)  # the batch it names does fit


def test_a_tiny_budget_refuses_even_one_image(pipe, no_sampling, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, str(4 * pipe.config.parameter_count() + 1))
    refused(InputError, lambda: pipe.generate([0]), "no batch fits", MEMORY_BUDGET_VARIABLE)


@pytest.mark.parametrize("change, fragment", [
    pytest.param({"depth": 10**9}, "hmar.depth 1000000000", id="depth-1e9"),
    pytest.param({"width": 4_194_304}, "hmar.width 4194304", id="width-4M"),
])
def test_random_pipelines_beyond_the_budget_are_refused_before_building(pipe, monkeypatch, change, fragment):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the problem was found")

    monkeypatch.setattr("hmar.checkpoints.MultiScaleVQVAE", refuse)
    config = dataclasses.replace(pipe.config, transformer=dataclasses.replace(pipe.config.transformer, **change))
    refused(ConfigError, lambda: Pipeline.random(config, device="cpu"), fragment, "memory budget")


def test_published_presets_fit_the_default_budget():
    from hmar.config import check_memory, model_preset

    for name in ("hmar-d30", "var-d30"):
        for resolution in (256, 512):
            config = model_preset(name, resolution)
            check_memory(config, default_batch_size(resolution))
            check_memory(config, default_batch_size(resolution), element_bytes=2, dense_attention=False)


# ---- edit inputs -------------------------------------------------------------------------------------
def _images(pipe, count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, pipe.resolution, pipe.resolution)


def _keep(pipe, count: int = 2) -> torch.Tensor:
    keep = torch.ones(count, pipe.resolution, pipe.resolution, dtype=torch.bool)
    keep[:, : pipe.resolution // 2] = False
    return keep


EDIT_CASES = [
    ("uint8-image", lambda p: (_images(p).mul(255).to(torch.uint8), _keep(p), None), ["torch.uint8", "divide by 255"]),
    ("0-255-float-image", lambda p: (_images(p).mul(255), _keep(p), None), ["must be in [0, 1]", "divide by 255"]),
    ("minus-one-to-one-image", lambda p: (_images(p).mul(2).sub(1), _keep(p), None), ["must be in [0, 1]", "add 1 and halve"]),
    ("nan-image", lambda p: (_images(p).index_put_((torch.tensor([0]),), torch.tensor(math.nan)), _keep(p), None), ["NaN"]),
    ("inf-image", lambda p: (_images(p).clamp_max(1).index_fill_(0, torch.tensor([1]), math.inf), _keep(p), None), ["infinite"]),
    ("numpy-image", lambda p: (_images(p).numpy(), _keep(p), None), ["got ndarray"]),
    ("three-dim-image", lambda p: (_images(p)[0], _keep(p, 1), None), ["shape (3,"]),
    ("one-channel-image", lambda p: (_images(p)[:, :1], _keep(p), None), ["shape (2, 1,"]),
    ("wrong-size-image", lambda p: (torch.rand(2, 3, p.resolution + 8, p.resolution + 8), _keep(p), None),
     [f"(N, 3, {{r}}, {{r}})", "images of any size: Pipeline.inpaint"]),
    ("no-images", lambda p: (_images(p)[:0], _keep(p)[:0], None), ["shape (0,"]),
    ("mask-batch-mismatch", lambda p: (_images(p, 2), _keep(p, 3), None), ["2 images but 3 keep_pixels masks"]),
    ("mask-batch-of-one", lambda p: (_images(p, 2), _keep(p, 1), None), ["2 images but 1 keep_pixels masks"]),
    ("float-mask", lambda p: (_images(p), _keep(p).float(), None), ["keep_pixels must be a bool tensor", "torch.float32"]),
    ("mask-with-channels", lambda p: (_images(p), _keep(p)[:, None].expand(-1, 3, -1, -1), None), ["keep_pixels must have shape"]),
    ("mask-wrong-size", lambda p: (_images(p), torch.ones(2, 8, 8, dtype=torch.bool), None), ["keep_pixels must have shape"]),
    ("labels-count-mismatch", lambda p: (_images(p, 2), _keep(p, 2), [0, 1, 2]), ["2 images but 3 labels"]),
    ("float-label", lambda p: (_images(p, 1), _keep(p, 1), [0.5]), ["label 0.5 is not a class"]),
]


@pytest.mark.parametrize("make, fragments", [pytest.param(m, f, id=n) for n, m, f in EDIT_CASES])
def test_bad_edit_inputs_are_input_errors(pipe, no_sampling, make, fragments):
    images, keep, labels = make(pipe)
    fragments = [f.replace("{r}", str(pipe.resolution)) for f in fragments]
    refused(InputError, lambda: pipe.edit(images, keep, labels, seed=0), *fragments)


def test_a_valid_edit_still_works(pipe):
    result = pipe.edit(_images(pipe, 1), _keep(pipe, 1), ["class 3"], seed=0, top_k=8)
    assert result.images.shape == (1, 3, pipe.resolution, pipe.resolution) and result.labels == [3]


def test_config_errors_from_code_name_the_key(pipe):
    with pytest.raises(ConfigError, match=r"^hmar.depth must be a positive integer, got 6.5$"):
        dataclasses.replace(pipe.config.transformer, depth=6.5)
    with pytest.raises(ConfigError, match=r"^config: sampling.cfg must be a finite number, got NaN$"):
        ModelConfig.from_dict({**pipe.config.to_dict(), "sampling": {"cfg": math.nan}})


def test_a_request_too_large_to_hold_is_refused_and_batches_stream_it(pipe, no_sampling, monkeypatch):
    config = pipe.config
    batch = default_batch_size(pipe.resolution)
    # room for the weights, one batch and 40 finished images, not for 100
    room = 4 * config.parameter_count() + config.activation_bytes(batch) + 40 * config.result_bytes()
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, str(room))
    refused(InputError, lambda: pipe.generate([0] * 100, seed=0), "100 images", "held together", "at most 40 at a time")
    batches = pipe.generate_batches([0] * 100, seed=0)  # checked, not started: sampling is refused by the fixture
    with pytest.raises(AssertionError, match="sampling started"):
        next(batches)


def test_batches_are_the_images_of_generate(pipe):
    whole = pipe.generate([0, 1, 2], seed=3, batch_size=2, top_k=8)
    parts = list(pipe.generate_batches([0, 1, 2], seed=3, batch_size=2, top_k=8))
    assert [p.labels for p in parts] == [[0, 1], [2]]
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
