"""`hmar generate` and `hmar bench` end to end, on a model folder assembled from the conformance
fixtures (labels and schedule read from the fixture folder)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hmar.pipeline import Pipeline
from hmar.schedule import format_schedule, one_step_per_scale
from hmar_cli.app import app

from tests.conftest import load_fixture

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(conformance_models):
    return conformance_models["hmar"]


@pytest.fixture(scope="module")
def reference(conformance_dir, conformance_config) -> dict:
    """The first HMAR reference case: its image and arguments."""
    io = load_fixture(conformance_dir, conformance_config, "hmar_io")
    cfg, top_k, top_p, mask = io["generate0_args"].tolist()
    return {"image": io["generate0_image"], "cfg": cfg, "top_k": int(top_k), "top_p": top_p, "mask": bool(mask)}


@pytest.fixture(scope="module")
def reference_args(conformance_dir, conformance_config, reference):
    patch_nums = conformance_config["tokenizer"]["patch_nums"]
    schedule = json.loads((conformance_dir / conformance_config["mask_schedule"]).read_text()) if reference["mask"] else one_step_per_scale(patch_nums)
    classes = [arg for label in conformance_config["labels"] for arg in ("--class", str(label))]
    return classes + ["--seed", str(conformance_config["seed"]), "--cfg", repr(reference["cfg"]), "--top-k", str(reference["top_k"]),
                      "--top-p", repr(reference["top_p"]), "--schedule", format_schedule(schedule), "--device", "cpu"]


@pytest.fixture(scope="module")
def label(conformance_config) -> str:
    """A class the fixture models have."""
    return str(conformance_config["labels"][0])


def hmar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from hmar_cli.app import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("compiled", [[], pytest.param(["--compile"], marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_generate_reproduces_the_reference_within_one_level(tmp_path, model_dir, reference, reference_args, conformance_config, compiled):
    out = tmp_path / "sample.png"
    result = runner.invoke(app, ["generate", "--model", str(model_dir), *reference_args, *compiled, "--out", str(out), "--grid", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == len(conformance_config["labels"])
    for i, record in enumerate(summary["images"]):
        with Image.open(record["path"]) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.int16)
            assert image.text["hmar:seed"] == str(conformance_config["seed"]) and image.text["hmar:top_k"] == str(reference["top_k"])
            assert image.text["hmar:class"] == str(conformance_config["labels"][i])
        expected = reference["image"][i].permute(1, 2, 0).mul(255).numpy()
        assert np.abs(pixels - expected).max() <= 1.0
    assert (tmp_path / "sample-grid.png").is_file()


def test_same_seed_same_pixels_and_no_silent_overwrite(tmp_path, model_dir, label):
    args = ["generate", "--model", str(model_dir), "--class", label, "--seed", "5", "--top-k", "8", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a.png")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b.png")]).exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    before = (tmp_path / "a.png").read_bytes()
    again = hmar(*args, "--seed", "6", "--out", str(tmp_path / "a.png"))
    assert again.returncode == 2 and again.stderr.strip().endswith("exists; pass --overwrite to replace it")
    assert (tmp_path / "a.png").read_bytes() == before
    assert hmar(*args, "--seed", "6", "--out", str(tmp_path / "a.png"), "--overwrite").returncode == 0
    assert (tmp_path / "a.png").read_bytes() != before


def test_without_a_seed_a_fresh_one_is_recorded_and_repeats_the_image(tmp_path, model_dir, label):
    args = ["generate", "--model", str(model_dir), "--class", label, "--device", "cpu"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a.png")]).exit_code == 0
    with Image.open(tmp_path / "a.png") as first:
        seed = first.text["hmar:seed"]
    assert seed.isdigit()
    assert runner.invoke(app, [*args, "--seed", seed, "--out", str(tmp_path / "b.png")]).exit_code == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_the_metadata_alone_regenerates_any_image_of_a_run(tmp_path, model_dir, conformance_config):
    """Every image of a run depends on the classes drawn with it (one random stream): its PNG lists
    them, so the text chunks alone repeat it. Also: {i} in --out, a class by name, and a typed --json
    summary."""
    a, b = conformance_config["labels"][0], conformance_config["labels"][-1]
    steps = len(conformance_config["tokenizer"]["patch_nums"]) + 2  # one per scale and two more
    first = runner.invoke(app, ["generate", "--model", str(model_dir), "--class", str(a), "--class", f"class {b}", "--num", "2",
                                "--seed", "3", "--top-k", "8", "--steps", str(steps), "--device", "cpu", "--out", str(tmp_path / "run{i}.png"), "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert [r["path"] for r in summary["images"]] == [str(tmp_path / f"run{i}.png") for i in range(4)]
    assert summary["classes"] == [a, a, b, b] and summary["seed"] == 3 and summary["top_k"] == 8 and summary["cfg"] == 1.5
    with Image.open(tmp_path / "run3.png") as image:
        text = dict(image.text)
    assert text["hmar:classes"] == f"{a},{a},{b},{b}" and text["hmar:index"] == "3" and text["hmar:device"] == "cpu"
    again = ["generate", "--model", text["hmar:model"], *[a for c in text["hmar:classes"].split(",") for a in ("--class", c)],
             "--seed", text["hmar:seed"], "--cfg", text["hmar:cfg"], "--top-k", text["hmar:top_k"], "--top-p", text["hmar:top_p"],
             "--schedule", text["hmar:schedule"], "--batch-size", text["hmar:batch_size"], "--device", text["hmar:device"]]
    assert runner.invoke(app, [*again, "--out", str(tmp_path / "again{i}.png")]).exit_code == 0
    assert np.array_equal(_pixels(tmp_path / "again3.png"), _pixels(tmp_path / "run3.png"))
    alone = runner.invoke(app, [*again[:3], "--class", str(b), *again[11:], "--out", str(tmp_path / "alone.png")])  # without the others
    assert alone.exit_code == 0, alone.output
    assert not np.array_equal(_pixels(tmp_path / "alone.png"), _pixels(tmp_path / "run3.png"))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_failed_write_is_one_line_and_leaves_no_file(tmp_path, model_dir, label, monkeypatch):
    def disk_full(self, stream, *args, **kwargs):
        stream.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, ["generate", "--model", str(model_dir), "--class", label, "--device", "cpu", "--out", str(out / "x.png")])
    assert result.exit_code == 1 and result.stderr.strip() == f"error: cannot write {out / 'x.png'}: No space left on device"
    assert list(out.iterdir()) == []


BAD_INPUTS = ("class out of range", "unknown class name", "scale count", "scale sum", "too many steps", "steps and schedule", "top-p")


def _bad_input(case: str, config: dict) -> tuple[list[str], int, str]:
    """Arguments, exit code and message of a bad request, sized from the fixture's config."""
    patch_nums, num_classes, label = config["tokenizer"]["patch_nums"], config["hmar"]["num_classes"], str(config["labels"][0])
    K, P, per_scale = len(patch_nums), patch_nums[-1], one_step_per_scale(patch_nums)
    other_count = per_scale[:-1] if K > 1 else per_scale * 2
    cases = {
        "class out of range": (["--class", str(num_classes)], 2, f"class {num_classes} is out of range"),
        "unknown class name": (["--class", "nonexistent thing"], 2, "unknown class name"),
        "scale count": (["--class", label, "--schedule", format_schedule(other_count)], 2, f"schedule has {len(other_count)} scales"),
        "scale sum": (["--class", label, "--schedule", format_schedule(per_scale[:-1] + [[P * P - 1]])], 2,
                      f"schedule entry {K} of {K} sums to {P * P - 1}, but that scale ({P}x{P}) has {P * P} tokens"),
        "too many steps": (["--class", label, "--steps", str(sum(p * p for p in patch_nums) + 1)], 2, "steps must be between"),
        "steps and schedule": (["--class", label, "--steps", str(K), "--schedule", format_schedule(per_scale)], 2, "either --steps or --schedule"),
        "top-p": (["--class", label, "--top-p", "2"], 2, "top-p"),
    }
    return cases[case]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_no_output(tmp_path, model_dir, conformance_config, case):
    extra, code, message = _bad_input(case, conformance_config)
    out = tmp_path / "x.png"
    result = hmar("generate", "--model", str(model_dir), "--device", "cpu", "--out", str(out), *extra)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_model_and_output_problems(tmp_path, model_dir, conformance_models, label):
    missing = hmar("generate", "--model", str(tmp_path / "nowhere"), "--class", label, "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "no model folder" in missing.stderr
    foreign = shutil.copytree(model_dir, tmp_path / "foreign")  # VAR weights where the HMAR ones belong
    var_model = conformance_models["var"]
    var_weights = json.loads((var_model / "config.json").read_text())["files"]["var"]
    shutil.copy(var_model / var_weights, foreign / json.loads((foreign / "config.json").read_text())["files"]["hmar"])
    wrong = hmar("generate", "--model", str(foreign), "--class", label, "--device", "cpu", "--out", str(tmp_path / "x.png"))
    assert wrong.returncode == 1 and "hmar weights" in wrong.stderr and "does not fit the model" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    folder = hmar("generate", "--model", str(model_dir), "--class", label, "--device", "cpu", "--out", str(tmp_path))
    assert folder.returncode == 2 and "output must be a .png, .jpg, .jpeg or .webp file" in folder.stderr
    (tmp_path / "file").write_bytes(b"")
    unwritable = hmar("generate", "--model", str(model_dir), "--class", label, "--device", "cpu", "--out", str(tmp_path / "file" / "dir" / "x.png"))
    assert unwritable.returncode == 2 and "is a file" in unwritable.stderr
    debug = hmar("--debug", "generate", "--model", str(tmp_path / "nowhere"), "--class", label)
    assert "Traceback" in debug.stderr


def test_cuda_requested_without_cuda(tmp_path, model_dir, label):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = hmar("generate", "--model", str(model_dir), "--class", label, "--device", "cuda", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1 and "CUDA was requested" in result.stderr


def test_bench_commands_run_on_the_cpu():
    for task in ("train", "sample"):
        result = hmar("bench", task, "--depth", "2", "--width", "64", "--batch-size", "1", "--iters", "1", "--warmup", "0", "--device", "cpu", "--json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)["rows"]
        assert {r["family"] for r in rows} == {"hmar", "var"}
