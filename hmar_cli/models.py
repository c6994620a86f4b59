"""`hmar models ls|download|info|rm`: the registry, the download cache and model folders."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hmar import hub
from hmar.config import ModelConfig, format_size, model_preset
from hmar_cli.downloads import download_with_progress

app = typer.Typer(help="List, download, inspect and remove models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def _status(entry: hub.ModelEntry) -> str:
    if entry.source == "bundled":
        return "bundled"
    if entry.damaged:  # present but cut short: loading it would fail
        return "broken"
    if entry.cached:
        return "yes"
    return "partly" if len(entry.missing) < len(entry.files) else "no"


@app.command("ls")
def list_models(as_json: bool = JSON_OPTION) -> None:
    """Every known model: size, whether it is on this machine, what it is."""
    entries = hub.list_models()
    if as_json:
        print(json.dumps([e.as_dict() for e in entries]))
        return
    table = Table(show_edge=False)
    for column, justify in (("name", "left"), ("size", "right"), ("cached", "left"), ("description", "left")):
        table.add_column(column.upper(), justify=justify, no_wrap=column != "description")
    for e in entries:
        table.add_row(e.name, format_size(e.size), _status(e), e.description)
    console.print(table)
    console.print(f"Hugging Face cache: {hub.hf_cache_dir()}" + ("  (offline: HF_HUB_OFFLINE)" if hub.is_offline() else ""))
    for e in entries:
        for f in e.damaged:
            console.print(f"{e.name}: {f.filename} is broken ({f.problem}); {hub.repair_hint(e.name)}", highlight=False)


@app.command("download")
def download(
    names: list[str] = typer.Argument(..., help="Registry names, e.g. hmar-d16 var-d16."),
    token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (default: HF_TOKEN or the stored login)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Download models into the Hugging Face cache (resumes interrupted downloads)."""
    entries = [hub.registry_entry(name) for name in names]  # every name checked before any download
    records = []
    for entry in entries:
        folder = download_with_progress(entry.name, err_console, token=token, force=force, quiet=as_json)
        records.append({"name": entry.name, "path": str(folder)})
        if not as_json:
            err_console.print(f"{entry.name} is ready: {folder}")
    if as_json:
        print(json.dumps(records))


@app.command("info")
def info(name: str = typer.Argument(..., help="A registry name or a model folder."), as_json: bool = JSON_OPTION) -> None:
    """What a model is, its files and where they are."""
    entry = _registry_entry_or_none(name)
    if entry is None:
        details = _folder_details(name)
    else:
        status = hub.model_info(entry.name)
        details = {**status.as_dict(), "folder": str(hub.resolve_model(entry.name)) if status.cached else None}
        if entry.preset:
            details.update(_config_details(model_preset(entry.preset)))
        elif entry.bundled_dir is not None:
            details.update(_config_details(ModelConfig.load(entry.bundled_dir / "config.json")))
    if as_json:
        print(json.dumps(details))
        return
    for key in ("name", "family", "source", "description", "folder"):
        if details.get(key):
            console.print(f"[bold]{key}[/bold]: {details[key]}")
    if "config" in details:
        console.print("[bold]config[/bold]: " + ", ".join(f"{k} {v}" for k, v in details["config"].items()))
    if details.get("class_names"):
        console.print("[bold]classes[/bold] (--class takes the number or the name): "
                      + ", ".join(f"{i} {name}" for i, name in enumerate(details["class_names"])), highlight=False)
    elif details.get("config", {}).get("classes") == 1000:
        console.print("[bold]classes[/bold]: the 1000 ImageNet-1k classes (--class takes the number or a name, "
                      'e.g. --class 207 or --class "golden retriever")', highlight=False)
    table = Table(show_edge=False)
    for column in ("ROLE", "FILE", "SIZE", "LOCAL PATH"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for f in details["files"]:
        local = f["local_path"] or "[dim]not downloaded[/dim]"
        table.add_row(f["role"], f["filename"], format_size(f["size"]), local + (f" [red](broken: {f['problem']})[/red]" if f.get("problem") else ""))
    console.print(table)


def _registry_entry_or_none(name: str) -> hub.RegistryEntry | None:
    try:
        return hub.registry_entry(name)
    except hub.ModelNotFoundError:
        return None


def _folder_details(name: str) -> dict:
    folder = hub.resolve_model(name)  # a folder, or ModelNotFoundError with suggestions
    config = ModelConfig.load(folder / "config.json")
    files = []
    for role, filename in config.files.items():
        path = folder / filename
        files.append({"role": role, "filename": filename, "size": path.stat().st_size if path.is_file() else 0,
                      "repo_id": None, "local_path": str(path) if path.is_file() else None})
    return {"name": folder.name, "family": config.family, "source": "folder", "description": "model folder",
            "folder": str(folder), "size": sum(f["size"] for f in files), "cached": all(f["local_path"] for f in files),
            "files": files, **_config_details(config)}


def _config_details(config: ModelConfig) -> dict:
    """The architecture in brief, and the model's own class names (None: ImageNet's or numbers)."""
    t = config.transformer
    summary = {"resolution": config.tokenizer.image_size, "depth": t.depth, "width": t.width, "heads": t.num_heads,
               "classes": t.num_classes, "vocabulary": config.tokenizer.vocab_size, "scales": len(config.patch_nums)}
    return {"config": summary, "class_names": list(config.class_names) if config.class_names else None}


@app.command("rm")
def remove(
    name: str = typer.Argument(..., help="A registry name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete a model's weights from the cache (files another cached model shares are kept)."""
    plan = hub.remove(name, dry_run=True)
    if plan.removed and not yes:
        typer.confirm(f"Remove {', '.join(plan.removed)} ({format_size(plan.freed)}) from {hub.hf_cache_dir()}?", abort=True)
    removal = hub.remove(name) if plan.removed else plan
    if as_json:
        print(json.dumps({"name": hub.registry_entry(name).name, **removal.as_dict()}))
        return
    if not removal.removed:
        err_console.print(f"{hub.registry_entry(name).name} has no files of its own in the cache; nothing to remove")
    for path in removal.removed:
        err_console.print(f"removed {path}")
    for path, needed_by in removal.kept:
        err_console.print(f"kept {path} (also used by {needed_by})")
    if removal.removed:
        err_console.print(f"freed {format_size(removal.freed)}")
