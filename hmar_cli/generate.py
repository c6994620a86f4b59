"""`hmar generate`: class-conditional sampling to image files (with the settings in their metadata)."""
from __future__ import annotations

from pathlib import Path

import typer

from hmar.errors import InputError
from hmar.images import image_from_array
from hmar.metadata import settings_metadata
from hmar.outputs import check_writable, grid, output_paths, save_image
from hmar_cli.sampling import MAX_IMAGES, SamplingOptions, class_index, report, sampling_progress, save_images, with_sampling_options


@with_sampling_options
def generate(
    classes: list[str] = typer.Option(..., "--class", "-c", metavar="CLASS", help="Class index or name; repeat for several."),
    num: int = typer.Option(1, "--num", "-n", min=1, max=MAX_IMAGES, help=f"Images per class (at most {MAX_IMAGES} images in all)."),
    out: str = typer.Option("hmar.png", "--out", "-o", metavar="PATH", help="Output file: .png, .jpg, .jpeg or .webp (see --quality); several images: {i} in the name, else -0, -1 … appended."),
    make_grid: bool = typer.Option(False, "--grid", help="Also write all images as one grid (<out>-grid, same format)."),
    options: SamplingOptions = None,
) -> None:
    """Generate images of the given classes."""
    if len(classes) * num > MAX_IMAGES:
        raise InputError(f"{len(classes)} classes x --num {num} is {len(classes) * num} images; one command makes at most {MAX_IMAGES} "
                         f"(run several, each with its own --seed)")
    paths = output_paths(out, len(classes) * num)  # checked before a model is loaded (or downloaded)
    grid_path = _grid_path(out) if make_grid else None
    check_writable(paths + ([grid_path] if grid_path else []), options.overwrite)
    config = options.checked_config()  # classes and steps are checked before the weights load
    labels = [class_index(c, config) for c in classes for _ in range(num)]
    pipe = options.load_pipeline()
    settings = pipe.settings(count=len(labels), **options.sampler_options())
    with sampling_progress(settings, len(labels), quiet=options.as_json) as progress:
        gen = pipe.generate(labels, progress=progress, **options.sampler_options())

    images = [image_from_array(image.permute(1, 2, 0).numpy()) for image in gen.images]
    metadata = settings_metadata(pipe, settings, labels)
    records = save_images(pipe, images, labels, paths, metadata, options.overwrite, options.quality)
    if grid_path:
        save_image(grid(images), grid_path, metadata, options.overwrite, options.quality)
    report(options, pipe, metadata, records, also_written=[grid_path] if grid_path else [],
           grid=str(grid_path) if grid_path else None)


def _grid_path(out: str) -> Path:
    single = Path(out.replace("{i}", ""))
    return single.with_name(single.stem + "-grid" + single.suffix)
