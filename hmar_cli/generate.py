"""`hmar generate`: class-conditional sampling to PNG files (with the settings in their metadata)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import hmar
from hmar.classes import display_name, resolve_class
from hmar.errors import InputError
from hmar.images import check_writable, grid, image_from_array, output_paths, save_png
from hmar.pipeline import Pipeline
from hmar.schedule import format_schedule
from hmar_cli.downloads import model_folder

err_console = Console(stderr=True)


def load_pipeline(model: str, device: str, quiet: bool = False) -> Pipeline:
    """A registry name (downloaded on first use) or a model folder (config.json + weights)."""
    return Pipeline.from_folder(model_folder(model, err_console, quiet=quiet), device=device, name=model)


def generate(
    model: str = typer.Option(..., "--model", "-m", help="Registry name (see `hmar models ls`) or model folder (config.json + weights)."),
    classes: list[str] = typer.Option(..., "--class", "-c", help="Class index or name; repeat for several."),
    num: int = typer.Option(1, "--num", "-n", min=1, help="Images per class."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps in all (HMAR: 14 is the authors' default)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help='Tokens per step per scale, e.g. "1;1,3;1,1,2,5;16;…".'),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance strength."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus filtering (0: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; same seed and settings give the same pixels."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    out: str = typer.Option("hmar.png", "--out", "-o", help="Output PNG; several images: {i} in the name, else -0, -1 … appended."),
    make_grid: bool = typer.Option(False, "--grid", help="Also write all images as one grid (<out>-grid.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Generate images of the given classes."""
    if steps is not None and schedule is not None:
        raise InputError("give either --steps or --schedule, not both")
    paths = output_paths(out, len(classes) * num)  # checked before a model is loaded (or downloaded)
    grid_path = Path(out.replace("{i}", "")).with_name(Path(out.replace("{i}", "")).stem + "-grid.png") if make_grid else None
    check_writable(paths + ([grid_path] if grid_path else []), overwrite)
    pipe = load_pipeline(model, device, quiet=as_json)
    labels = [resolve_class(c, pipe.num_classes, pipe.config.class_names) for c in classes for _ in range(num)]
    settings = pipe.settings(steps=steps, schedule=schedule, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size, count=len(labels))

    total = sum(len(e) for e in settings.schedule) * -(-len(labels) // settings.batch_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("sampling", total=total)

        def advance(event) -> None:
            progress.update(task, advance=1, description=f"scale {event.scale + 1}/{len(settings.schedule)} step {event.step + 1}/{event.steps_in_scale}")

        gen = pipe.generate(labels, progress=advance, steps=steps, schedule=schedule, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size)

    images = [image_from_array(image.permute(1, 2, 0).numpy()) for image in gen.images]
    common = {
        "Software": f"hmar {hmar.__version__}", "hmar:model": pipe.name or model, "hmar:seed": str(settings.seed),
        "hmar:cfg": str(settings.cfg), "hmar:top_k": str(settings.top_k), "hmar:top_p": str(settings.top_p),
        "hmar:schedule": format_schedule(settings.schedule), "hmar:batch_size": str(settings.batch_size),
    }
    records = []
    for i, (image, label, path) in enumerate(zip(images, labels, paths)):
        name = display_name(label, pipe.num_classes, pipe.config.class_names)
        save_png(image, path, {**common, "hmar:class": str(label), "hmar:class_name": name, "hmar:index": str(i)}, overwrite)
        records.append({"path": str(path), "class": label, "class_name": name})
    if grid_path:
        save_png(grid(images), grid_path, common, overwrite)
    summary = {"model": pipe.name, "device": str(pipe.device), "images": records, "grid": str(grid_path) if grid_path else None,
               **{k.split(":")[1]: v for k, v in common.items() if k.startswith("hmar:") and k != "hmar:model"}}
    if as_json:
        print(json.dumps(summary))
    else:
        err_console.print(f"wrote {len(records)} image(s): " + ", ".join(r["path"] for r in records) + (f" and {grid_path}" if grid_path else ""))
