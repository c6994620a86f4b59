"""The acceptance test: our engine against the frozen reference outputs in the conformance folder.

Every size, label, seed and file name comes from the folder's config.json, so another folder of the
same form (HMAR_CONFORMANCE_DIR) must pass unchanged. Tolerance: 1e-4 absolute in float32 on the CPU,
token indices equal.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from hmar.checkpoints import build_models, load_weights
from hmar.config import ModelConfig
from hmar.sampler import make_generator, sample
from hmar.schedule import validate_schedule, one_step_per_scale
from tests.conftest import conformance_path, load_fixture

ATOL = 1e-4


def _models(conformance_dir, conformance_config, family):
    config = ModelConfig.from_dict(conformance_config, family)
    tokenizer, transformer = build_models(config)
    load_weights(tokenizer, load_fixture(conformance_dir, conformance_config, "tokenizer"), "tokenizer fixture")
    load_weights(transformer, load_fixture(conformance_dir, conformance_config, family), f"{family} fixture")
    return config, tokenizer.eval(), transformer.eval()


@pytest.fixture(scope="module")
def hmar_models(conformance_dir, conformance_config):
    return _models(conformance_dir, conformance_config, "hmar")


@pytest.fixture(scope="module")
def var_models(conformance_dir, conformance_config):
    return _models(conformance_dir, conformance_config, "var")


@pytest.fixture(scope="module")
def tokenizer_io(conformance_dir, conformance_config):
    return load_fixture(conformance_dir, conformance_config, "tokenizer_io")


def _reference_tokens(tokenizer_io, num_scales):
    return [tokenizer_io[f"idx_scale{k}"] for k in range(num_scales)]


@pytest.mark.parametrize("family, key", [("hmar", "next_scale_logits"), ("var", "teacher_forced_logits")])
def test_teacher_forced_logits(request, family, key, conformance_dir, conformance_config, tokenizer_io):
    """The training forward over all scales (HMAR block-diagonal, VAR block-causal), no label dropout."""
    config, tokenizer, transformer = request.getfixturevalue(f"{family}_models")
    io = load_fixture(conformance_dir, conformance_config, f"{family}_io")
    with torch.no_grad():
        logits = transformer.forward_next_scale(io["labels"], tokenizer_io["next_scale_input"])
    torch.testing.assert_close(logits, io[key], atol=ATOL, rtol=0)


def test_hmar_next_scale_logits_scale_by_scale_equal_the_sequence(hmar_models, tokenizer_io, conformance_config):
    """Block-diagonal attention: running each scale alone gives the teacher-forced logits (how sampling runs)."""
    config, tokenizer, transformer = hmar_models
    labels = torch.tensor(conformance_config["labels"])
    tokens = _reference_tokens(tokenizer_io, len(config.patch_nums))
    with torch.no_grad():
        whole = transformer.forward_next_scale(labels, tokenizer.teacher_forcing_input(tokens))
        cond_BD, cond = transformer.condition(labels)
        P = config.patch_nums[-1]
        f_hat = torch.zeros(len(labels), config.tokenizer.z_channels, P, P)
        for k in range(len(config.patch_nums)):
            if k == 0:
                x = transformer.start_tokens(cond_BD)
            else:
                x = transformer.scale_tokens(k, tokenizer.downsample(f_hat, k))
            alone = transformer.next_scale(x, cond, cond_BD)
            s, e = transformer.starts[k], transformer.starts[k + 1]
            torch.testing.assert_close(alone, whole[:, s:e], atol=ATOL, rtol=0)
            f_hat = tokenizer.add_scale(f_hat, tokens[k], k)


def test_hmar_mask_branch_logits_every_scale(conformance_dir, conformance_config, hmar_models, tokenizer_io):
    config, tokenizer, transformer = hmar_models
    io = load_fixture(conformance_dir, conformance_config, "hmar_io")
    labels = io["labels"]
    tokens = _reference_tokens(tokenizer_io, len(config.patch_nums))
    teacher = tokenizer.teacher_forcing_input(tokens)
    checked = 0
    with torch.no_grad():
        cond_BD, cond = transformer.condition(labels)
        for k, pn in enumerate(config.patch_nums):
            if f"mask_scale{k}_logits" not in io:
                continue
            s, e = transformer.starts[k] - transformer.block_sizes[0], transformer.starts[k + 1] - transformer.block_sizes[0]
            context = teacher[:, s:e].transpose(1, 2).reshape(len(labels), -1, pn, pn)
            masked = torch.zeros(len(labels), pn * pn, dtype=torch.bool)
            masked[:, io[f"mask_scale{k}_positions"]] = True
            x = transformer.masked_scale_tokens(k, context, tokenizer.scale_input(tokens[k], k), masked)
            logits = transformer.masked(x, cond, cond_BD)
            torch.testing.assert_close(logits, io[f"mask_scale{k}_logits"], atol=ATOL, rtol=0)
            checked += 1
    assert checked == len(config.patch_nums) - 1  # every scale after the first


def test_hmar_mask_branch_training_forward_matches_per_scale(conformance_config, hmar_models, tokenizer_io):
    """forward_masked over all scales at once equals the per-scale mask branch."""
    config, tokenizer, transformer = hmar_models
    labels = torch.tensor(conformance_config["labels"])
    tokens = _reference_tokens(tokenizer_io, len(config.patch_nums))
    teacher = tokenizer.teacher_forcing_input(tokens)
    own = torch.cat([tokenizer.scale_input(tokens[k], k).flatten(2).transpose(1, 2) for k in range(1, len(tokens))], dim=1)
    masked = torch.rand(own.shape[:2]) < 0.5
    with torch.no_grad():
        whole = transformer.forward_masked(labels, teacher, own, masked)
        cond_BD, cond = transformer.condition(labels)
        first = transformer.block_sizes[0]
        for k in range(1, len(config.patch_nums)):
            pn = config.patch_nums[k]
            s, e = transformer.starts[k] - first, transformer.starts[k + 1] - first
            context = teacher[:, s:e].transpose(1, 2).reshape(len(labels), -1, pn, pn)
            x = transformer.masked_scale_tokens(k, context, tokenizer.scale_input(tokens[k], k), masked[:, s:e])
            torch.testing.assert_close(transformer.masked(x, cond, cond_BD), whole[:, s + first:e + first], atol=ATOL, rtol=0)


def _generate_cases(role: str) -> list:
    """The generate{k} cases of the fixture folder's `role` file, read at collection so that each case
    is reported as its own test. A folder or file that cannot be read gives one case that fails with
    the fixtures' own error."""
    folder = conformance_path()
    try:
        io = load_fixture(folder, json.loads((folder / "config.json").read_text()), role)
    except Exception:  # reported by the test, through the conformance_dir fixture or the load
        return [pytest.param(None, id="unreadable")]
    cases = sorted(int(m.group(1)) for key in io if (m := re.fullmatch(r"generate(\d+)_args", key)))
    return [pytest.param(k, id=f"generate{k}") for k in cases] or [pytest.param(None, id="no-cases")]


@pytest.fixture(scope="module")
def sampler_io(conformance_dir, conformance_config) -> dict:
    """The HMAR and VAR reference files, loaded once for all their cases."""
    return {family: load_fixture(conformance_dir, conformance_config, f"{family}_io") for family in ("hmar", "var")}


@pytest.mark.parametrize("case", _generate_cases("hmar_io"))
def test_hmar_sampler_reproduces_reference(case, conformance_dir, conformance_config, hmar_models, sampler_io):
    hmar_io = sampler_io["hmar"]
    assert case is not None, "no generate{k}_args cases in the HMAR reference file"
    config, tokenizer, transformer = hmar_models
    schedule = validate_schedule(json.loads((conformance_dir / conformance_config["mask_schedule"]).read_text()), config.patch_nums)
    labels = torch.tensor(conformance_config["labels"])
    cfg, top_k, top_p, mask = hmar_io[f"generate{case}_args"].tolist()
    result = sample(
        tokenizer, transformer, labels, schedule, cfg=cfg, top_k=int(top_k), top_p=top_p,
        generator=make_generator(conformance_config["seed"], "cpu"), mask_refinement=bool(mask),
    )
    torch.testing.assert_close(result.images, hmar_io[f"generate{case}_image"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", _generate_cases("var_io"))
def test_var_sampler_reproduces_reference(case, conformance_config, var_models, sampler_io):
    var_io = sampler_io["var"]
    assert case is not None, "no generate{k}_args cases in the VAR reference file"
    config, tokenizer, transformer = var_models
    labels = torch.tensor(conformance_config["labels"])
    cfg, top_k, top_p = var_io[f"generate{case}_args"].tolist()
    result = sample(
        tokenizer, transformer, labels, one_step_per_scale(config.patch_nums), cfg=cfg, top_k=int(top_k), top_p=top_p,
        generator=make_generator(conformance_config["seed"], "cpu"),
    )
    torch.testing.assert_close(result.images, var_io[f"generate{case}_image"], atol=ATOL, rtol=0)
