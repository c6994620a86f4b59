"""The multi-scale VQ-VAE against the tokenizer reference outputs and the published key spec."""
from __future__ import annotations

import json

import pytest
import torch

from hmar.config import ModelConfig, TokenizerConfig
from hmar.checkpoints import load_weights
from hmar.tokenizer import MultiScaleVQVAE
from tests.conftest import load_fixture

ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(conformance_dir, conformance_config):
    model = MultiScaleVQVAE(ModelConfig.from_dict(conformance_config, "hmar").tokenizer)
    load_weights(model, load_fixture(conformance_dir, conformance_config, "tokenizer"), "tokenizer fixture")
    return model.eval()


@pytest.fixture(scope="module")
def io(conformance_dir, conformance_config):
    return load_fixture(conformance_dir, conformance_config, "tokenizer_io")


def test_encode_gives_the_reference_tokens(tokenizer, io):
    tokens = tokenizer.encode(io["image"])
    assert len(tokens) == len(tokenizer.patch_nums)
    for k, idx in enumerate(tokens):
        assert torch.equal(idx, io[f"idx_scale{k}"]), f"scale {k}"


def test_reconstruction_path_matches(tokenizer, io):
    tokens = [io[f"idx_scale{k}"] for k in range(len(tokenizer.patch_nums))]
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.teacher_forcing_input(tokens), io["next_scale_input"], atol=ATOL, rtol=0)
        f_hat = tokenizer.tokens_to_f_hat(tokens)
        torch.testing.assert_close(f_hat, io["f_hat"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tokenizer.decode(f_hat), io["reconstruction"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tokenizer.decode_tokens(tokens), io["reconstruction"], atol=ATOL, rtol=0)


def test_scale_by_scale_accumulation_equals_the_pyramid(tokenizer, io):
    tokens = tokenizer.encode(io["image"])
    with torch.no_grad():
        f_hat = torch.zeros_like(io["f_hat"])
        for k, idx in enumerate(tokens):
            f_hat = tokenizer.add_scale(f_hat, idx, k)
        torch.testing.assert_close(f_hat, tokenizer.tokens_to_f_hat(tokens), atol=1e-6, rtol=0)
        # the mask-branch view of a scale is its residual at its own size
        last = len(tokens) - 1
        torch.testing.assert_close(tokenizer.scale_input(tokens[last], last), tokenizer.scale_residual(tokens[last], last))


def test_published_key_spec(conformance_dir):
    spec = json.loads((conformance_dir / "hmar_checkpoint_keys.json").read_text())["vae_ch160v4096z32"]
    with torch.device("meta"):
        model = MultiScaleVQVAE(TokenizerConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec


def test_training_forward_reaches_encoder_decoder_and_codebook(tokenizer, io):
    model = MultiScaleVQVAE(tokenizer.config)
    model.load_state_dict(tokenizer.state_dict())
    reconstruction, vq_loss, hits = model(io["image"])
    assert reconstruction.shape == io["image"].shape
    assert hits.shape == (len(model.patch_nums), model.config.vocab_size)
    assert hits.sum(dim=1).tolist() == [io["image"].shape[0] * p * p for p in model.patch_nums]
    (reconstruction.square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
