"""Model registry, downloads and the local model cache.

A model is a folder holding `config.json` plus the weight files it names. `resolve_model` turns what a
user types after `--model` into such a folder:

* a path to a model folder (or to its `config.json`) is used as it is (an existing folder wins over
  a registry name spelled the same);
* a bundled model (a folder under `hmar/bundled/`, e.g. `hmar-tiny`) ships inside the package;
* a hub model (`hmar-d16` … `var-d30`) lives in the Hugging Face cache, where `huggingface_hub`
  downloads it (resumable; `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and tokens apply as for any
  Hugging Face tool). Its model folder is synthesised in hmar's own cache (`HMAR_CACHE`, else the
  platform's user cache dir): a `config.json` written from the preset whose `files` section holds
  the absolute paths of the cached weight files. The weights are never copied.

A cached weight file that is cut short (a download interrupted outside huggingface_hub, a full disk,
a partial copy of a cache) is found from the file's ends without reading it: `hmar models ls` shows
the model as broken, loading it says how to repair it, and `download` fetches such files again.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hmar.atomic import atomic_write
from hmar.config import FAMILIES, model_preset
from hmar.errors import CheckpointError, HmarError, InputError

BUNDLED_DIR = Path(__file__).with_name("bundled")
SUGGESTIONS = 3


class ModelNotFoundError(InputError):
    """A `--model` that is neither a registry name nor a model folder."""


class ModelNotCachedError(HmarError):
    """A hub model whose weights are not in the local cache and cannot be downloaded now."""


class DownloadError(HmarError):
    """The Hub refused or failed a download (gated or missing repository, network, disk)."""


# ---- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HubFile:
    """One weight file on the Hugging Face Hub; `size` (bytes) is approximate, for display."""

    repo_id: str
    filename: str
    size: int


@dataclass(frozen=True)
class RegistryEntry:
    """A model hmar knows by name: hub files by role, or a bundled folder."""

    name: str
    family: str
    description: str
    preset: str | None = None  # hmar.config preset of hub models
    hub_files: tuple[tuple[str, HubFile], ...] = ()  # (role, file): tokenizer and hmar/var
    bundled_dir: Path | None = None

    @property
    def source(self) -> str:
        if self.bundled_dir is not None:
            return "bundled"
        return ", ".join(sorted({f.repo_id for _, f in self.hub_files}))


TOKENIZER_FILE = HubFile("FoundationVision/var", "vae_ch160v4096z32.pth", 436_000_000)

# Parameter counts from the published state dicts (float32, so 4 bytes each).
_PUBLISHED_PARAMETERS = {
    "hmar-d16": 468_000_000, "hmar-d20": 846_000_000, "hmar-d24": 1_385_000_000, "hmar-d30": 2_557_000_000,
    "var-d16": 311_000_000, "var-d20": 601_000_000, "var-d24": 1_034_000_000, "var-d30": 2_011_000_000,
}


def _hub_entry(preset: str) -> RegistryEntry:
    family, depth = preset.split("-d")
    parameters = _PUBLISHED_PARAMETERS[preset]
    if family == "hmar":
        weights = HubFile("nvidia/HMAR", f"hmar-d{depth}.pth", 4 * parameters)
        what = "HMAR (Markovian next-scale + masked prediction)"
    else:
        weights = HubFile("FoundationVision/var", f"var_d{depth}.pth", 4 * parameters)
        what = "VAR (next-scale prediction)"
    description = f"{what}, depth {depth}, {parameters / 1e9:.2f}B parameters, ImageNet 256 px"
    return RegistryEntry(preset, family, description, preset, (("tokenizer", TOKENIZER_FILE), (family, weights)))


HUB_MODELS: dict[str, RegistryEntry] = {
    entry.name: entry for entry in (_hub_entry(f"{family}-d{d}") for family in FAMILIES for d in (16, 20, 24, 30))
}


def bundled_models() -> dict[str, RegistryEntry]:
    """Model folders shipped inside the package (each `hmar/bundled/<name>/config.json`)."""
    if not BUNDLED_DIR.is_dir():
        return {}
    entries = {}
    for folder in sorted(p for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()):
        data = json.loads((folder / "config.json").read_text())
        family = next((f for f in FAMILIES if f in data), "unknown")
        description = f"small {family.upper()} model shipped with hmar; works offline, no download"
        entries[folder.name] = RegistryEntry(folder.name, family, description, bundled_dir=folder)
    return entries


def registry() -> dict[str, RegistryEntry]:
    """Every model name hmar knows: bundled models first, then the hub models."""
    return {**bundled_models(), **HUB_MODELS}


# ---- cache locations --------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hmar_cache_dir() -> Path:
    """hmar's own cache: the synthesised model folders of hub models (HMAR_CACHE overrides)."""
    if os.environ.get("HMAR_CACHE"):
        return Path(os.environ["HMAR_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hmar", appauthor=False))


def cache_dirs() -> dict[str, Path]:
    return {"hmar": hmar_cache_dir(), "huggingface_hub": hf_cache_dir(), "bundled": BUNDLED_DIR}


def is_offline() -> bool:
    """HF_HUB_OFFLINE=1: no network calls, the cache only."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_path(file: HubFile) -> Path | None:
    """Where the Hugging Face cache holds `file` (its `main` revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(file.repo_id, file.filename, cache_dir=hf_cache_dir())
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


# ---- listing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFile:
    role: str
    filename: str
    size: int  # bytes: on disk when local, else the registry's estimate
    repo_id: str | None  # None for bundled files
    local_path: Path | None  # None while not downloaded
    problem: str | None = None  # why the local file is unusable (cut short), None if it looks whole

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "local_path": str(self.local_path) if self.local_path else None}


@dataclass(frozen=True)
class ModelEntry:
    """A registry model and what of it is on this machine."""

    name: str
    family: str
    description: str
    source: str  # "bundled" or the Hub repositories
    files: tuple[ModelFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached(self) -> bool:
        return all(f.local_path is not None and f.problem is None for f in self.files)

    @property
    def damaged(self) -> tuple[ModelFile, ...]:
        return tuple(f for f in self.files if f.local_path is not None and f.problem is not None)

    @property
    def missing(self) -> tuple[ModelFile, ...]:
        return tuple(f for f in self.files if f.local_path is None)

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "description": self.description, "source": self.source,
                "size": self.size, "cached": self.cached, "damaged": bool(self.damaged), "files": [f.as_dict() for f in self.files]}


def _entry_status(entry: RegistryEntry) -> ModelEntry:
    from hmar.checkpoints import damaged

    files = []
    if entry.bundled_dir is not None:
        for role, filename in json.loads((entry.bundled_dir / "config.json").read_text()).get("files", {}).items():
            path = entry.bundled_dir / filename
            present = path.is_file()
            files.append(ModelFile(role, filename, path.stat().st_size if present else 0, None, path if present else None))
    for role, hub_file in entry.hub_files:
        local = cached_path(hub_file)
        files.append(ModelFile(role, hub_file.filename, local.stat().st_size if local else hub_file.size, hub_file.repo_id, local,
                               damaged(local) if local else None))
    return ModelEntry(entry.name, entry.family, entry.description, entry.source, tuple(files))


def list_models() -> list[ModelEntry]:
    return [_entry_status(entry) for entry in registry().values()]


def model_info(name: str) -> ModelEntry:
    return _entry_status(registry_entry(name))


def registry_entry(name: str) -> RegistryEntry:
    """The registry entry of `name` (case, `_`/`-` forgiven); ModelNotFoundError with suggestions."""
    entry = _find_entry(name)
    if entry is None:
        raise ModelNotFoundError(_unknown_message(name, list(registry())))
    return entry


def _find_entry(name: str) -> RegistryEntry | None:
    return next((e for n, e in registry().items() if _normal(n) == _normal(name)), None)


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _unknown_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(_normal(name), known, n=SUGGESTIONS, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown model {name!r}; {hint}known models: {', '.join(known)} (or give the path to a model folder)"


# ---- resolving --------------------------------------------------------------------------------
def resolve_model(name_or_path: str | os.PathLike, download: bool = False,
                  progress: DownloadProgress | None = None, token: str | bool | None = None) -> Path:
    """The model folder for a registry name or a folder path. A hub model not in the cache is
    downloaded when `download` is true, else ModelNotCachedError says how to get it."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.name == "config.json" and path.is_file():
        return path.parent
    if (path / "config.json").is_file():
        return path
    entry = _find_entry(text)
    if entry is not None:
        if entry.bundled_dir is not None:
            return entry.bundled_dir
        status = _entry_status(entry)
        if status.damaged and not download:
            raise CheckpointError(_damaged_message(status))
        if not status.cached:
            if not download:
                raise ModelNotCachedError(_not_cached_message(status))
            return _fetch(entry, progress, token, force=False)
        return _synthesise_folder(entry, status)
    if path.is_dir():
        raise ModelNotFoundError(f"no config.json in model folder {path}")
    if os.sep in text or "/" in text or text.startswith(".") or path.suffix:
        raise ModelNotFoundError(f"no model folder at {text}")
    raise ModelNotFoundError(_unknown_message(text, list(registry())))


def _not_cached_message(status: ModelEntry, offline: bool | None = None) -> str:
    offline = is_offline() if offline is None else offline
    missing = " and ".join(f"{f.filename} ({f.repo_id})" for f in status.missing)
    if not offline:
        return f"{status.name} is not downloaded yet (missing {missing}); run `hmar models download {status.name}`"
    ways = (f"run `hmar models download {status.name}` on a connected machine and copy its Hugging Face cache "
            f"into {hf_cache_dir()}")
    bundled = list(bundled_models())
    if bundled:
        ways += f", or use the bundled model {bundled[0]}"
    return f"{status.name} is not in the local cache and downloads are off (HF_HUB_OFFLINE): missing {missing}; {ways}"


def _damaged_message(status: ModelEntry) -> str:
    file = status.damaged[0]
    return f"the cached {file.filename} of {status.name} is unusable: {file.problem} ({file.local_path}); {repair_hint(status.name)}"


def repair_hint(name: str) -> str:
    """How to replace a hub model's damaged cached files."""
    return f"run `hmar models download {name} --force` to fetch it again, or `hmar models rm {name}` to remove it"


def hub_model_of_folder(folder: str | os.PathLike) -> str | None:
    """The hub model whose synthesised folder `folder` is (in hmar's cache), else None. Only such a
    folder may name weight files outside itself: those in the Hugging Face cache."""
    try:
        relative = Path(os.path.abspath(folder)).relative_to(os.path.abspath(hmar_cache_dir() / "models"))
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) == 1 and relative.parts[0] in HUB_MODELS else None


def _synthesise_folder(entry: RegistryEntry, status: ModelEntry) -> Path:
    """hmar's model folder of a cached hub model: config.json naming the cached weight files."""
    config = model_preset(entry.preset)
    files = {f.role: str(f.local_path) for f in status.files}
    text = json.dumps(dataclasses.replace(config, files=files).to_dict(), indent=2) + "\n"
    folder = hmar_cache_dir() / "models" / entry.name
    target = folder / "config.json"
    if target.is_file() and target.read_text() == text:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(target, overwrite=True) as temporary:
            temporary.write_text(text)
    except OSError as exc:
        raise HmarError(f"cannot write the model folder {folder}: {exc.strerror} (set HMAR_CACHE to a writable folder)") from None
    return folder


# ---- downloading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadEvent:
    """Progress of one transfer: `label` names it (the file, or a phase of it)."""

    label: str
    done: int
    total: int | None


DownloadProgress = Callable[[DownloadEvent], None]


@dataclass(frozen=True)
class PlannedFile:
    role: str
    repo_id: str
    filename: str
    size: int
    size_is_exact: bool  # from the Hub, not the registry's estimate
    cached: bool


def download_plan(name: str, token: str | bool | None = None) -> list[PlannedFile]:
    """What `download(name)` will fetch and how big it is (asks the Hub for exact sizes when
    online; the registry's estimates otherwise)."""
    entry = registry_entry(name)
    if entry.bundled_dir is not None:
        return []
    exact = {} if is_offline() else _remote_sizes(entry, token)
    return [
        PlannedFile(role, f.repo_id, f.filename, exact.get((f.repo_id, f.filename), f.size),
                    (f.repo_id, f.filename) in exact, cached_path(f) is not None)
        for role, f in entry.hub_files
    ]


def _remote_sizes(entry: RegistryEntry, token: str | bool | None) -> dict[tuple[str, str], int]:
    from huggingface_hub import HfApi

    sizes = {}
    api = HfApi(token=token)
    for repo_id in sorted({f.repo_id for _, f in entry.hub_files}):
        names = [f.filename for _, f in entry.hub_files if f.repo_id == repo_id]
        try:
            infos = api.get_paths_info(repo_id, names)
        except Exception:  # sizes are a courtesy: any Hub problem surfaces in the download itself
            continue
        sizes.update({(repo_id, info.path): info.size for info in infos if getattr(info, "size", None)})
    return sizes


def download(name: str, progress: DownloadProgress | None = None, token: str | bool | None = None,
             force: bool = False) -> Path:
    """Fetch a hub model's missing files into the Hugging Face cache (resuming partial downloads)
    and return its model folder. Bundled models need nothing and return their folder."""
    entry = registry_entry(name)
    if entry.bundled_dir is not None:
        return entry.bundled_dir
    return _fetch(entry, progress, token, force)


def _fetch(entry: RegistryEntry, progress: DownloadProgress | None, token: str | bool | None, force: bool) -> Path:
    from huggingface_hub import hf_hub_download

    import hmar

    status = _entry_status(entry)
    if is_offline():  # nothing can be fetched: what is cached is all there is
        if status.damaged:
            raise CheckpointError(_damaged_message(status))
        if not status.cached:
            raise ModelNotCachedError(_not_cached_message(status, offline=True))
        return resolve_model(entry.name)
    damaged_files = {f.filename for f in status.damaged}
    for _, hub_file in entry.hub_files:
        again = force or hub_file.filename in damaged_files  # a damaged file is fetched anew, not resumed
        if cached_path(hub_file) is not None and not again:
            continue
        with _hub_errors(entry, hub_file):
            hf_hub_download(
                hub_file.repo_id, hub_file.filename, cache_dir=hf_cache_dir(), token=token, force_download=again,
                library_name="hmar", library_version=hmar.__version__,
                tqdm_class=_tqdm_reporting_to(progress) if progress else None,
            )
    return resolve_model(entry.name)


@contextmanager
def _hub_errors(entry: RegistryEntry, hub_file: HubFile):
    """Turns huggingface_hub's exceptions into one-line hmar errors."""
    from huggingface_hub import errors

    where = f"{hub_file.filename} from {hub_file.repo_id}"
    # huggingface_hub logs every retry of an unreachable host as a warning; the user gets our one
    # line when it gives up instead
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        if is_offline() or isinstance(exc, errors.OfflineModeIsEnabled):
            raise ModelNotCachedError(_not_cached_message(_entry_status(entry), offline=True)) from None
        raise ModelNotCachedError(f"could not reach the Hugging Face Hub to download {where}; check the connection "
                                  f"(or HF_ENDPOINT), or copy a Hugging Face cache holding it into {hf_cache_dir()}") from None
    except errors.GatedRepoError:
        raise DownloadError(f"{hub_file.repo_id} is gated: accept its terms on huggingface.co and log in "
                            f"(`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise DownloadError(f"repository {hub_file.repo_id} not found or private (log in or set HF_TOKEN if you have access)") from None
    except errors.EntryNotFoundError:
        raise DownloadError(f"{hub_file.filename} is not in {hub_file.repo_id}") from None
    except errors.HfHubHTTPError as exc:
        raise DownloadError(f"download of {where} failed: {_first_line(exc)}") from None
    except OSError as exc:
        raise DownloadError(f"download of {where} failed: {exc.strerror or _first_line(exc)}") from None
    finally:
        hub_logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tqdm_reporting_to(progress: DownloadProgress) -> type:
    """A tqdm class (what huggingface_hub accepts) that draws nothing and reports to `progress`."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # huggingface_hub may pass extra keywords; a disabled bar ignores them
            super().__init__(*args, **kwargs)
            self.label = kwargs.get("desc") or "download"
            progress(DownloadEvent(self.label, self.n, self.total))

        def update(self, n=1):
            self.n += n
            progress(DownloadEvent(self.label, self.n, self.total))

    return ReportingBar


# ---- removing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Removal:
    removed: tuple[str, ...]  # "repo/filename" of every file deleted from the cache
    kept: tuple[tuple[str, str], ...]  # (file, the cached model that still needs it)
    freed: int  # bytes

    def as_dict(self) -> dict:
        return {"removed": list(self.removed), "kept": [{"file": f, "needed_by": m} for f, m in self.kept], "freed": self.freed}


def remove(name: str, dry_run: bool = False) -> Removal:
    """Delete a hub model's weights from the Hugging Face cache (all revisions), keeping files that
    another cached model shares (the tokenizer), and its synthesised model folder. `dry_run`: only
    say what would go."""
    entry = registry_entry(name)
    if entry.bundled_dir is not None:
        raise InputError(f"{entry.name} is bundled with the package and cannot be removed")
    still_needed = {}
    for other in HUB_MODELS.values():
        if other.name != entry.name and _entry_status(other).cached:
            for _, f in other.hub_files:
                still_needed.setdefault(f, other.name)
    doomed = [f for _, f in entry.hub_files if f not in still_needed]
    kept = tuple((f"{f.repo_id}/{f.filename}", still_needed[f]) for _, f in entry.hub_files if f in still_needed and cached_path(f))
    removed, freed = _delete_from_hf_cache(doomed, dry_run)
    if not dry_run:
        synthesised = hmar_cache_dir() / "models" / entry.name / "config.json"
        synthesised.unlink(missing_ok=True)
        if synthesised.parent.is_dir() and not any(synthesised.parent.iterdir()):
            synthesised.parent.rmdir()
    return Removal(tuple(removed), kept, freed)


def _delete_from_hf_cache(files: list[HubFile], dry_run: bool) -> tuple[list[str], int]:
    """Unlink the snapshot entries of `files` in every cached revision, and each blob no other
    cached file still points to (the same rule as `hf cache rm` for single files)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return [], 0
    wanted = {(f.repo_id, f.filename) for f in files}
    selected, retained_blobs = [], set()
    for repo in cache.repos:
        for revision in repo.revisions:
            for cached in revision.files:
                key = (repo.repo_id, cached.file_path.relative_to(revision.snapshot_path).as_posix())
                if repo.repo_type == "model" and key in wanted:
                    selected.append((key, cached))
                else:
                    retained_blobs.add(cached.blob_path)
    blobs = {cached.blob_path: cached.size_on_disk for _, cached in selected if cached.blob_path not in retained_blobs}
    if not dry_run:
        for _, cached in selected:
            cached.file_path.unlink(missing_ok=True)
        for blob in blobs:
            blob.unlink(missing_ok=True)
    return sorted({f"{repo_id}/{filename}" for (repo_id, filename), _ in selected}), sum(blobs.values())
