"""Model downloads on the terminal: the size first, then a rich progress bar per transfer."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from hmar import hub
from hmar.config import ModelConfig, format_size, model_preset
from hmar.errors import InputError


def download_with_progress(name: str, console: Console, token: str | None = None, force: bool = False,
                           quiet: bool = False) -> Path:
    """Download a registry model (announcing what and how much first) and return its folder."""
    if hub.is_offline():
        return hub.download(name, token=token)  # the cache only: its folder, or how to get it
    plan = hub.download_plan(name, token=token)
    wanted = [f for f in plan if force or not f.cached]
    if wanted and not quiet:
        total = sum(f.size for f in wanted)
        approx = "" if all(f.size_is_exact for f in wanted) else "about "
        parts = ", ".join(f"{f.filename} ({format_size(f.size)}, {f.repo_id})" for f in wanted)
        console.print(f"Downloading {hub.registry_entry(name).name}: {approx}{format_size(total)} — {parts}")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, disable=quiet or not wanted) as progress:
        tasks: dict[str, int] = {}

        def report(event: hub.DownloadEvent) -> None:
            if event.label not in tasks:
                tasks[event.label] = progress.add_task(event.label, total=event.total)
            progress.update(tasks[event.label], completed=event.done, total=event.total)

        return hub.download(name, progress=report, token=token, force=force)


def model_folder(name_or_path: str, console: Console, quiet: bool = False) -> Path:
    """What `--model` names, as a folder; a registry model missing from the cache is downloaded
    first unless downloads are off (then the error says how to get it)."""
    try:
        return hub.resolve_model(name_or_path)
    except hub.ModelNotCachedError:
        if hub.is_offline():
            raise
        return download_with_progress(name_or_path, console, quiet=quiet)


def model_config(name_or_path: str) -> ModelConfig:
    """What `--model` names, as a config, without loading or downloading any weights: the folder's
    config.json, or the preset of a registry model not yet in the cache (to check classes and
    schedules before a download of gigabytes)."""
    try:
        folder = hub.resolve_model(name_or_path)
    except hub.ModelNotCachedError:
        return model_preset(hub.registry_entry(name_or_path).preset)
    return ModelConfig.load(folder / "config.json")


#: what a sampling command uses without --model: the first of these in the cache (the deepest samples best)
DEFAULT_MODELS = ("hmar-d30", "hmar-d24", "hmar-d20", "hmar-d16")


def default_model() -> str:
    """The best published HMAR model in the cache, for a command given no --model; none cached is
    a usage error that says how to get one (nothing is downloaded unasked: they are gigabytes)."""
    for name in DEFAULT_MODELS:
        if hub.model_info(name).cached:
            return name
    smallest = DEFAULT_MODELS[-1]
    bundled = ", or --model " + " / ".join(hub.bundled_models()) + " (bundled, small)" if hub.bundled_models() else ""
    raise InputError(f"no --model given and no published HMAR model is downloaded: run `hmar models download {smallest}` "
                     f"({format_size(hub.model_info(smallest).size)}), or pass --model NAME|FOLDER{bundled}")
