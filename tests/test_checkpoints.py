"""Strict loading of the published key specs, and clear errors for weight files that do not fit."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hmar.checkpoints import describe_state_dict, load_models, load_weights, read_state_dict
from hmar.config import PATCH_NUMS, ModelConfig, transformer_preset
from hmar.errors import CheckpointError
from hmar.transformer import build_transformer
from tests.conftest import fixture_file, load_fixture


def _spec_file(conformance_dir, family):
    return json.loads((conformance_dir / f"{family}_checkpoint_keys.json").read_text())


def _scales_and_vocabulary(spec: dict) -> tuple[tuple[int, ...], int, int]:
    """patch_nums, vocabulary and Cvae of a transformer's key spec: the resolution preset whose token
    count is the length of pos_1LC, the head's rows and the word embedding's columns."""
    tokens = spec["pos_1LC"][1]
    matching = [p for p in PATCH_NUMS.values() if sum(n * n for n in p) == tokens]
    assert matching, f"no patch_nums preset has {tokens} tokens"
    head = spec["ns_head.weight"] if "ns_head.weight" in spec else spec["head.weight"]
    return matching[0], head[0], spec["word_embed.weight"][1]


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_presets_build_exactly_the_published_key_specs(conformance_dir, family):
    specs = _spec_file(conformance_dir, family)
    names = [n for n in specs if n.startswith(f"{family}-")]
    assert names, f"no {family} presets in the key spec file"
    for name in names:
        patch_nums, vocab_size, z_channels = _scales_and_vocabulary(specs[name])
        with torch.device("meta"):
            model = build_transformer(transformer_preset(name), patch_nums, vocab_size=vocab_size, z_channels=z_channels)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == specs[name], f"{name}: key spec differs"


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_describe_names_the_resembling_preset(conformance_dir, family):
    names = [n for n in _spec_file(conformance_dir, family) if n.startswith(f"{family}-")]
    assert names, f"no {family} presets in the key spec file"
    for name in names:
        fake = {k: torch.empty(v, device="meta") for k, v in _spec_file(conformance_dir, family)[name].items()}
        assert f"resembles preset {name})" in describe_state_dict(fake)


@pytest.fixture()
def tiny_hmar(conformance_config):
    config = ModelConfig.from_dict(conformance_config, "hmar")
    return config, build_transformer(config.transformer, config.patch_nums, config.tokenizer.vocab_size, config.tokenizer.z_channels)


def test_missing_and_unexpected_keys_are_named(conformance_dir, conformance_config, tiny_hmar):
    _, model = tiny_hmar
    state = load_fixture(conformance_dir, conformance_config, "hmar")
    del state["mask_embed.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(mask_embed.weight\); 1 unexpected keys \(extra.weight\)"):
        load_weights(model, state, "hmar weights")


def test_a_var_file_in_an_hmar_model_says_what_it_is(conformance_dir, conformance_config, tiny_hmar):
    _, model = tiny_hmar
    var = conformance_config["var"]
    with pytest.raises(CheckpointError, match=f"looks like var depth {var['depth']}, width {var['width']}, {var['num_classes']} classes"):
        load_weights(model, load_fixture(conformance_dir, conformance_config, "var"), "hmar weights")


def test_wrong_shapes_are_named(conformance_dir, conformance_config, tiny_hmar):
    _, model = tiny_hmar
    state = load_fixture(conformance_dir, conformance_config, "hmar")
    expected = list(model.state_dict()["pos_start"].shape)
    wrong = expected[:-1] + [expected[-1] // 2]
    state["pos_start"] = torch.zeros(wrong)
    with pytest.raises(CheckpointError, match=re.escape(f"shape mismatches (pos_start: file {wrong} vs model {expected})")):
        load_weights(model, state, "hmar weights")


def test_unreadable_files_give_one_line_errors(tmp_path):
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        read_state_dict(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="weight file not found"):
        read_state_dict(tmp_path / "absent.pth")
    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(1000)}, good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        read_state_dict(tmp_path / "truncated.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        read_state_dict(tmp_path / "bad.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    torch.save({"weights": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read weight file"):
        read_state_dict(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out


def test_non_tensor_state_is_refused(tmp_path):
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        read_state_dict(tmp_path / "wrapped.pth")


def test_model_folder_with_safetensors_loads(tmp_path, conformance_dir, conformance_config):
    config = ModelConfig.from_dict(conformance_config, "hmar")
    for role in ("tokenizer", "hmar"):
        save_file(load_fixture(conformance_dir, conformance_config, role), str(tmp_path / f"{role}.safetensors"))
    folder_config = ModelConfig(config.tokenizer, config.transformer, files={"tokenizer": "tokenizer.safetensors", "hmar": "hmar.safetensors"})
    folder_config.save(tmp_path / "config.json")
    tokenizer, transformer = load_models(ModelConfig.load(tmp_path / "config.json"), tmp_path)
    reference = load_fixture(conformance_dir, conformance_config, "hmar")
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in reference.items())


def test_model_folder_with_a_foreign_checkpoint_fails_clearly(tmp_path, conformance_dir, conformance_config):
    config = ModelConfig.from_dict(conformance_config, "hmar")
    shutil.copy(fixture_file(conformance_dir, conformance_config, "tokenizer"), tmp_path / "tok.pth")
    shutil.copy(fixture_file(conformance_dir, conformance_config, "var"), tmp_path / "hmar.pth")
    ModelConfig(config.tokenizer, config.transformer, files={"tokenizer": "tok.pth", "hmar": "hmar.pth"}).save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="hmar weights hmar.pth does not fit the model"):
        load_models(ModelConfig.load(tmp_path / "config.json"), tmp_path)
    (tmp_path / "hmar.pth").unlink()
    with pytest.raises(CheckpointError, match="weight file not found"):
        load_models(ModelConfig.load(tmp_path / "config.json"), tmp_path)
