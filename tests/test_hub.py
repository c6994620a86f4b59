"""hmar.hub against a local stand-in for the Hub: a Hugging Face cache in its real on-disk layout
(blobs, snapshots, refs) in a temporary folder, and a fake `hf_hub_download` that fills it the way
the real one does (reporting progress through the tqdm class it is given). No network."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from hmar import hub
from hmar.config import ModelConfig, PRESET_NAMES
from hmar.errors import HmarError, InputError

from tests.conftest import fixture_file

REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Store a file as huggingface_hub does: content-addressed blob, snapshot symlink, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / REVISION / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.unlink(missing_ok=True)
    snapshot.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def fake_bytes(repo_id: str, filename: str) -> bytes:
    return f"{repo_id}/{filename}".encode() * 100


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download; records its calls."""

    def __init__(self):
        self.calls: list[dict] = []
        self.failure: Exception | None = None

    def __call__(self, repo_id, filename, *, cache_dir, tqdm_class=None, **options):
        self.calls.append({"repo_id": repo_id, "filename": filename, "cache_dir": cache_dir, **options})
        if self.failure is not None:
            raise self.failure
        data = fake_bytes(repo_id, filename)
        if tqdm_class is not None:
            bar = tqdm_class(total=len(data), initial=0, desc=filename, unit="B", name="huggingface_hub.http_get")
            bar.update(len(data) // 2)
            bar.update(len(data) - len(data) // 2)
            bar.close()
        return str(put_in_hub_cache(Path(cache_dir), repo_id, filename, data))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and hmar caches, online, no bundled models."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HMAR_CACHE", str(tmp_path / "hmar"))
    monkeypatch.setattr(hub, "BUNDLED_DIR", tmp_path / "bundled")
    return cache


@pytest.fixture
def fake_hub(hub_cache, monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


@pytest.fixture
def bundled_tiny(hub_cache, conformance_dir, conformance_config) -> Path:
    """A bundled `hmar-tiny` assembled from the conformance fixtures."""
    folder = hub.BUNDLED_DIR / "hmar-tiny"
    folder.mkdir(parents=True)
    for role in ("tokenizer", "hmar"):
        shutil.copy(fixture_file(conformance_dir, conformance_config, role), folder / conformance_config["files"][role])
    data = {"tokenizer": conformance_config["tokenizer"], "hmar": conformance_config["hmar"],
            "files": {r: conformance_config["files"][r] for r in ("tokenizer", "hmar")}}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


# ---- registry ---------------------------------------------------------------------------------
def test_registry_has_every_published_model_with_the_shared_tokenizer():
    assert list(hub.HUB_MODELS) == list(PRESET_NAMES)
    for name, entry in hub.HUB_MODELS.items():
        files = dict(entry.hub_files)
        assert files["tokenizer"] == hub.TOKENIZER_FILE
        assert entry.family in files and entry.preset == name and entry.description
    assert dict(hub.HUB_MODELS["hmar-d20"].hub_files)["hmar"].repo_id == "nvidia/HMAR"
    assert dict(hub.HUB_MODELS["hmar-d20"].hub_files)["hmar"].filename == "hmar-d20.pth"
    assert dict(hub.HUB_MODELS["var-d30"].hub_files)["var"].filename == "var_d30.pth"
    sizes = [dict(hub.HUB_MODELS[f"var-d{d}"].hub_files)["var"].size for d in (16, 20, 24, 30)]
    assert sizes == sorted(sizes) and 1e9 < sizes[0] < 2e9


def test_list_models_marks_nothing_cached_in_an_empty_cache(hub_cache):
    entries = hub.list_models()
    assert [e.name for e in entries] == list(PRESET_NAMES)
    assert not any(e.cached for e in entries)
    assert all(e.size > 400e6 for e in entries)


# ---- resolving --------------------------------------------------------------------------------
def test_a_model_folder_or_its_config_json_resolves_to_the_folder(bundled_tiny, tmp_path):
    assert hub.resolve_model(bundled_tiny) == bundled_tiny
    assert hub.resolve_model(str(bundled_tiny / "config.json")) == bundled_tiny
    with pytest.raises(hub.ModelNotFoundError, match="no model folder at"):
        hub.resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelNotFoundError, match="no config.json in model folder"):
        hub.resolve_model(str(tmp_path / "empty"))


def test_unknown_name_suggests_the_nearest_and_names_are_forgiving(hub_cache):
    with pytest.raises(hub.ModelNotFoundError, match=r"unknown model 'hmar-d61'; did you mean hmar-d16") as caught:
        hub.resolve_model("hmar-d61")
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert hub.registry_entry("VAR_D16").name == "var-d16"


def test_not_cached_online_says_how_to_download(hub_cache):
    with pytest.raises(hub.ModelNotCachedError, match="run `hmar models download hmar-d16`") as caught:
        hub.resolve_model("hmar-d16")
    assert caught.value.exit_code == 1
    assert "hmar-d16.pth (nvidia/HMAR)" in str(caught.value)


def test_offline_and_not_cached_names_what_is_missing_and_the_ways_out(hub_cache, monkeypatch, bundled_tiny):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.ModelNotCachedError) as caught:
        hub.resolve_model("var-d16", download=True)
    message = str(caught.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "var_d16.pth (FoundationVision/var)" in message and "vae_ch160v4096z32.pth" in message
    assert "on a connected machine" in message and str(hub_cache) in message
    assert "use the bundled model hmar-tiny" in message


def test_bundled_model_resolves_offline_and_loads(bundled_tiny, monkeypatch):
    from hmar.pipeline import Pipeline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_model("hmar-tiny") == bundled_tiny
    entry = next(e for e in hub.list_models() if e.name == "hmar-tiny")
    assert entry.source == "bundled" and entry.cached and entry.family == "hmar"
    assert entry.size == sum(p.stat().st_size for p in bundled_tiny.glob("*.pth"))
    assert Pipeline.from_pretrained("hmar-tiny", device="cpu").config.family == "hmar"
    with pytest.raises(InputError, match="bundled"):
        hub.remove("hmar-tiny")


# ---- downloading ------------------------------------------------------------------------------
def test_download_fills_the_cache_reports_progress_and_synthesises_a_model_folder(fake_hub, hub_cache, tmp_path):
    events = []
    folder = hub.download("hmar-d16", progress=events.append, token="hf_test")
    assert [(c["repo_id"], c["filename"]) for c in fake_hub.calls] == [
        ("FoundationVision/var", "vae_ch160v4096z32.pth"), ("nvidia/HMAR", "hmar-d16.pth")]
    assert all(c["token"] == "hf_test" and c["library_name"] == "hmar" and not c["force_download"] for c in fake_hub.calls)
    assert all(c["cache_dir"] == hub_cache for c in fake_hub.calls)
    for name in ("vae_ch160v4096z32.pth", "hmar-d16.pth"):
        done = [e.done for e in events if e.label == name]
        assert done == sorted(done) and done[-1] == next(e.total for e in events if e.label == name)

    assert folder == tmp_path / "hmar" / "models" / "hmar-d16"
    config = ModelConfig.load(folder / "config.json")
    assert config.family == "hmar" and config.transformer.depth == 16 and config.tokenizer.image_size == 256
    for role, path in config.files.items():
        assert Path(path).is_absolute() and (folder / path).read_bytes() == fake_bytes(
            *{"tokenizer": ("FoundationVision/var", "vae_ch160v4096z32.pth"), "hmar": ("nvidia/HMAR", "hmar-d16.pth")}[role])
    assert hub.resolve_model("hmar-d16") == folder


def test_download_skips_cached_files_and_shares_the_tokenizer(fake_hub):
    hub.download("hmar-d16")
    status = hub.model_info("var-d16")
    assert not status.cached and [f.filename for f in status.missing] == ["var_d16.pth"]
    fake_hub.calls.clear()
    hub.download("var-d16")
    assert [c["filename"] for c in fake_hub.calls] == ["var_d16.pth"]
    fake_hub.calls.clear()
    hub.download("var-d16")
    assert fake_hub.calls == []
    cached = {e.name for e in hub.list_models() if e.cached}
    assert cached == {"hmar-d16", "var-d16"}


def test_resolve_with_download_fetches_what_is_missing(fake_hub):
    folder = hub.resolve_model("var-d20", download=True)
    assert (folder / "config.json").is_file() and len(fake_hub.calls) == 2


def test_download_plan_sizes_come_from_the_hub_when_it_answers(hub_cache, monkeypatch):
    class Info:
        def __init__(self, path, size):
            self.path, self.size = path, size

    asked = []

    def get_paths_info(self, repo_id, paths, **options):
        asked.append((repo_id, tuple(paths)))
        return [Info(p, 1234) for p in paths]

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", get_paths_info)
    plan = hub.download_plan("hmar-d24")
    assert [(f.filename, f.size, f.size_is_exact, f.cached) for f in plan] == [
        ("vae_ch160v4096z32.pth", 1234, True, False), ("hmar-d24.pth", 1234, True, False)]
    assert sorted(asked) == [("FoundationVision/var", ("vae_ch160v4096z32.pth",)), ("nvidia/HMAR", ("hmar-d24.pth",))]

    def unreachable(self, repo_id, paths, **options):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", unreachable)
    plan = hub.download_plan("hmar-d24")
    assert not any(f.size_is_exact for f in plan) and plan[1].size == dict(hub.HUB_MODELS["hmar-d24"].hub_files)["hmar"].size
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked.clear()
    assert not any(f.size_is_exact for f in hub.download_plan("hmar-d24")) and asked == []


@pytest.mark.parametrize("failure, kind, message", [
    (hf_errors.LocalEntryNotFoundError("connection error"), hub.ModelNotCachedError, "could not reach the Hugging Face Hub"),
    (hf_errors.EntryNotFoundError("404"), hub.DownloadError, "hmar-d16.pth is not in nvidia/HMAR"),
    (OSError(28, "No space left on device"), hub.DownloadError, "No space left on device"),
])
def test_hub_failures_become_one_line_errors(fake_hub, failure, kind, message):
    fake_hub.failure = failure
    put_in_hub_cache(Path(constants.HF_HUB_CACHE), "FoundationVision/var", "vae_ch160v4096z32.pth", b"tokenizer")
    with pytest.raises(kind, match=message) as caught:
        hub.download("hmar-d16")
    assert isinstance(caught.value, HmarError) and "\n" not in str(caught.value)


def test_retry_warnings_of_the_hub_stay_quiet(fake_hub):
    def unreachable(*args, **kwargs):
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise hf_errors.LocalEntryNotFoundError("connection error")

    seen = []
    listener = logging.Handler()
    listener.emit = lambda record: seen.append(record.getMessage())
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(listener)
    huggingface_hub.hf_hub_download = unreachable  # undone by fake_hub's monkeypatch
    try:
        with pytest.raises(hub.ModelNotCachedError, match="could not reach"):
            hub.download("hmar-d16")
    finally:
        hub_logger.removeHandler(listener)
    assert seen == []


def test_offline_download_fails_before_touching_the_hub(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.ModelNotCachedError, match="downloads are off"):
        hub.download("var-d16")
    assert fake_hub.calls == []


def test_the_hubs_own_offline_refusal_gets_the_offline_message(fake_hub):
    """huggingface_hub may know it is offline when hmar's check did not (the variable set later)."""
    fake_hub.failure = hf_errors.OfflineModeIsEnabled("offline")
    with pytest.raises(hub.ModelNotCachedError, match="downloads are off.*on a connected machine"):
        hub.download("var-d16")


def test_files_already_in_a_copied_cache_need_no_download(hub_cache, monkeypatch):
    """A cache copied from a connected machine (the real layout) is found offline."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    put_in_hub_cache(hub_cache, "FoundationVision/var", "vae_ch160v4096z32.pth", b"tokenizer")
    put_in_hub_cache(hub_cache, "FoundationVision/var", "var_d16.pth", b"weights")
    folder = hub.resolve_model("var-d16")
    config = json.loads((folder / "config.json").read_text())
    assert Path(config["files"]["var"]).read_bytes() == b"weights"
    assert hub.download("var-d16") == folder


# ---- removing ---------------------------------------------------------------------------------
def test_remove_keeps_files_another_cached_model_needs(fake_hub, hub_cache, tmp_path):
    hub.download("hmar-d16")
    hub.download("var-d16")
    removal = hub.remove("hmar-d16")
    assert removal.removed == ("nvidia/HMAR/hmar-d16.pth",)
    assert removal.kept == (("FoundationVision/var/vae_ch160v4096z32.pth", "var-d16"),)
    assert removal.freed == len(fake_bytes("nvidia/HMAR", "hmar-d16.pth"))
    assert not hub.model_info("hmar-d16").cached and hub.model_info("var-d16").cached
    assert not (tmp_path / "hmar" / "models" / "hmar-d16").exists()
    assert not list((hub_cache / "models--nvidia--HMAR" / "blobs").iterdir())

    removal = hub.remove("var-d16")
    assert set(removal.removed) == {"FoundationVision/var/var_d16.pth", "FoundationVision/var/vae_ch160v4096z32.pth"}
    assert not any(e.cached for e in hub.list_models())
    assert hub.remove("var-d16").removed == ()


def test_cache_dirs_follow_the_environment(hub_cache, tmp_path):
    dirs = hub.cache_dirs()
    assert dirs["huggingface_hub"] == hub_cache and dirs["hmar"] == tmp_path / "hmar"
    assert dirs["bundled"] == tmp_path / "bundled"
