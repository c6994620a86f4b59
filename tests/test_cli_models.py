"""`hmar models ls|download|info|rm`, `hmar env` and the app's error handling: Typer's CliRunner on
the local hub stand-in of test_hub, and real `hmar` processes (empty caches, HF_HUB_OFFLINE)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from hmar import hub
from hmar.config import PRESET_NAMES
from hmar_cli.app import app
from tests.test_hub import bundled_tiny, fake_bytes, fake_hub, hub_cache  # noqa: F401  (fixtures)

runner = CliRunner()


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---- models ls / info -------------------------------------------------------------------------
def test_ls_lists_every_model_as_a_table_and_as_json(fake_hub, bundled_tiny):
    table = runner.invoke(app, ["models", "ls"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    for name in (*PRESET_NAMES, "hmar-tiny"):
        assert name in table.stdout
    assert "bundled" in table.stdout and "2.3 GB" in table.stdout

    hub.download("var-d16")
    rows = json.loads(runner.invoke(app, ["models", "ls", "--json"]).stdout)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {*PRESET_NAMES, "hmar-tiny"}
    assert by_name["var-d16"]["cached"] and not by_name["var-d20"]["cached"] and by_name["hmar-tiny"]["cached"]
    assert {"size", "description", "family", "source", "files"} <= set(by_name["hmar-d16"])
    partly = runner.invoke(app, ["models", "ls"], env={"COLUMNS": "200"}).stdout
    assert any(line.startswith(" var-d20") and "partly" in line for line in partly.splitlines())


def test_info_on_names_and_folders(fake_hub, bundled_tiny):
    before = json.loads(runner.invoke(app, ["models", "info", "hmar-d24", "--json"]).stdout)
    assert before["folder"] is None and before["config"]["depth"] == 24 and before["config"]["width"] == 1536
    assert [f["local_path"] for f in before["files"]] == [None, None]
    hub.download("hmar-d24")
    after = json.loads(runner.invoke(app, ["models", "info", "hmar-d24", "--json"]).stdout)
    assert Path(after["folder"], "config.json").is_file() and all(Path(f["local_path"]).is_file() for f in after["files"])

    folder = json.loads(runner.invoke(app, ["models", "info", str(bundled_tiny), "--json"]).stdout)
    assert folder["source"] == "folder" and folder["cached"] and folder["config"]["classes"] == 10
    assert folder["class_names"] is None and before["class_names"] is None  # numbers / ImageNet's names
    text = runner.invoke(app, ["models", "info", "hmar-tiny"], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "bundled" in text.stdout and "tokenizer" in text.stdout
    assert "the 1000 ImageNet-1k classes" in runner.invoke(app, ["models", "info", "hmar-d24"], env={"COLUMNS": "200"}).stdout


def test_info_lists_a_models_own_class_names(hub_cache, bundled_tiny):
    config = json.loads((bundled_tiny / "config.json").read_text())
    config["class_names"] = [f"shape {i}" for i in range(config["hmar"]["num_classes"])]
    (bundled_tiny / "config.json").write_text(json.dumps(config))
    details = json.loads(runner.invoke(app, ["models", "info", "hmar-tiny", "--json"]).stdout)
    assert details["class_names"] == config["class_names"]
    text = runner.invoke(app, ["models", "info", "hmar-tiny"], env={"COLUMNS": "300"}).stdout
    assert "0 shape 0, 1 shape 1," in text and "9 shape 9" in text


def test_unknown_model_gets_suggestions_and_exit_2(hub_cache):
    result = runner.invoke(app, ["models", "info", "var-d61"])
    assert result.exit_code == 2
    assert "unknown model 'var-d61'; did you mean var-d16" in one_error_line(result)


# ---- models download / rm ---------------------------------------------------------------------
def test_download_shows_the_size_first_then_fetches(fake_hub):
    result = runner.invoke(app, ["models", "download", "hmar-d16", "var-d16"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.stderr.index("Downloading hmar-d16: about 2.3 GB") < result.stderr.index("hmar-d16 is ready")
    assert "Downloading var-d16: about 1.2 GB" in result.stderr  # the tokenizer is cached by then
    assert [c["filename"] for c in fake_hub.calls] == ["vae_ch160v4096z32.pth", "hmar-d16.pth", "var_d16.pth"]
    again = runner.invoke(app, ["models", "download", "var-d16", "--json"])
    records = json.loads(again.stdout)
    assert again.exit_code == 0 and records[0]["name"] == "var-d16" and len(fake_hub.calls) == 3
    assert Path(records[0]["path"], "config.json").is_file()


def test_download_checks_every_name_before_fetching_anything(fake_hub):
    result = runner.invoke(app, ["models", "download", "hmar-d16", "hmar-d61"])
    assert result.exit_code == 2 and fake_hub.calls == []
    assert "did you mean hmar-d16" in one_error_line(result)


def test_download_offline_is_one_line_with_the_ways_out(fake_hub, bundled_tiny, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["models", "download", "hmar-d20"])
    assert result.exit_code == 1 and fake_hub.calls == []
    line = one_error_line(result)
    assert "hmar-d20.pth (nvidia/HMAR)" in line and "connected machine" in line and "bundled model hmar-tiny" in line


def test_rm_asks_first_and_keeps_shared_files(fake_hub):
    hub.download("hmar-d16")
    hub.download("var-d16")
    declined = runner.invoke(app, ["models", "rm", "hmar-d16"], input="n\n")
    assert declined.exit_code == 1 and hub.model_info("hmar-d16").cached
    result = runner.invoke(app, ["models", "rm", "hmar-d16", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    removal = json.loads(result.stdout)
    assert removal["removed"] == ["nvidia/HMAR/hmar-d16.pth"]
    assert removal["kept"] == [{"file": "FoundationVision/var/vae_ch160v4096z32.pth", "needed_by": "var-d16"}]
    assert removal["freed"] == len(fake_bytes("nvidia/HMAR", "hmar-d16.pth"))
    assert not hub.model_info("hmar-d16").cached and hub.model_info("var-d16").cached
    nothing = runner.invoke(app, ["models", "rm", "hmar-d16", "--yes"])
    assert nothing.exit_code == 0 and "nothing to remove" in nothing.stderr


# ---- env, generate with a registry name, error handling -----------------------------------------
def test_env_reports_versions_devices_and_caches(hub_cache, bundled_tiny):
    info = json.loads(runner.invoke(app, ["env", "--json"]).stdout)
    assert info["packages"]["torch"] and info["device"]["default"] in ("cpu", "cuda")
    assert info["cache"]["huggingface_hub"] == str(hub_cache) and info["bundled_models"] == ["hmar-tiny"]
    text = runner.invoke(app, ["env"], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and str(hub_cache) in text.stdout and "hmar-tiny" in text.stdout


def test_generate_accepts_a_registry_name(bundled_tiny, tmp_path):
    out = tmp_path / "tiny.png"
    result = runner.invoke(app, ["generate", "--model", "hmar-tiny", "--class", "3", "--seed", "0", "--device", "cpu",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "hmar-tiny" and out.is_file()


@pytest.mark.parametrize("model, args, message", [
    ("hmar-d16", ["--class", "golden retrievr"], "unknown class name 'golden retrievr'; did you mean 'golden retriever'"),
    ("hmar-d16", ["--class", "1000"], "class 1000 is out of range: this model has classes 0..999"),
    ("hmar-d16", ["--class", "207", "--schedule", "1;4"], "schedule has 2 scales but the model has 10"),
    ("hmar-d16", ["--class", "207", "--steps", "9"], "steps must be between 10 (one per scale)"),
    ("var-d16", ["--class", "207", "--steps", "14"], "VAR models sample exactly one step per scale: steps must be 10, got 14"),
])
def test_classes_and_steps_are_checked_before_a_download(fake_hub, tmp_path, model, args, message):
    result = runner.invoke(app, ["generate", "--model", model, *args, "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and message in one_error_line(result)
    assert fake_hub.calls == [] and not (tmp_path / "x.png").exists()


def test_usage_errors_are_one_line_with_exit_2_and_debug_shows_tracebacks(hub_cache):
    bad_flag = runner.invoke(app, ["models", "ls", "--bogus"])
    assert bad_flag.exit_code == 2 and "No such option: --bogus" in one_error_line(bad_flag)
    missing_argument = runner.invoke(app, ["models", "download"])
    assert missing_argument.exit_code == 2 and "hmar models download --help" in one_error_line(missing_argument)
    debug = runner.invoke(app, ["--debug", "models", "info", "var-d61"])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and debug.stderr.strip().endswith("a model folder)")
    plain = runner.invoke(app, ["models", "info", "var-d61"])  # --debug does not stick to the next run
    assert "Traceback" not in plain.stderr
    group_help = runner.invoke(app, ["models"])
    assert "download" in group_help.stdout and group_help.stderr == ""


# ---- real processes -----------------------------------------------------------------------------
def hmar_process(*args: str, tmp_path: Path, offline: bool = True) -> subprocess.CompletedProcess:
    """The installed `hmar` script (else the same entry point through this Python), empty caches."""
    script = shutil.which("hmar") or str(Path(sys.executable).with_name("hmar"))
    command = [script] if os.path.exists(script) else [sys.executable, "-c", "from hmar_cli.app import main; main()"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HMAR_CACHE": str(tmp_path / "hmar"), "COLUMNS": "200",
           "HF_HUB_OFFLINE": "1" if offline else "0"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)


def test_process_ls_and_env_use_the_environments_caches(tmp_path):
    listed = hmar_process("models", "ls", "--json", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {row["name"] for row in json.loads(listed.stdout)} >= set(PRESET_NAMES)
    env = hmar_process("env", "--json", tmp_path=tmp_path)
    info = json.loads(env.stdout)
    assert info["offline"] and info["cache"]["huggingface_hub"] == str(tmp_path / "hf" / "hub")
    assert info["cache"]["hmar"] == str(tmp_path / "hmar")


@pytest.mark.parametrize("command", ["download", "generate"])
def test_process_offline_without_the_model_is_one_line_exit_1(tmp_path, command):
    args = {"download": ("models", "download", "hmar-d16"),
            "generate": ("generate", "--model", "hmar-d16", "--class", "1", "--out", str(tmp_path / "x.png"))}[command]
    result = hmar_process(*args, tmp_path=tmp_path)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "hmar-d16 is not in the local cache and downloads are off" in line
    assert "hmar-d16.pth (nvidia/HMAR)" in line and str(tmp_path / "hf" / "hub") in line


def test_process_copied_cache_works_offline(tmp_path):
    """A Hugging Face cache copied from a connected machine: info finds the files, no download."""
    from tests.test_hub import put_in_hub_cache

    cache = tmp_path / "hf" / "hub"
    put_in_hub_cache(cache, "FoundationVision/var", "vae_ch160v4096z32.pth", b"tokenizer")
    put_in_hub_cache(cache, "FoundationVision/var", "var_d16.pth", b"weights")
    result = hmar_process("models", "download", "var-d16", "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = Path(json.loads(result.stdout)[0]["path"])
    assert folder == tmp_path / "hmar" / "models" / "var-d16"
    assert json.loads((folder / "config.json").read_text())["files"]["var"].startswith(str(cache))


def test_process_unknown_model_and_bad_flag(tmp_path):
    unknown = hmar_process("models", "info", "hmar-d61", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "did you mean hmar-d16" in one_error_line(unknown)
    bad = hmar_process("models", "ls", "--bogus", tmp_path=tmp_path)
    assert bad.returncode == 2 and "No such option" in one_error_line(bad)
