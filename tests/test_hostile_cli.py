"""Hostile command lines: numbers out of range, NaN and infinities, absurd counts, and signals while
an output is being written or while the program starts. Every case: the exit code, one line naming
the problem, no traceback, no output or temporary file left, and no existing file changed.

Option errors must come before anything loads: most cases name a model folder that does not exist,
so a message about the model would mean the option was checked too late."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hmar.atomic import atomic_write
from hmar.errors import InputError
from hmar.pipeline import Pipeline
from hmar_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder holding a file of the user's (which must survive every case) and an input image."""
    Image.new("RGB", (48, 40), (90, 120, 200)).save(tmp_path / "photo.png")
    (tmp_path / "keep.png").write_bytes(b"the user's own file")
    return tmp_path


def refused(result, code: int, *needles: str) -> str:
    """The result's one-line message, after checking the exit code and its form."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "a bug in hmar" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def sampling_args(command: str, workdir: Path) -> list[str]:
    missing_model = str(workdir / "no-such-model")
    out = ["--out", str(workdir / "out.png")]
    if command == "generate":
        return ["generate", "--model", missing_model, "--class", "1", *out]
    if command == "outpaint":
        return ["outpaint", str(workdir / "photo.png"), "--model", missing_model, "--right", "16", *out]
    return [command, str(workdir / "photo.png"), "--model", missing_model, "--box", "0,0,16,16", *out]


# (command, extra options, exit code, what the message must contain)
OPTION_CASES = [
    ("generate", ["--seed", "-1"], 2, "'--seed'"),
    ("generate", ["--seed", str(2**70)], 2, "'--seed'"),
    ("generate", ["--seed", str(2**64)], 2, "'--seed'"),
    ("generate", ["--seed", "2**70"], 2, "'--seed'"),
    ("generate", ["--cfg", "nan"], 2, "'--cfg'"),
    ("generate", ["--cfg", "inf"], 2, "'--cfg'"),
    ("generate", ["--cfg", "-inf"], 2, "'--cfg'"),
    ("generate", ["--cfg", "-1"], 2, "'--cfg'"),
    ("generate", ["--cfg", "1e300"], 2, "'--cfg'"),
    ("generate", ["--top-p", "nan"], 2, "'--top-p'"),
    ("generate", ["--top-p", "inf"], 2, "'--top-p'"),
    ("generate", ["--top-p", "1.5"], 2, "'--top-p'"),
    ("generate", ["--top-p", "-0.1"], 2, "'--top-p'"),
    ("generate", ["--top-k", "-1"], 2, "'--top-k'"),
    ("generate", ["--num", "0"], 2, "'--num'"),
    ("generate", ["--num", "-3"], 2, "'--num'"),
    ("generate", ["--num", "100000"], 2, "'--num'"),
    ("generate", ["--num", "600", "--class", "2"], 2, "1200 images"),
    ("generate", ["--batch-size", "0"], 2, "'--batch-size'"),
    ("generate", ["--batch-size", "-2"], 2, "'--batch-size'"),
    ("generate", ["--batch-size", str(10**12)], 2, "'--batch-size'"),
    ("generate", ["--steps", "0"], 2, "'--steps'"),
    ("generate", ["--steps", "-5"], 2, "'--steps'"),
    ("generate", ["--device", "tpu"], 2, "unknown device 'tpu'"),
    ("inpaint", ["--cfg", "nan"], 2, "'--cfg'"),
    ("inpaint", ["--seed", "-1"], 2, "'--seed'"),
    ("outpaint", ["--top-p", "nan"], 2, "'--top-p'"),
    ("outpaint", ["--cfg", "inf"], 2, "'--cfg'"),
    ("outpaint", ["--expand", "inf"], 2, "'--expand'"),
    ("outpaint", ["--expand", "nan"], 2, "'--expand'"),
    ("edit", ["--top-k", "-4"], 2, "'--top-k'"),
    ("edit", ["--seed", str(2**65)], 2, "'--seed'"),
]


@pytest.mark.parametrize("command, extra, code, needle", OPTION_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in OPTION_CASES])
def test_bad_sampling_options_are_refused_before_anything_loads(workdir, command, extra, code, needle):
    before = snapshot(workdir)
    result = runner.invoke(app, [*sampling_args(command, workdir), *extra])
    message = refused(result, code, needle)
    assert "model" not in message.replace("--model", "")  # the option was checked first
    assert snapshot(workdir) == before


def _train_args(stage: str, workdir: Path) -> list[str]:
    common = ["--data", str(workdir / "no-data"), "--out", str(workdir / "run")]
    if stage == "stage1":
        return ["train", "stage1", *common, "--tokenizer", str(workdir / "no-tokenizer")]
    if stage == "stage2":
        return ["train", "stage2", *common, "--init", str(workdir / "no-model")]
    return ["train", "tokenizer", *common]


TRAIN_CASES = [
    ("stage1", ["--lr", "nan"], "'--lr'"),
    ("stage1", ["--lr", "inf"], "'--lr'"),
    ("stage1", ["--lr", "-1e-4"], "'--lr'"),
    ("stage1", ["--lr", "0"], "lr must be a number in (0, inf)"),
    ("stage2", ["--ema", "nan"], "'--ema'"),
    ("stage2", ["--ema", "1"], "ema_decay must be a number in [0, 1)"),
    ("stage2", ["--ema", "1.5"], "'--ema'"),
    ("stage1", ["--steps", "0"], "'--steps'"),
    ("tokenizer", ["--batch-size", "0"], "'--batch-size'"),
    ("stage1", ["--seed", "-1"], "'--seed'"),
    ("stage2", ["--seed", str(2**64)], "'--seed'"),
    ("stage1", ["--workers", "100000"], "'--workers'"),
    ("tokenizer", ["--warmup-steps", "-1"], "'--warmup-steps'"),
    ("stage1", ["--checkpoint-every", "0"], "'--checkpoint-every'"),
    ("stage2", ["--sample-every", "-1"], "'--sample-every'"),
]


@pytest.mark.parametrize("stage, extra, needle", TRAIN_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in TRAIN_CASES])
def test_bad_training_options_are_refused_before_anything_loads(workdir, stage, extra, needle):
    before = snapshot(workdir)
    message = refused(runner.invoke(app, [*_train_args(stage, workdir), *extra]), 2, needle)
    assert "no-data" not in message and "no-tokenizer" not in message and "no-model" not in message
    assert snapshot(workdir) == before


DATA_CASES = [
    (["--images-per-class", str(10**9)], "'--images-per-class'"),
    (["--images-per-class", "0"], "'--images-per-class'"),
    (["--size", "100000"], "'--size'"),
    (["--size", "8"], "'--size'"),
    (["--workers", "0"], "'--workers'"),
    (["--workers", "100000"], "'--workers'"),
    (["--seed", "-1"], "'--seed'"),
]


@pytest.mark.parametrize("extra, needle", DATA_CASES, ids=[" ".join(c[0]) for c in DATA_CASES])
def test_bad_data_set_options(workdir, extra, needle):
    before = snapshot(workdir)
    refused(runner.invoke(app, ["train", "data", "--out", str(workdir / "data"), *extra]), 2, needle)
    assert snapshot(workdir) == before


def test_the_cli_leaves_the_batch_size_to_the_library_by_default(workdir, conformance_models, monkeypatch):
    """Without --batch-size the CLI passes none, so the library's bounded default applies (never N)."""
    seen = {}

    def record(self, labels, **options):
        seen.update(options, count=len(labels))
        raise InputError("stopped before sampling")

    monkeypatch.setattr(Pipeline, "generate", record)
    result = runner.invoke(app, ["generate", "--model", str(conformance_models["hmar"]), "--class", "1", "--num", "7", "--device", "cpu",
                                 "--out", str(workdir / "x.png")])
    refused(result, 2, "stopped before sampling")
    assert seen["count"] == 7 and seen["batch_size"] is None


# ---- signals ----------------------------------------------------------------------------------
def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


# The PNG writer is replaced by one that writes a few bytes and then sends the process the signal:
# the handler runs before the next bytecode (or interrupts the sleep), so the signal always lands
# in the middle of the write, with no race against a timer.
SIGNAL_DURING_WRITE = """
    import os, signal, sys, time
    from PIL import Image

    STOP = getattr(signal, sys.argv[1])

    def interrupted_save(self, stream, *args, **kwargs):
        stream.write(b"\\x89PNG partial")
        stream.flush()
        os.kill(os.getpid(), STOP)
        time.sleep(120)
        raise AssertionError("the signal did not stop the write")

    Image.Image.save = interrupted_save
    sys.argv = ["hmar", *sys.argv[2:]]
    from hmar_cli.app import main
    main()
"""


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_writing_leaves_no_temporary_file_and_no_change(tmp_path, conformance_models, name, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").write_bytes(b"an earlier image")  # replaced only by a complete file
    before = snapshot(out)
    result = _run_script(SIGNAL_DURING_WRITE, name, "generate", "--model", str(conformance_models["hmar"]), "--class", "1",
                         "--device", "cpu", "--overwrite", "--out", str(out / "x.png"))
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == f"error: stopped by {name}" and "Traceback" not in result.stderr
    assert snapshot(out) == before  # no hidden temporary file, the old image as it was


def test_a_signal_while_writing_a_new_file_leaves_nothing(tmp_path, conformance_models):
    out = tmp_path / "out"
    out.mkdir()
    result = _run_script(SIGNAL_DURING_WRITE, "SIGTERM", "generate", "--model", str(conformance_models["hmar"]), "--class", "1",
                         "--device", "cpu", "--out", str(out / "x.png"))
    assert result.returncode == 143 and result.stderr.strip() == "error: stopped by SIGTERM"
    assert list(out.iterdir()) == []


# The import hook sends the signal while hmar_cli.app imports its commands (torch, typer…).
SIGNAL_DURING_START_UP = """
    import builtins, os, signal, sys, time

    STOP = getattr(signal, sys.argv[1])
    real_import = builtins.__import__

    def import_and_signal(name, globals=None, *args, **kwargs):
        if name == "typer" and (globals or {}).get("__name__") == "hmar_cli.app":
            os.kill(os.getpid(), STOP)
            time.sleep(120)
        return real_import(name, globals, *args, **kwargs)

    builtins.__import__ = import_and_signal
    sys.argv = ["hmar", "models", "ls"]
    from hmar_cli.app import main
    main()
"""


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_start_up_is_one_line(name, code):
    result = _run_script(SIGNAL_DURING_START_UP, name)
    assert result.returncode == code
    assert result.stderr.strip() == f"error: stopped by {name}" and "Traceback" not in result.stderr


def test_the_signal_handlers_are_put_back_after_a_command(workdir):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    runner.invoke(app, ["generate", "--model", str(workdir / "none"), "--class", "1", "--cfg", "nan"])
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---- the one atomic writer --------------------------------------------------------------------
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, OSError, ValueError])
def test_any_exception_while_writing_removes_the_temporary_file(tmp_path, stop):
    (tmp_path / "x.bin").write_bytes(b"old")
    before = snapshot(tmp_path)
    with pytest.raises(stop):
        with atomic_write(tmp_path / "x.bin", overwrite=True, durable=True) as temporary:
            temporary.write_bytes(b"half")
            raise stop()
    assert snapshot(tmp_path) == before


def test_an_existing_file_is_replaced_only_when_asked(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "x.bin") as temporary:
            temporary.write_bytes(b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_file_that_appears_while_writing_is_kept(tmp_path):
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "x.bin") as temporary:
            temporary.write_bytes(b"mine")
            (tmp_path / "x.bin").write_bytes(b"someone else's")
    assert (tmp_path / "x.bin").read_bytes() == b"someone else's" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_concurrent_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    with atomic_write(tmp_path / "x.bin", overwrite=True) as first, atomic_write(tmp_path / "x.bin", overwrite=True) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert (tmp_path / "x.bin").read_bytes() == b"first"  # the outer block ends last
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_written_file_gets_the_ordinary_mode_and_a_missing_folder_is_an_os_error(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x.bin", durable=True) as temporary:
            assert temporary.stat().st_mode & 0o777 == 0o600  # private while incomplete
            temporary.write_bytes(b"done")
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "no" / "x.bin"):
            pass
