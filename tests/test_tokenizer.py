"""The multi-scale VQ-VAE against the tokenizer reference outputs and the published key spec.

Every size comes from the conformance folder's config.json, so another folder of the same form
(other patch_nums, batch, widths) runs these tests unchanged.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmar.config import TokenizerConfig
from hmar.errors import InputError
from hmar.tokenizer import MultiScaleVQVAE, PartiallySharedPhi, bicubic_upsample
from tests.conftest import load_fixture

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_config(conformance_config) -> TokenizerConfig:
    return TokenizerConfig(**conformance_config["tokenizer"])


@pytest.fixture(scope="module")
def tiny_state(conformance_dir, conformance_config) -> dict:
    return load_fixture(conformance_dir, conformance_config, "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tiny_config, tiny_state):
    model = MultiScaleVQVAE(tiny_config)
    model.load_state_dict(tiny_state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def io(conformance_dir, conformance_config):
    return load_fixture(conformance_dir, conformance_config, "tokenizer_io")


@pytest.fixture(scope="module")
def reference_tokens(io, conformance_config):
    return [io[f"idx_scale{k}"] for k in range(len(conformance_config["tokenizer"]["patch_nums"]))]


# ---- state dict layout ---------------------------------------------------------------------------
def test_tiny_checkpoint_has_exactly_the_model_keys(tiny_config, tiny_state):
    model = MultiScaleVQVAE(tiny_config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in tiny_state.items()}


def test_published_key_spec(conformance_dir):
    spec = json.loads((conformance_dir / "hmar_checkpoint_keys.json").read_text())["vae_ch160v4096z32"]
    with torch.device("meta"):  # shapes only: no 100M-parameter allocation
        model = MultiScaleVQVAE(TokenizerConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec


# ---- reference outputs ---------------------------------------------------------------------------
def test_encode_gives_the_reference_tokens(tokenizer, io, reference_tokens):
    tokens = tokenizer.encode(io["image"])
    assert len(tokens) == len(reference_tokens)
    for k, (idx, expected) in enumerate(zip(tokens, reference_tokens)):
        assert idx.dtype == torch.long and idx.shape == expected.shape, f"scale {k}"
        assert torch.equal(idx, expected), f"scale {k}: {(idx != expected).sum()} tokens differ"


@torch.no_grad()
def test_reconstruction_path_matches(tokenizer, io, reference_tokens):
    torch.testing.assert_close(tokenizer.teacher_forcing_input(reference_tokens), io["next_scale_input"], atol=ATOL, rtol=0)
    f_hat = tokenizer.tokens_to_f_hat(reference_tokens)
    torch.testing.assert_close(f_hat, io["f_hat"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tokenizer.decode(f_hat), io["reconstruction"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tokenizer.decode_tokens(reference_tokens), io["reconstruction"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_image_round_trip(tokenizer, io):
    """encode → tokens_to_f_hat → decode reproduces the reference end to end, and every scale's
    tokens are the nearest codes of what the earlier scales left of the features."""
    tokens = tokenizer.encode(io["image"])
    f_hat = tokenizer.tokens_to_f_hat(tokens)
    torch.testing.assert_close(f_hat, io["f_hat"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tokenizer.decode(f_hat), io["reconstruction"], atol=ATOL, rtol=0)
    assert tokenizer.decode(f_hat).abs().max() <= 1

    f = tokenizer.features(io["image"])
    codes = tokenizer.quantize.embedding.weight
    for k, idx in enumerate(tokens):
        rest = f - tokenizer.tokens_to_f_hat(tokens[:k]) if k else f
        z = tokenizer.downsample(rest, k).flatten(2).transpose(1, 2)  # (B, pn², Cvae)
        chosen = (z - codes[idx]).square().sum(-1)
        best = torch.cdist(z, codes.expand(z.shape[0], -1, -1)).square().min(-1).values
        torch.testing.assert_close(chosen, best, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_scale_by_scale_accumulation_equals_the_pyramid(tokenizer, reference_tokens):
    K = len(reference_tokens)
    P = tokenizer.patch_nums[-1]
    f_hat, zeros = None, torch.zeros(reference_tokens[0].shape[0], tokenizer.config.z_channels, P, P)
    chunks = []
    for k, idx in enumerate(reference_tokens):
        if k:
            chunks.append(tokenizer.downsample(f_hat, k).flatten(2).transpose(1, 2))
        before = f_hat
        f_hat = tokenizer.add_scale(f_hat, idx, k)
        assert f_hat is not before  # a new tensor: callers keep the old one
        torch.testing.assert_close(f_hat, tokenizer.tokens_to_f_hat(reference_tokens[: k + 1]), atol=1e-6, rtol=0)
        # the residual is φ_k of the code map, bicubic-upsampled to P except at the last scale
        residual = tokenizer.scale_residual(idx, k)
        codes = tokenizer.embed(idx)
        up = codes if k == K - 1 else F.interpolate(codes, size=(P, P), mode="bicubic")
        # (bicubic as matrix products: F.interpolate's weights, float32 rounding apart)
        torch.testing.assert_close(residual, tokenizer.phi(up, k), atol=1e-6, rtol=0)
        # the mask-branch view of a scale is its residual at its own size
        torch.testing.assert_close(tokenizer.scale_input(idx, k), F.interpolate(residual, size=codes.shape[-2:], mode="area"))
    torch.testing.assert_close(tokenizer.add_scale(zeros, reference_tokens[0], 0), tokenizer.add_scale(None, reference_tokens[0], 0))
    torch.testing.assert_close(tokenizer.teacher_forcing_input(reference_tokens), torch.cat(chunks, dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bicubic_upsample_is_f_interpolate(device):
    # every published scale size into 16 (256 px) and 32 (512 px), and an identity; float32 rounding apart
    for src, dst in [(n, 16) for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)] + [(n, 32) for n in (9, 13, 18, 24)]:
        h = torch.randn(3, 5, src, src, device=device) * 4
        expected = F.interpolate(h.double(), size=(dst, dst), mode="bicubic")
        got = bicubic_upsample(h, dst)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-6)
    with torch.autocast(device, dtype=torch.bfloat16):  # stays float32 under autocast
        assert bicubic_upsample(torch.randn(1, 2, 3, 3, device=device), 16).dtype == torch.float32


def test_embed_is_row_major(tokenizer, reference_tokens):
    idx = reference_tokens[-1]
    pn = tokenizer.patch_nums[-1]
    grid = tokenizer.embed(idx)
    assert grid.shape == (idx.shape[0], tokenizer.config.z_channels, pn, pn)
    row, col = divmod(pn * pn - 2, pn)
    torch.testing.assert_close(grid[:, :, row, col], tokenizer.quantize.embedding.weight[idx[:, pn * pn - 2]])


@pytest.mark.parametrize("share", [2, 3, 4, 5, 6])
def test_phi_choice_matches_numpy_ticks(share):
    """φ_k is the shared conv whose tick (numpy.linspace, as VAR builds it) is nearest k/(K−1);
    scales halfway between two ticks are decided by float rounding, so this compares exactly."""
    phis = PartiallySharedPhi(channels=1, ratio=0.5, share=share)
    margin = 1 / 3 / share if share == 4 else 1 / 2 / share
    ticks = np.linspace(margin, 1 - margin, share)
    for K in range(2, 17):
        for k in range(K):
            expected = int(np.argmin(np.abs(ticks - k / (K - 1))))
            assert phis.at(k / (K - 1)) is phis.qresi_ls[expected], (share, K, k)


def test_wrong_image_size_is_a_clear_error(tokenizer, io):
    image = io["image"]
    with pytest.raises(InputError, match=str(tokenizer.config.image_size)):
        tokenizer.encode(image[..., :-16, :-16])


# ---- training -------------------------------------------------------------------------------------
def test_training_forward(tokenizer, io):
    model = MultiScaleVQVAE(tokenizer.config)
    model.load_state_dict(tokenizer.state_dict())
    image = io["image"]
    K, V, B = len(model.patch_nums), model.config.vocab_size, image.shape[0]

    model.eval()
    with torch.no_grad():
        reconstruction, vq_loss, usage = model(image)
        tokens = model.encode(image)
        f = model.features(image)
        # the straight-through value is f̂ exactly as encode/tokens_to_f_hat build it
        torch.testing.assert_close(reconstruction, model.decoder(model.post_quant_conv(model.tokens_to_f_hat(tokens))), atol=ATOL, rtol=0)
        per_scale = [F.mse_loss(model.tokens_to_f_hat(tokens[: k + 1]), f) for k in range(K)]
        torch.testing.assert_close(vq_loss, (1 + model.config.beta) * torch.stack(per_scale).mean(), atol=1e-6, rtol=1e-5)
    assert usage.shape == (K,) and ((usage >= 0) & (usage <= 100)).all()
    assert not model.quantize.ema_vocab_hit_SV.any()  # eval mode records nothing

    model.train()
    reconstruction, vq_loss, usage = model(image)
    hits = model.quantize.ema_vocab_hit_SV
    assert hits.sum(dim=1).tolist() == [B * p * p for p in model.patch_nums]  # first batch is copied in
    for k, idx in enumerate(tokens):
        assert torch.equal(hits[k], idx.flatten().bincount(minlength=V).float())
    (reconstruction.square().mean() + vq_loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("encoder.conv_in.weight", "encoder.mid.attn_1.qkv.weight", "quant_conv.weight",
                 "decoder.conv_out.weight", "post_quant_conv.weight", "quantize.embedding.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("quantize.quant_resi"))
