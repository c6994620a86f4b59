"""`hmar train data|tokenizer|stage1|stage2` end to end at toy sizes, then `hmar generate` on the result."""
from __future__ import annotations

import dataclasses
import json

from typer.testing import CliRunner

from hmar_cli.app import app
from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

runner = CliRunner()
FAST = ["--steps", "2", "--batch-size", "4", "--workers", "0", "--warmup-steps", "1", "--device", "cpu"]


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_train_all_stages_then_generate(tmp_path):
    data = tmp_path / "data"
    _ok(["train", "data", "--out", str(data), "--images-per-class", "2", "--size", "64"])
    assert len(list(data.iterdir())) == 10
    (tmp_path / "tok.json").write_text(json.dumps(dataclasses.asdict(tiny_tokenizer_config())))
    hmar_sizes = {k: v for k, v in dataclasses.asdict(tiny_transformer_config()).items()}
    (tmp_path / "hmar.json").write_text(json.dumps(hmar_sizes))
    _ok(["train", "tokenizer", "--data", str(data), "--out", str(tmp_path / "tok"), "--config", str(tmp_path / "tok.json"), *FAST])
    _ok(["train", "stage1", "--data", str(data), "--out", str(tmp_path / "s1"), "--tokenizer", str(tmp_path / "tok" / "tokenizer"),
         "--model", str(tmp_path / "hmar.json"), *FAST])
    _ok(["train", "stage2", "--data", str(data), "--out", str(tmp_path / "s2"), "--init", str(tmp_path / "s1" / "model"), *FAST])
    _ok(["generate", "--model", str(tmp_path / "s2" / "model"), "--class", "0", "--seed", "0", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert (tmp_path / "x.png").is_file()


def test_bad_training_options_are_usage_errors(tmp_path):
    result = runner.invoke(app, ["train", "stage1", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path),
                                 "--loss-weighting", "cubic", *FAST])
    assert result.exit_code == 2 and "loss_weighting must be one of" in result.output
    result = runner.invoke(app, ["train", "stage2", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--init", str(tmp_path),
                                 "--sharding", "zero3", *FAST])
    assert result.exit_code == 2 and "sharding must be one of ('ddp', 'fsdp'), got 'zero3'" in result.output
    assert "Traceback" not in result.output


def test_cuda_graph_on_the_cpu_is_a_one_line_error(tmp_path):
    from tests.train_helpers import make_data, make_tokenizer_folder

    data, tokenizer = make_data(tmp_path / "data"), make_tokenizer_folder(tmp_path / "tok")
    (tmp_path / "hmar.json").write_text(json.dumps(dataclasses.asdict(tiny_transformer_config())))
    result = runner.invoke(app, ["train", "stage1", "--data", str(data), "--out", str(tmp_path / "s1"), "--tokenizer", str(tokenizer),
                                 "--model", str(tmp_path / "hmar.json"), "--cuda-graph", *FAST])
    assert result.exit_code != 0 and "--cuda-graph needs one training process on a CUDA device" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s1").exists()
