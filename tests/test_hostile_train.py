"""Hostile training inputs: run folders damaged the ways a crash, a full disk or a user leaves them,
token caches of the wrong content, failed starts, and option values the library refuses.

Every refusal: exit code, one line naming the file or option, no traceback, and the run folder
(checkpoint, records, metrics) exactly as it was. Runs are `hmar train stage1` of a tiny model on
the CPU."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hmar.train import Stage1Config, Stage2Config, TokenizerTrainConfig
from hmar.train.checkpoint import CHECKPOINT, RUN_OPTIONS
from hmar.train.metrics import METRICS, read_metrics
from hmar_cli.app import app
from tests.test_hostile_cli import refused, snapshot
from tests.train_helpers import make_data, make_tokenizer_folder, tiny_transformer_config

runner = CliRunner()
STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Data, a tokenizer, a model config and one finished run (a checkpoint at its last step, a
    token cache) that every test copies before damaging it."""
    root = tmp_path_factory.mktemp("hostile_train")
    model = root / "hmar.json"
    model.write_text(json.dumps(dataclasses.asdict(tiny_transformer_config())))
    setup = {"root": root, "data": make_data(root / "data"), "tokenizer": make_tokenizer_folder(root / "tokenizer"), "model": model,
             "cache": root / "tokens.pt"}
    result = runner.invoke(app, stage1_args(setup, root / "run"))
    assert result.exit_code == 0, result.output
    setup["run"] = root / "run"
    return setup


def stage1_args(setup: dict, out: Path, *extra: str, steps: int = STEPS, cache: Path | None = None) -> list[str]:
    return ["train", "stage1", "--data", str(setup["data"]), "--out", str(out), "--tokenizer", str(setup["tokenizer"]),
            "--model", str(setup["model"]), "--token-cache", str(cache or setup["cache"]), "--steps", str(steps), "--batch-size", "4",
            "--workers", "0", "--warmup-steps", "1", "--checkpoint-every", "1", "--device", "cpu", *extra]


@pytest.fixture
def run(setup, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(setup["run"], tmp_path / "run"))


def resume(setup: dict, out: Path, *extra: str):
    return runner.invoke(app, stage1_args(setup, out, "--resume", *extra, steps=STEPS + 1))


# ---- damaged run folders ----------------------------------------------------------------------
def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {
    "run.json cut in half": (lambda out: _cut(out / RUN_OPTIONS), "run.json"),
    "run.json empty": (lambda out: (out / RUN_OPTIONS).write_text(""), "run.json"),
    "run.json a list": (lambda out: (out / RUN_OPTIONS).write_text("[1, 2]"), "holds no run options"),
    "run.json binary": (lambda out: (out / RUN_OPTIONS).write_bytes(b"\xff\xfe\x00\x81"), "run.json"),
    "run.json missing": (lambda out: (out / RUN_OPTIONS).unlink(), "run.json is missing"),
    "metrics line damaged before the last": (
        lambda out: (out / METRICS).write_text("{not json\n" + (out / METRICS).read_text()), "metrics.jsonl line 1"),
    "checkpoint cut in half": (lambda out: _cut(out / CHECKPOINT), "cannot read checkpoint"),
    "checkpoint a text file": (lambda out: (out / CHECKPOINT).write_text("hello"), "cannot read checkpoint"),
    "checkpoint missing": (lambda out: (out / CHECKPOINT).unlink(), "nothing to resume"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_of_a_damaged_run_is_one_line_and_changes_nothing(setup, run, damage):
    harm, needle = DAMAGE[damage]
    harm(run)
    before = snapshot(run.parent)
    refused(resume(setup, run), 1, needle)
    assert snapshot(run.parent) == before


def test_a_partial_last_metrics_line_is_dropped_with_a_note_and_the_run_resumes(setup, run):
    with open(run / METRICS, "a") as f:
        f.write('{"step": 3, "lo')  # what a crash while appending leaves
    assert [r["step"] for r in read_metrics(run)] == [STEPS]  # readers skip it too
    result = resume(setup, run)
    assert result.exit_code == 0, result.output
    assert "note: dropped the incomplete last line of" in result.stderr and "Traceback" not in result.output
    assert [r["step"] for r in read_metrics(run)] == [STEPS, STEPS + 1]
    assert all(line.startswith("{") and line.endswith("}") for line in (run / METRICS).read_text().splitlines())


def test_resume_with_other_options_or_a_new_start_in_the_folder_are_refused(setup, run):
    before = snapshot(run.parent)
    refused(resume(setup, run, "--seed", "5"), 1, "--resume with other options", "seed: 0 -> 5")
    refused(runner.invoke(app, stage1_args(setup, run)), 1, "exists and is not empty")
    assert snapshot(run.parent) == before


def test_a_run_folder_that_is_a_file(setup, tmp_path):
    (tmp_path / "run").write_text("mine")
    before = snapshot(tmp_path)
    refused(runner.invoke(app, stage1_args(setup, tmp_path / "run")), 1, "is a file")
    assert snapshot(tmp_path) == before


# ---- failed starts ----------------------------------------------------------------------------
def test_a_failed_start_leaves_no_run_folder(setup, tmp_path):
    bad = tmp_path / "cache.pt"
    bad.write_text("not a cache")
    before = snapshot(tmp_path)
    refused(runner.invoke(app, stage1_args(setup, tmp_path / "run", cache=bad)), 1, "cannot read token cache", str(bad))
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_failed_start_into_an_existing_empty_folder_keeps_the_folder(setup, tmp_path):
    (tmp_path / "run").mkdir()
    bad = tmp_path / "cache.pt"
    torch.save(torch.zeros(3), bad)
    refused(runner.invoke(app, stage1_args(setup, tmp_path / "run", cache=bad)), 1, "is not a token cache")
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())


def test_the_leftovers_of_a_killed_start_are_taken_over_by_a_new_start_but_not_resumed(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_OPTIONS).write_text('{"steps": 1')  # a start killed before its first checkpoint
    (out / METRICS).write_text('{"step": 1, "loss": 9.0}\n')
    before = snapshot(tmp_path)
    refused(resume(setup, out), 1, "no checkpoint", "start without --resume")
    assert snapshot(tmp_path) == before
    result = runner.invoke(app, stage1_args(setup, out))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(out)] == [STEPS] and (out / CHECKPOINT).is_file()


def test_a_folder_of_the_users_is_never_taken_over(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS).write_text("my notes\n")  # no run.json: not hmar's leftovers
    before = snapshot(tmp_path)
    refused(runner.invoke(app, stage1_args(setup, out)), 1, "exists and is not empty")
    assert snapshot(tmp_path) == before


def test_a_bad_data_folder_fails_before_a_run_folder_is_made(setup, tmp_path):
    (tmp_path / "data").mkdir()
    args = stage1_args(setup, tmp_path / "run")
    args[args.index("--data") + 1] = str(tmp_path / "data")
    refused(runner.invoke(app, args), 2, "has no class sub-folders")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ---- token caches of the wrong content --------------------------------------------------------
def _text(path: Path, setup) -> None:
    path.write_text("tokens: many\n")


def _tensor(path: Path, setup) -> None:
    torch.save(torch.arange(10), path)


def _state_dict(path: Path, setup) -> None:
    torch.save({"weight": torch.ones(2, 2)}, path)


def _truncated(path: Path, setup) -> None:
    data = setup["cache"].read_bytes()
    path.write_bytes(data[:len(data) // 3])


def _empty(path: Path, setup) -> None:
    path.write_bytes(b"")


def _wrong_shapes(path: Path, setup) -> None:
    data = torch.load(setup["cache"], weights_only=True)
    data["tokens"] = data["tokens"][:, :, :5]
    torch.save(data, path)


def _float_tokens(path: Path, setup) -> None:
    data = torch.load(setup["cache"], weights_only=True)
    data["tokens"] = data["tokens"].float()
    torch.save(data, path)


def _folder(path: Path, setup) -> None:
    path.mkdir()


CACHES = {
    "a text file": (_text, "cannot read token cache"),
    "a tensor": (_tensor, "holds a Tensor"),
    "another torch file": (_state_dict, "no tokens"),
    "a truncated cache": (_truncated, "cannot read token cache"),
    "an empty file": (_empty, "cannot read token cache"),
    "tokens of another length": (_wrong_shapes, "do not fit its scales"),
    "float tokens": (_float_tokens, "do not fit its scales"),
    "a folder": (_folder, "cannot read token cache"),
}


@pytest.mark.parametrize("kind", list(CACHES))
def test_a_token_cache_of_the_wrong_content_is_one_line_naming_it(setup, tmp_path, kind):
    make, needle = CACHES[kind]
    cache = tmp_path / "cache.pt"
    make(cache, setup)
    before = snapshot(tmp_path)
    refused(runner.invoke(app, stage1_args(setup, tmp_path / "run", cache=cache)), 1, needle, str(cache))
    assert snapshot(tmp_path) == before


# ---- option values the library refuses --------------------------------------------------------
BAD_CONFIGS = [
    (Stage1Config, {"lr": math.nan}, "lr must be"),
    (Stage1Config, {"lr": math.inf}, "lr must be"),
    (Stage1Config, {"lr": -1e-4}, "lr must be"),
    (Stage1Config, {"ema_decay": 1.0}, "ema_decay must be"),
    (Stage1Config, {"betas": (0.9, 1.0)}, "betas must be"),
    (Stage1Config, {"grad_clip": math.nan}, "grad_clip must be"),
    (Stage1Config, {"weight_decay": -0.1}, "weight_decay must be"),
    (Stage1Config, {"min_lr_ratio": 2.0}, "min_lr_ratio must be"),
    (Stage1Config, {"cond_drop_rate": 1.5}, "cond_drop_rate must be"),
    (Stage1Config, {"lognormal_sigma": 0.0}, "lognormal_sigma must be"),
    (Stage1Config, {"seed": -1}, "seed must be"),
    (Stage1Config, {"seed": 2**64}, "seed must be"),
    (Stage1Config, {"num_workers": 10**6}, "num_workers must be"),
    (Stage1Config, {"steps": True}, "steps must be"),
    (Stage1Config, {"batch_size": 2.5}, "batch_size must be"),
    (Stage1Config, {"warmup_steps": -1}, "warmup_steps must be"),
    (TokenizerTrainConfig, {"dead_code_threshold": math.nan}, "dead_code_threshold must be"),
    (Stage2Config, {"sample_every": -3}, "sample_every must be"),
]


@pytest.mark.parametrize("config_class, change, needle", BAD_CONFIGS, ids=[f"{c[0].__name__} {c[1]}" for c in BAD_CONFIGS])
def test_the_library_refuses_bad_option_values(tmp_path, config_class, change, needle):
    required = {Stage1Config: {"tokenizer": tmp_path}, Stage2Config: {"init": tmp_path}, TokenizerTrainConfig: {}}[config_class]
    with pytest.raises(ValueError, match=needle):
        config_class(data=tmp_path, out=tmp_path / "run", **required, **change)
    assert list(tmp_path.iterdir()) == []


# ---- a full disk while writing ----------------------------------------------------------------
def _disk_full(target_name: str):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{target_name}."):  # the atomic writer's temporary file
            Path(f).write_bytes(b"PK half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    return save


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one(setup, run, monkeypatch):
    before = (run / CHECKPOINT).read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full(CHECKPOINT))
    refused_after_progress(resume(setup, run), 1, f"error: cannot write checkpoint {run / CHECKPOINT}: No space left on device")
    assert (run / CHECKPOINT).read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_full_disk_while_writing_the_token_cache_leaves_no_file(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache.pt"
    monkeypatch.setattr(torch, "save", _disk_full(cache.name))
    refused_after_progress(runner.invoke(app, stage1_args(setup, tmp_path / "run", cache=cache)), 1,
                           f"error: cannot write token cache {cache}")
    assert list(tmp_path.iterdir()) == []


def refused_after_progress(result, code: int, start: str) -> None:
    """A failure once work has begun: its progress lines on stderr, then the one error line."""
    *progress, last = result.stderr.strip().splitlines()
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert all(line.startswith(("note: ", "stage1: step ")) for line in progress) and last.startswith(start), result.stderr
