"""Fine-tuning only a tokenizer's decoder (`hmar train tokenizer --init FOLDER --train decoder`): the
codes of every image stay bit for bit, so a transformer trained on them stays valid."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hmar.config import TokenizerConfig
from hmar.errors import ConfigError
from hmar.train import TokenizerTrainConfig, run_tokenizer
from hmar.train.checkpoint import CHECKPOINT
from hmar.train.data import ImageFolder, load_training_image
from hmar.train.model_folders import TOKENIZER_WEIGHTS, load_tokenizer
from hmar_cli.app import app
from tests.train_helpers import IMAGE_SIZE, make_data, make_tokenizer_folder, quiet, tiny_tokenizer_config

DECODER_SIDE = ("decoder.", "post_quant_conv.")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    return {"root": root, "data": make_data(root / "data"), "init": make_tokenizer_folder(root / "init")}


def _codes(tokenizer, data) -> torch.Tensor:
    folder = ImageFolder.scan(data)
    images = torch.stack([load_training_image(f, IMAGE_SIZE, False) for f in folder.files])
    return torch.cat(tokenizer.encode(images), dim=1)


def test_only_the_decoder_side_changes_and_the_codes_stay(workspace):
    regrouped = dataclasses.replace(tiny_tokenizer_config(), decoder_norm_groups=8)
    config = TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / "run", model=regrouped, init=workspace["init"],
                                  train_part="decoder", steps=2, lr=1e-2, dead_code_every=1, dead_code_threshold=1e9, **quiet())
    result = run_tokenizer(config)
    before, after = load_file(workspace["init"] / TOKENIZER_WEIGHTS), load_file(result.exported / TOKENIZER_WEIGHTS)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(DECODER_SIDE) for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(DECODER_SIDE))  # codes, usage statistics too
    assert torch.load(config.out / CHECKPOINT, weights_only=True)["extra"]["restarted_codes"] == 0  # restarts would move codes
    tokenizer = load_tokenizer(result.exported)
    assert tokenizer.config == regrouped and tokenizer.decoder.norm_out.num_groups == 8
    assert torch.equal(_codes(tokenizer, workspace["data"]), _codes(load_tokenizer(workspace["init"]), workspace["data"]))


def test_decoder_only_needs_a_tokenizer_to_start_from_with_the_same_sizes(workspace):
    with pytest.raises(ValueError, match="--init"):
        TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / "x", model=tiny_tokenizer_config(), train_part="decoder")
    with pytest.raises(ValueError, match="trained part must be one of"):
        TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / "x", init=workspace["init"], train_part="encoder")
    wider = dataclasses.replace(tiny_tokenizer_config(), vocab_size=128)
    config = TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / "y", model=wider, init=workspace["init"],
                                  train_part="decoder", steps=1, **quiet())
    with pytest.raises(ConfigError, match="differs from the one of --init .* in vocab_size"):
        run_tokenizer(config)


def test_decoder_norm_groups_must_divide_the_decoder_widths():
    with pytest.raises(ConfigError, match="decoder_norm_groups 12"):
        TokenizerConfig(decoder_norm_groups=12)
    assert TokenizerConfig().decoder_norm_groups == 32  # the published tokenizer's


def test_cli_decoder_run_takes_the_init_folders_config(workspace):
    out = workspace["root"] / "cli"
    def args(folder, part):
        return ["train", "tokenizer", "--data", str(workspace["data"]), "--out", str(folder), "--init", str(workspace["init"]),
                "--train", part, "--steps", "1", "--batch-size", "4", "--workers", "0", "--warmup-steps", "1", "--device", "cpu"]

    result = CliRunner().invoke(app, args(out, "decoder"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text()) == json.loads((workspace["init"] / "tokenizer.json").read_text())
    bad = CliRunner().invoke(app, args(workspace["root"] / "bad", "everything"))
    assert bad.exit_code == 2 and "trained part must be one of" in bad.output and "Traceback" not in bad.output
    assert not (workspace["root"] / "bad").exists()


@pytest.mark.parametrize("fresh", [False, True])
def test_the_decoder_starts_from_init_or_fresh(workspace, fresh):
    from hmar.tokenizer import MultiScaleVQVAE

    config = TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / f"start{fresh}", model=tiny_tokenizer_config(),
                                  init=workspace["init"], train_part="decoder", fresh_decoder=fresh, steps=1, lr=1e-12, seed=3, **quiet())
    # one step at a negligible learning rate (a zero one is refused): the decoder side moves by ~1e-12
    after = load_file(run_tokenizer(config).exported / TOKENIZER_WEIGHTS)
    torch.manual_seed(3)
    expected = MultiScaleVQVAE(tiny_tokenizer_config()).state_dict() if fresh else load_file(workspace["init"] / TOKENIZER_WEIGHTS)
    before = load_file(workspace["init"] / TOKENIZER_WEIGHTS)
    for k, v in after.items():
        if k.startswith(DECODER_SIDE):
            assert torch.allclose(v, expected[k], rtol=0, atol=1e-9), k
        else:  # frozen: bit for bit
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="--train decoder"):
        TokenizerTrainConfig(data=workspace["data"], out=workspace["root"] / "x", init=workspace["init"], fresh_decoder=True)
