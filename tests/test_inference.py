"""The sampling fast paths of `hmar.inference` compute what the plain models compute: Linear weights
stored in bf16 give the very samples that bf16 autocast gives, a float16 decoder the same images to
a level of 255, compiled blocks and decoder the same tokens and images (checked on the CPU, where CI
runs; on CUDA by the GPU tests)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hmar.checkpoints import load_models
from hmar.config import ModelConfig
from hmar.inference import cast_linears, compile_for_sampling, prepare_for_sampling
from hmar.policy import KernelPolicy
from hmar.pipeline import Pipeline
from hmar.sampler import make_generator, sample
from hmar.schedule import resolve_schedule

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", params=["hmar", "var"])
def models(request, conformance_models):
    folder = conformance_models[request.param]
    config = ModelConfig.load(folder / "config.json")
    tokenizer, transformer = load_models(config, folder)
    return config, tokenizer.eval(), transformer.eval()


def assert_within_decoder_rounding(got: torch.Tensor, expected: torch.Tensor, value_range: float) -> None:
    """A float16 decoder against a float32 one, in 8-bit levels: seen on random weights at most 2 (CPU)
    and 4 (d16 on an H100) levels apart, with a fraction of a percent more than one level off
    (hmar-tiny's trained decoder: 2 levels at most)."""
    levels = (got.float() - expected.float()).abs() * (255 / value_range)
    assert levels.max() <= 4 and (levels > 1).float().mean() < 0.01, (levels.max(), (levels > 1).float().mean())


def _sample(config, tokenizer, transformer, amp_dtype=None, device="cpu"):
    steps = len(config.patch_nums) + 3 if config.family == "hmar" else None  # mask refinement runs too
    schedule = resolve_schedule(config.patch_nums, steps=steps, family=config.family)
    labels = torch.tensor([0, 3, config.transformer.num_classes], device=device)  # the last: unconditional
    return sample(tokenizer, transformer, labels, schedule, top_k=16, top_p=0.9, generator=make_generator(5, device), amp_dtype=amp_dtype)


def test_bf16_linear_weights_give_the_samples_of_autocast(models):
    config, tokenizer, transformer = models
    expected = _sample(config, tokenizer, transformer, torch.bfloat16)
    cast = copy.deepcopy(transformer)
    assert cast_linears(cast, torch.bfloat16) > 0
    linears = [m for m in cast.modules() if isinstance(m, nn.Linear)]
    assert all(m.weight.dtype == torch.bfloat16 for m in linears if m not in set(cast.shared_ada_lin.modules()))
    assert cast.pos_1LC.dtype == torch.float32 and cast.class_emb.weight.dtype == torch.float32
    got = _sample(config, tokenizer, cast, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got.tokens, expected.tokens))
    assert torch.equal(got.images, expected.images)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_a_float16_decoder_decodes_the_same_images(models, device):
    config, tokenizer, transformer = models
    f_hat = _sample(config, tokenizer, transformer).f_hat.to(device)
    reference = copy.deepcopy(tokenizer).to(device)
    expected = reference.decode(f_hat)
    half = copy.deepcopy(reference)
    half.cast_decoder(torch.float16)
    got = half.decode(f_hat)
    assert got.dtype == torch.float16 and half.decoder.conv_in.weight.dtype == torch.float16
    assert half.encoder.conv_in.weight.dtype == torch.float32  # encoding (editing) stays float32
    assert_within_decoder_rounding(got, expected, value_range=2.0)  # images in [-1, 1]


@pytest.mark.slow
def test_compiled_blocks_sample_the_same_tokens(models):
    config, tokenizer, transformer = models
    expected = _sample(config, tokenizer, transformer)
    compiled_tokenizer, compiled = copy.deepcopy(tokenizer), copy.deepcopy(transformer)
    assert compile_for_sampling(compiled_tokenizer, compiled) > 1
    got = _sample(config, compiled_tokenizer, compiled)
    assert all(torch.equal(a, b) for a, b in zip(got.tokens, expected.tokens))
    torch.testing.assert_close(got.images, expected.images, atol=1e-5, rtol=1e-5)


def test_the_cpu_pipeline_keeps_the_reference_numerics(conformance_models):
    pipe = Pipeline.from_folder(conformance_models["hmar"], device="cpu")
    assert pipe.amp_dtype is None and not pipe.compiled
    assert all(p.dtype == torch.float32 for model in (pipe.tokenizer, pipe.transformer) for p in model.parameters())


@pytest.mark.gpu
@CUDA
def test_the_cuda_pipeline_samples_as_autocast_does(conformance_models):
    for family in ("hmar", "var"):
        folder = conformance_models[family]
        config = ModelConfig.load(folder / "config.json")
        tokenizer, transformer = (m.cuda().eval() for m in load_models(config, folder))
        policy = KernelPolicy.choose("cuda", training=False)
        transformer.set_policy(policy)  # the blocks' kernels in both runs: what is compared is the casts
        expected = _sample(config, tokenizer, transformer, torch.bfloat16, "cuda")
        prepare_for_sampling(tokenizer, transformer, policy)
        assert tokenizer.decoder.conv_in.weight.dtype == torch.float16
        got = _sample(config, tokenizer, transformer, torch.bfloat16, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(got.tokens, expected.tokens)), family
        assert_within_decoder_rounding(got.images, expected.images, value_range=1.0)  # images in [0, 1]
