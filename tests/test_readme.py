"""README.md runs as written: its CPU-sized commands are run verbatim, in its order, in a folder
that sees the repository's files under their relative paths; every other command (a GPU, a
download, a data set of its own) must at least name files that exist and models hmar knows."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hmar import hub
from hmar_cli.app import app
from hmar_cli.downloads import DEFAULT_MODELS, default_model
from tests.test_hub import bundled_tiny, fake_bytes, fake_hub, hub_cache  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: what every command may read from the repository (outputs go to the run folder, never into these)
LINKED = ("recipes", "hmar", "train", "kernels", "hmar_cli", "pyproject.toml")
#: commands that are CPU-sized but take minutes: 40 images, or the 2048-px photos of edit_detail.py
SLOW = ("--num 4", "edit_detail.py", "photo.png")


def readme_commands() -> list[str]:
    """Each command of README's bash blocks: continuation lines joined, comments and prompts cut,
    `a && b` split (each part is its own command)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split(" && "))
    return commands


def python_c_commands() -> list[str]:
    """The `python -c "…"` one-liners README gives in its prose (inline code spans)."""
    return re.findall(r"`(python -c \"[^`]*\")`", README.read_text())


def cpu_sized(command: str) -> bool:
    words = command.split()
    if words[:3] in (["hmar", "models", "ls"], ["hmar", "env"]):
        return True
    if "render(" in command:
        return True
    if words[0] == "python" and words[1].startswith("recipes/hmar-tiny/"):
        return True
    return "hmar-tiny" in words and words[0] == "hmar" and "train" not in words


COMMANDS = readme_commands()
RUN = [c for c in python_c_commands() + COMMANDS if cpu_sized(c)]


def test_readme_has_the_commands_this_test_runs():
    """A README edit that drops or mangles them must not leave this test running nothing."""
    assert any(c.startswith("hmar generate --model hmar-tiny") for c in RUN)
    assert any(c.startswith("hmar inpaint star.png") for c in RUN) and any(c.startswith("hmar outpaint star.png") for c in RUN)
    assert any("render(" in c for c in RUN) and "hmar models ls" in RUN and "hmar env" in RUN


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A folder where README's relative paths resolve: the repository's sources linked, docs copied
    (a command writing a README image writes the copy)."""
    folder = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "docs", folder / "docs")
    return folder


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # `hmar` and `python` of this environment
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf"), "HMAR_CACHE": str(cwd / "hmar-cache"), "COLUMNS": "200"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_cpu_sized_commands_run_as_printed(run_folder):
    """In README order (the star is rendered before it is inpainted), from the folder's root."""
    for command in RUN:
        if any(mark in command for mark in SLOW):
            continue
        result = run(command, run_folder)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert "Traceback" not in result.stderr, command
    assert (run_folder / "sample.png").is_file() and (run_folder / "star-outpainted.png").is_file()


@pytest.mark.slow
def test_every_cpu_sized_command_runs_as_printed(tmp_path_factory):
    """All of them, in order, the minutes-long ones included (they regenerate README images: the copies)."""
    folder = tmp_path_factory.mktemp("readme-slow")
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "docs", folder / "docs")
    (folder / "docs/images/context-window.png").unlink()  # the image edit_detail.py --compare writes anew
    for command in RUN:
        result = run(command, folder)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


def _outputs_before(index: int) -> set[str]:
    """What README's earlier commands write (`--out`), as path prefixes."""
    return {value for c in COMMANDS[:index] for flag, value in zip(shlex.split(c), shlex.split(c)[1:]) if flag == "--out"}


@pytest.mark.parametrize("index", [i for i, c in enumerate(COMMANDS) if not cpu_sized(c)], ids=lambda i: COMMANDS[i][:60])
def test_other_commands_name_files_that_exist(index):
    """Scripts, configs and repository paths exist; a --model or --tokenizer that is no path is a
    model hmar knows, one that is a path is made by an earlier README command or a stand-in
    (path/to/model, vae_folder) the prose explains."""
    words = shlex.split(COMMANDS[index].replace("$(which hmar)", "hmar"))
    made = _outputs_before(index)
    for previous, word in zip([""] + words, words):
        if word.startswith(("recipes/", "docs/")) or (previous in ("bash", "python", "--config") and not word.startswith("-")) or \
                (previous == "--model" and word.endswith(".json")):
            if previous != "--out" and not word.startswith("docs/images/"):
                assert (ROOT / word).exists(), f"{COMMANDS[index]}: {word} does not exist in the repository"
        if previous in ("--model", "--tokenizer", "--init") and "/" not in word and "." not in word and word != "M":
            assert word in hub.registry() or word == "vae_folder", f"{COMMANDS[index]}: {word} is no model hmar knows"
        if previous in ("--tokenizer", "--init") and word.startswith("runs/"):
            assert any(word.startswith(out) for out in made), f"{COMMANDS[index]}: no earlier command writes {word}"


# ---- the default model ------------------------------------------------------------------------
def test_generate_without_model_or_cache_names_the_ways_out(hub_cache, bundled_tiny, tmp_path):
    result = CliRunner().invoke(app, ["generate", "--class", "207", "--steps", "14", "--out", str(tmp_path / "x.png")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "hmar models download hmar-d16" in lines[0] and "hmar-tiny" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_the_default_is_the_deepest_cached_hmar_model(fake_hub, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["models", "download", "hmar-d16", "var-d30"]).exit_code == 0
    assert default_model() == "hmar-d16"  # a VAR model is never the default
    # the card's example, with a class the model lacks: the default is checked like a named model
    result = runner.invoke(app, ["generate", "--class", "1000", "--steps", "14", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "model: hmar-d16" in result.stderr and "classes 0..999" in result.stderr
    assert runner.invoke(app, ["models", "download", "hmar-d20"]).exit_code == 0
    assert default_model() == "hmar-d20" and DEFAULT_MODELS[0] == "hmar-d30"


# ---- long work says what it is doing ----------------------------------------------------------
def test_a_gpu_benchmark_on_the_cpu_says_so_first():
    args = ["bench", "train", "--depth", "1", "--width", "64", "--batch-size", "1", "--warmup", "0", "--iters", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("note: a GPU benchmark, here on the CPU") and "1 training steps of depth 1" in result.stderr
    quiet = CliRunner().invoke(app, [*args, "--json"])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def test_the_token_cache_encoding_reports_progress_on_stderr(tmp_path, capsys):
    from hmar.train.data import ImageFolder
    from hmar.train.model_folders import load_tokenizer
    from hmar.train.token_cache import cached_tokens
    from tests.train_helpers import make_data, make_tokenizer_folder

    folder = ImageFolder.scan(make_data(tmp_path / "data"))
    tokenizer = load_tokenizer(make_tokenizer_folder(tmp_path / "tokenizer"))
    cached_tokens(tmp_path / "tokens.pt", folder, tokenizer, torch.device("cpu"), 0, True, lambda: None)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and lines[0].startswith(f"note: encoding the {len(folder)} images") and len(lines) >= 2
    assert lines[-1] == f"note: token cache: encoded {2 * len(folder)}/{2 * len(folder)} images and mirror images"
    cached_tokens(tmp_path / "tokens.pt", folder, tokenizer, torch.device("cpu"), 0, True, lambda: None)
    assert capsys.readouterr().err == ""  # a cache that exists is read without a word


# ---- training on the CPU ----------------------------------------------------------------------
def test_stage1_on_the_cpu_refuses_a_published_size_unless_asked(tmp_path):
    """The default preset (hmar-d16) would take minutes a step and write gigabytes; the tokenizer
    is named as a registry model, as README's training section does."""
    args = ["train", "stage1", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--tokenizer", "hmar-tiny", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "too many to train on the CPU" in lines[0]
    assert "--allow-large" in lines[0] and "recipes/hmar-tiny/hmar.json" in lines[0] and not (tmp_path / "run").exists()
    tiny = CliRunner().invoke(app, [*args, "--model", str(ROOT / "recipes/hmar-tiny/hmar.json")])
    large = CliRunner().invoke(app, [*args, "--allow-large"])
    for passed in (tiny, large):  # past the size check, stopped by the empty data folder
        assert passed.exit_code != 0 and "too many" not in passed.stderr and "Traceback" not in passed.output


def test_training_progress_in_a_log_is_a_line_per_tenth_on_stderr(capsys):
    from hmar.train.metrics import ProgressBar

    with ProgressBar(True, "stage1", 20, 4) as bar:  # resumed at step 4
        for step in range(5, 21):
            bar.update(step, 2.5, 10.0)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 8  # tenths 3 … 10
    assert lines[0].startswith("stage1: step 6/20, loss 2.5000, 10.0 img/s, 0:00:00 elapsed, ETA ")
    assert lines[-1].startswith("stage1: step 20/20,") and lines[-1].endswith("ETA 0:00:00")
