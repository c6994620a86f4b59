"""Hostile model folders through `hmar generate --model <folder>`: every bad config.json field, bad
weight files, malicious pickles, cut-short files, damaged hub cache entries and sizes beyond the
memory budget. Each case must end in one `error:` line naming the problem (the file and the key)
with the right exit code, leave no output or temporary file, change nothing that existed, and (for
config and size problems) be refused before any model is built. Sizes come from the fixture
folder's config.json, so the cases hold at any fixture size."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hmar.checkpoints
from hmar import hub
from hmar.config import MEMORY_BUDGET_VARIABLE
from hmar_cli.app import app
from tests.conftest import load_fixture
from tests.test_hub import fake_hub, hub_cache, put_in_hub_cache  # noqa: F401  (fixtures)

runner = CliRunner()

MODEL_FILES = {"tokenizer": "tokenizer.safetensors", "hmar": "hmar.safetensors"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, conformance_dir, conformance_config) -> dict[str, Path]:
    """The fixture's tokenizer and HMAR weights as safetensors, written once (never changed)."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for role, name in MODEL_FILES.items():
        state = load_fixture(conformance_dir, conformance_config, role)
        save_file(state, str(folder / name))
        out[role] = folder / name
    return out


@pytest.fixture
def good_config(conformance_config) -> dict:
    return {"tokenizer": copy.deepcopy(conformance_config["tokenizer"]), "hmar": copy.deepcopy(conformance_config["hmar"]),
            "files": dict(MODEL_FILES)}


def make_folder(parent: Path, config: dict | str, weights: dict[str, Path], copy_weights: bool = False) -> Path:
    """A model folder holding `config` (a dict, or raw text) and the weights (links, or copies to change)."""
    folder = parent / "model"
    folder.mkdir()
    for role, source in weights.items():
        if copy_weights:
            shutil.copy(source, folder / MODEL_FILES[role])
        else:
            (folder / MODEL_FILES[role]).symlink_to(source)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under `folders` (hidden ones included) with a digest of its bytes."""
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() or path.is_symlink():
                data = path.read_bytes() if path.exists() else b"<dangling>"
                files[str(path)] = hashlib.sha256(data).hexdigest()
    return files


@pytest.fixture
def no_building(monkeypatch):
    """Fails the test if a model is built: size and config problems must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the problem was found")

    monkeypatch.setattr(hmar.checkpoints, "MultiScaleVQVAE", refuse)
    monkeypatch.setattr(hmar.checkpoints, "build_transformer", refuse)


def refused(tmp_path: Path, folder: Path, code: int, *fragments: str, args: tuple[str, ...] = (), model: str | None = None) -> str:
    """Run `hmar generate` on the model folder `folder` (or the registry name `model`, watching
    `folder`) next to an existing output; check the one error line, the exit code, and that nothing
    was written or changed. Returns the error line."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    existing = out / "existing.png"
    existing.write_bytes(b"not to be touched")
    before = snapshot(out, folder)
    result = runner.invoke(app, ["generate", "--model", model or str(folder), "--class", "0", "--seed", "0", "--device", "cpu",
                                 "--out", str(out / "sample.png"), *args])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "a bug in hmar" not in lines[0], result.stderr
    assert result.exit_code == code, (result.exit_code, lines[0])
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(out, folder) == before, "a file was written, left behind or changed"
    return lines[0]


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    def change(config: dict) -> None:
        config[section][key] = value

    return change


def _drop(key: str) -> Callable[[dict], None]:
    return lambda config: config.pop(key)


# (id, change to the good config, fragments the message must hold); every one exits 2 before a
# model is built
CONFIG_CASES = [
    ("depth-fraction", _set("hmar", "depth", 6.5), ["config.json", "hmar.depth must be a positive integer, got 6.5"]),
    ("depth-text", _set("hmar", "depth", "six"), ["config.json", "hmar.depth", '"six"']),
    ("depth-bool", _set("hmar", "depth", True), ["hmar.depth must be a positive integer, got true"]),
    ("depth-null", _set("hmar", "depth", None), ["hmar.depth", "got null"]),
    ("heads-zero", _set("hmar", "num_heads", 0), ["hmar.num_heads must be a positive integer, got 0"]),
    ("classes-negative", _set("hmar", "num_classes", -5), ["hmar.num_classes must be a positive integer, got -5"]),
    ("width-list", _set("hmar", "width", [64]), ["hmar.width", "[64]"]),
    ("width-indivisible", lambda c: c["hmar"].update(width=c["hmar"]["width"] + 1), ["hmar.width", "not divisible by hmar.num_heads"]),
    ("branch-deeper-than-depth", lambda c: c["hmar"].update(branch_depth=c["hmar"]["depth"] + 1), ["hmar.branch_depth"]),
    ("mlp-ratio-negative", _set("hmar", "mlp_ratio", -1), ["hmar.mlp_ratio"]),
    ("mlp-ratio-nan", _set("hmar", "mlp_ratio", float("nan")), ["hmar.mlp_ratio", "NaN"]),
    ("norm-eps-zero", _set("hmar", "norm_eps", 0), ["hmar.norm_eps"]),
    ("l2-norm-text", _set("hmar", "attn_l2_norm", "yes"), ["hmar.attn_l2_norm must be true or false"]),
    ("drop-rate-two", _set("hmar", "cond_drop_rate", 2), ["hmar.cond_drop_rate"]),
    ("misspelt-key", _set("hmar", "depht", 4), ["unknown keys in hmar: depht"]),
    ("section-not-object", lambda c: c.update(hmar=[1, 2]), ["hmar must be an object"]),
    ("vocab-zero", _set("tokenizer", "vocab_size", 0), ["tokenizer.vocab_size must be a positive integer"]),
    ("patch-nums-not-increasing", lambda c: c["tokenizer"].update(patch_nums=c["tokenizer"]["patch_nums"][::-1]),
     ["tokenizer.patch_nums", "strictly increasing"]),
    ("patch-nums-text", _set("tokenizer", "patch_nums", "12345"), ["tokenizer.patch_nums must be a non-empty list"]),
    ("image-size-off", lambda c: c["tokenizer"].update(image_size=c["tokenizer"]["image_size"] + 1), ["tokenizer.image_size", "downsampling"]),
    ("ch-not-multiple-of-32", lambda c: c["tokenizer"].update(ch=c["tokenizer"]["ch"] + 1), ["tokenizer.ch", "multiple of 32"]),
    ("ch-mult-text", _set("tokenizer", "ch_mult", "12224"), ["tokenizer.ch_mult"]),
    ("share-quant-resi-one", _set("tokenizer", "share_quant_resi", 1), ["tokenizer.share_quant_resi must be an integer of at least 2"]),
    ("quant-resi-zero", _set("tokenizer", "quant_resi", 0), ["tokenizer.quant_resi", "other than 0"]),
    ("no-tokenizer", _drop("tokenizer"), ["config.json", "no 'tokenizer' section"]),
    ("two-families", lambda c: c.update(var=dict(c["hmar"])), ["exactly one of 'hmar' / 'var'"]),
    ("unknown-top-level-key", lambda c: c.update(labels=[1, 2]), ["unknown keys labels"]),
    ("files-number", lambda c: c["files"].update(hmar=123), ["config.json", "files.hmar must be a file name, got 123"]),
    ("files-not-object", lambda c: c.update(files=["a.pth"]), ["files must map weight roles"]),
    ("files-absolute", lambda c: c["files"].update(hmar="/etc/shadow"), ["files.hmar must be a file name relative to the model folder", "/etc/shadow"]),
    ("files-escape", lambda c: c["files"].update(hmar="../hmar.safetensors"), ["files.hmar must stay inside the model folder"]),
    ("files-foreign-role", lambda c: c["files"].update(var="hmar.safetensors"), ["files.var is not a weight role"]),
    ("files-missing-role", lambda c: c["files"].pop("hmar"), ["files.hmar is missing"]),
    ("files-directory", lambda c: c["files"].update(hmar="."), ["files.hmar", "not a regular file"]),
    ("class-names-string", lambda c: c.update(class_names="abcdefghij"), ["class_names must be a list of names"]),
    ("class-names-one-short", lambda c: c.update(class_names=[f"n{i}" for i in range(c["hmar"]["num_classes"] - 1)]),
     ["class_names has", "hmar.num_classes"]),
    ("class-names-numbers", lambda c: c.update(class_names=list(range(c["hmar"]["num_classes"]))), ["class_names[0] must be a non-empty name"]),
    ("sampling-top-k-text", lambda c: c.update(sampling={"top_k": "many"}), ["sampling.top_k must be an integer of at least 0", '"many"']),
    ("sampling-steps-too-few", lambda c: c.update(sampling={"steps": len(c["tokenizer"]["patch_nums"]) - 1}),
     ["sampling.steps does not fit the model's scales"]),
    ("sampling-cfg-nan", lambda c: c.update(sampling={"cfg": float("nan")}), ["sampling.cfg must be a finite number, got NaN"]),
    ("sampling-cfg-infinite", lambda c: c.update(sampling={"cfg": float("inf")}), ["sampling.cfg", "Infinity"]),
    ("sampling-top-p-above-one", lambda c: c.update(sampling={"top_p": 1.5}), ["sampling.top_p"]),
    ("sampling-unknown-key", lambda c: c.update(sampling={"seed": 3}), ["sampling has unknown keys seed"]),
    ("sampling-steps-and-schedule", lambda c: c.update(sampling={"steps": 20, "schedule": "1"}), ["sampling gives both steps and schedule"]),
    ("sampling-schedule-too-short", lambda c: c.update(sampling={"schedule": "1"}), ["sampling.schedule does not fit the model's scales"]),
    ("sampling-not-object", lambda c: c.update(sampling=[1]), ["sampling must be an object"]),
]


@pytest.mark.parametrize("change, fragments", [pytest.param(change, fragments, id=name) for name, change, fragments in CONFIG_CASES])
def test_bad_config_field_is_one_line_naming_file_and_key(tmp_path, good_config, weights, no_building, change, fragments):
    change(good_config)
    folder = make_folder(tmp_path, good_config, weights)
    line = refused(tmp_path, folder, 2, *fragments)
    assert "--steps" not in line  # a config default is blamed on its key, never on an option


@pytest.mark.parametrize("text, fragment", [
    pytest.param("{not json", "cannot read", id="not-json"),
    pytest.param("[1, 2]", "no 'tokenizer' section", id="a-list"),
    pytest.param("", "cannot read", id="empty"),
    pytest.param("\udcff", "cannot read", id="not-utf8"),
])
def test_unreadable_config_json(tmp_path, weights, no_building, text, fragment):
    folder = make_folder(tmp_path, "{}", weights)
    (folder / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(tmp_path, folder, 2, "config.json", fragment)


def test_files_naming_a_missing_file(tmp_path, good_config, weights, no_building):
    good_config["files"]["hmar"] = "missing.safetensors"
    folder = make_folder(tmp_path, good_config, weights)
    refused(tmp_path, folder, 1, "weight file not found", "files.hmar", "config.json")


# ---- the memory budget ---------------------------------------------------------------------------
def _huge_patch_nums(config: dict) -> None:
    downsample = 2 ** (len(config["tokenizer"]["ch_mult"]) - 1)
    config["tokenizer"]["patch_nums"] = config["tokenizer"]["patch_nums"] + [100_000]
    config["tokenizer"]["image_size"] = 100_000 * downsample


@pytest.mark.parametrize("change, fragments", [
    pytest.param(_set("hmar", "depth", 1_000_000_000), ["hmar.depth 1000000000", "memory budget"], id="depth-1e9"),
    pytest.param(lambda c: c["hmar"].update(width=4_194_304), ["hmar.width 4194304", "memory budget"], id="width-4M"),
    pytest.param(_set("tokenizer", "vocab_size", 10**12), ["tokenizer.vocab_size 1000000000000", "memory budget"], id="vocab-1e12"),
    pytest.param(_set("hmar", "num_classes", 10**13), ["memory budget"], id="classes-1e13"),
    pytest.param(_huge_patch_nums, ["tokens", "memory budget"], id="ten-billion-tokens"),
    pytest.param(_set("hmar", "depth", 10**400), ["memory budget"], id="depth-beyond-float"),
])
def test_sizes_beyond_the_budget_are_refused_before_building(tmp_path, good_config, weights, no_building, change, fragments):
    change(good_config)
    folder = make_folder(tmp_path, good_config, weights)
    refused(tmp_path, folder, 2, "config.json", MEMORY_BUDGET_VARIABLE, *fragments)


def test_a_budget_too_small_for_the_model_names_the_variable(tmp_path, good_config, weights, no_building, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "1kB")
    refused(tmp_path, make_folder(tmp_path, good_config, weights), 2, "memory budget", f"raise {MEMORY_BUDGET_VARIABLE}")


def test_a_budget_that_is_no_size_is_refused(tmp_path, good_config, weights, no_building, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, "lots")
    refused(tmp_path, make_folder(tmp_path, good_config, weights), 2, f"{MEMORY_BUDGET_VARIABLE}='lots' is not a size")


def test_a_batch_beyond_the_budget_says_which_batch_fits(tmp_path, good_config, weights, monkeypatch):
    from hmar.config import ModelConfig

    config = ModelConfig.from_dict(good_config)
    weights_bytes = 4 * config.parameter_count()
    # room for the weights and a batch of 2, not for a batch of 4
    monkeypatch.setenv(MEMORY_BUDGET_VARIABLE, str(weights_bytes + config.activation_bytes(3)))
    line = refused(tmp_path, make_folder(tmp_path, good_config, weights), 2, "a batch of 4 images", "use a batch size of 3 or less",
                   args=("--num", "4", "--batch-size", "4"))
    assert MEMORY_BUDGET_VARIABLE in line


# ---- weight files --------------------------------------------------------------------------------
def _poison(value: float) -> Callable[[Path], str]:
    def change(folder: Path) -> str:
        path = folder / MODEL_FILES["hmar"]
        state = load_file(str(path))
        key = next(k for k in sorted(state) if k.endswith(".weight") and "blocks" in k)
        state[key].view(-1)[3] = value
        save_file(state, str(path))
        return key

    return change


class Payload:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _malicious(folder: Path) -> str:
    path = folder / "hmar.pth"
    torch.save({"weight": torch.zeros(2), "payload": Payload(folder.parent / "pwned")}, path)
    return "hmar.pth"


def _cut(fraction: float, name: str = "hmar.safetensors") -> Callable[[Path], str]:
    def change(folder: Path) -> str:
        path = folder / name
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return name

    return change


def _as_pth(folder: Path) -> None:
    state = load_file(str(folder / MODEL_FILES["hmar"]))
    torch.save(state, folder / "hmar.pth")


def _cut_pth(folder: Path) -> str:
    _as_pth(folder)
    return _cut(0.5, "hmar.pth")(folder)


def _wrapped(folder: Path) -> str:
    torch.save({"model": load_file(str(folder / MODEL_FILES["hmar"])), "step": 3}, folder / "hmar.pth")
    return "not a plain state dict"


def _garbage(folder: Path) -> str:
    (folder / "hmar.pth").write_bytes(os.urandom(4096))
    return "cannot read weight file"


WEIGHT_CASES = [
    ("nan-in-a-parameter", _poison(float("nan")), None, ["holds NaN or infinite values"]),
    ("inf-in-a-parameter", _poison(float("inf")), None, ["holds NaN or infinite values"]),
    ("malicious-pickle", _malicious, "hmar.pth", ["hmar never runs code", "torch refused it", "mkdir"]),
    ("safetensors-cut-in-half", _cut(0.5), None, ["cut short"]),
    ("safetensors-cut-in-header", _cut(0.0001), None, ["cut short"]),
    ("pth-cut-in-half", _cut_pth, "hmar.pth", ["cut short", "zip archive without its end record"]),
    ("empty-file", _cut(0.0), None, ["empty"]),
    ("wrapped-state-dict", _wrapped, "hmar.pth", ["not a plain state dict"]),
    ("random-bytes", _garbage, "hmar.pth", ["cannot read weight file"]),
]


@pytest.mark.parametrize("change, file, fragments", [pytest.param(c, f, fr, id=n) for n, c, f, fr in WEIGHT_CASES])
def test_bad_weight_files_are_refused_by_name(tmp_path, good_config, weights, change, file, fragments):
    if file is not None:
        good_config["files"]["hmar"] = file
    folder = make_folder(tmp_path, good_config, weights, copy_weights=True)
    named = change(folder)
    line = refused(tmp_path, folder, 1, *fragments)
    assert named in line
    assert "weights_only=False" not in line.replace("weights_only=True", "")  # never advice to run the file's code
    assert not (tmp_path / "pwned").exists()


# ---- the hub cache ---------------------------------------------------------------------------------
def _damage_cached(hub_cache: Path, name: str) -> hub.HubFile:
    """Put a zip archive cut short into the Hugging Face cache for `name`'s own weights, and a whole
    tokenizer next to it."""
    entry = hub.HUB_MODELS[name]
    files = dict(entry.hub_files)
    whole = hub_cache.parent / "whole.pth"
    torch.save({"weight": torch.zeros(64)}, whole)
    put_in_hub_cache(hub_cache, files["tokenizer"].repo_id, files["tokenizer"].filename, whole.read_bytes())
    damaged = files[entry.family]
    put_in_hub_cache(hub_cache, damaged.repo_id, damaged.filename, whole.read_bytes()[:200])
    return damaged


def test_a_damaged_cached_file_shows_as_broken_and_loading_names_the_remedy(hub_cache, tmp_path, no_building):
    damaged = _damage_cached(hub_cache, "var-d16")
    listing = runner.invoke(app, ["models", "ls", "--json"])
    entry = next(e for e in json.loads(listing.stdout) if e["name"] == "var-d16")
    assert entry["cached"] is False and entry["damaged"] is True
    assert "cut short" in next(f["problem"] for f in entry["files"] if f["filename"] == damaged.filename)
    table = runner.invoke(app, ["models", "ls"], env={"COLUMNS": "200"})
    assert any(line.startswith("var-d16") and " broken " in line for line in table.stdout.splitlines()), table.stdout
    assert "hmar models download var-d16 --force" in table.stdout
    line = refused(tmp_path, hub_cache, 1, damaged.filename, "cut short", "hmar models download var-d16 --force", "hmar models rm var-d16",
                   model="var-d16")
    assert "var-d16" in line


def test_download_fetches_a_damaged_file_again(fake_hub, hub_cache):
    damaged = _damage_cached(hub_cache, "var-d16")
    result = runner.invoke(app, ["models", "download", "var-d16", "--json"])
    assert result.exit_code == 0, result.stderr
    calls = [c for c in fake_hub.calls if c["filename"] == damaged.filename]
    assert len(calls) == 1 and calls[0]["force_download"] is True
    assert not [c for c in fake_hub.calls if c["filename"] != damaged.filename]  # the whole tokenizer stays
    assert hub.model_info("var-d16").cached


def _built_size(config) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated
        tokenizer, transformer = hmar.checkpoints.build_models(config)
    return sum(t.numel() for module in (tokenizer, transformer) for t in module.state_dict().values())


def test_the_budget_counts_exactly_what_build_models_makes(conformance_config):
    import dataclasses

    from hmar.config import ModelConfig, model_preset

    configs = [ModelConfig.from_dict(conformance_config, family) for family in ("hmar", "var")]
    base = configs[0]
    configs.append(dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, shared_aln=True, attn_l2_norm=False, mlp_ratio=2.5)))
    configs += [model_preset("hmar-d16"), model_preset("var-d16", 512)]
    for config in configs:
        assert config.parameter_count() == _built_size(config), config
