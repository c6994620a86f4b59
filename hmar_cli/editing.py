"""`hmar inpaint`, `hmar outpaint` and `hmar edit`: zero-shot editing of image files.

A layer over `hmar.edit_api`, which does the editing (images of any size and mode, masks, boxes,
outpainting margins, context windows, colour matching, feathering, the input's nature and the
outputs' metadata): this module reads the options and the files, plans each image's edit, shares
batches between the views of many images (paths, folders, globs, one model load and one random
stream for all), writes the outputs and prints the notes, the progress and the closing report.
"""
from __future__ import annotations

import glob
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hmar.edit_api import (EditRequest, PlannedEdit, check_region_options, edit_metadata, made_by, outpaint_request, plan_request,
                           region_request, sample_views, tiny_model_note)
from hmar.edit_window import DEFAULT_CONTEXT, MIN_CONTEXT, Context, parse_context
from hmar.errors import HmarError, InputError
from hmar.images import MASK_RULE, MAX_PIXELS, Nature
from hmar.metadata import settings_metadata
from hmar.outputs import check_writable, output_paths
from hmar.regions import FEATHER_RULE, Box, check_outpaint_options, parse_box, parse_size
from hmar_cli.flags import message, text
from hmar_cli.options import option_group
from hmar_cli.sampling import MAX_IMAGES, SamplingOptions, class_index, err_console, note, report, save_images, with_sampling_options

CLASS_HELP = "Class index or name to generate as (default: unconditional, the null class)."
IMAGES_HELP = ("The images to edit (any size and mode): files, folders (their image files) or quoted globs ('shots/*.jpg'); "
               "with several, a bad one is reported and the others still done.")
NUM_HELP = f"Variants to make of each image (different draws from the one seed; at most {MAX_IMAGES})."
OUT_HELP = ("Output file, .png, .jpg, .jpeg or .webp (see --quality; default: {{name}}-{}.png here); {{name}} is the image's name without extension (needed with several "
            "images), {{i}} the variant (else several variants get -0, -1 … appended).")
CONTEXT_HELP = ("How much around each region the model sees: pixels on each side (64), a fraction of the region's larger side "
                f"(0.5, the default) or full (the largest centred square of the image, one window for all regions). Each connected group of "
                f"regions gets its own square window: its box grown by the context, at least the model's resolution where the "
                f"image is that large, kept inside the image, always with at least {MIN_CONTEXT:g} of the region's size around it; "
                f"groups whose windows overlap share one. Outpainting: each new strip (or the band around the image) is a region, "
                f"so its window holds the strip and the image pixels nearest to it.")
DEFAULT_OUT_SUFFIX = {"inpaint": "inpainted", "outpaint": "outpainted", "edit": "edited"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
EDIT_BATCH = 16  # model views per forward pass when editing several images without --batch-size


MATCH_COLOURS_HELP = ("Shift the generated pixels' colours smoothly so that they meet the kept ones at the region's edge "
                      "(removes a colour cast that would show the region's outline; detail is the model's own).")


@dataclass(frozen=True)
class RegionOptions:
    """Where inpaint and edit regenerate: a mask file or a box, grown and blended."""

    mask: Path | None
    box: Box | None
    dilate: int
    feather: int | None  # None: `default_feather`, per image
    match_colours: bool


def _region_options(
    mask: Optional[Path] = typer.Option(None, "--mask", help=f"Mask image: {MASK_RULE}. A mask of another size is resized to the image (a note says so, and "
                                        "whether it was stretched to another aspect ratio)."),
    box: Optional[str] = typer.Option(None, "--box", metavar="X0,Y0,X1,Y1", help="Region to regenerate instead of a mask: x0,y0 the top-left corner, x1,y1 the "
                                      "bottom-right, in pixels; a box reaching past the image is clipped to it (with a note)."),
    dilate: int = typer.Option(0, "--dilate", min=0, help="Grow the region by this many pixels first (covers halos around an object)."),
    feather: Optional[int] = typer.Option(None, "--feather", min=0, show_default=False,
                                          help=f"Blend generated pixels in over this many pixels inside the region's edge, so that no seam shows "
                                               f"(default: {FEATHER_RULE}; 0: a hard edge)."),
    match_colours: bool = typer.Option(True, "--match-colours/--no-match-colours", help=MATCH_COLOURS_HELP),
) -> RegionOptions:
    check_region_options(mask, box, dilate, feather)
    return RegionOptions(mask, parse_box(box) if box is not None else None, dilate, feather, match_colours)


with_region_options = option_group(_region_options, "region")

def _context_option(
    context: str = typer.Option(str(DEFAULT_CONTEXT), "--context", metavar="PIXELS|FRACTION|full", help=CONTEXT_HELP),
) -> Context:
    return parse_context(context)


with_context_option = option_group(_context_option, "view")


@with_sampling_options
@with_context_option
@with_region_options
def inpaint(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help=IMAGES_HELP, show_default=False),
    label: Optional[str] = typer.Option(None, "--class", "-c", metavar="CLASS", help=CLASS_HELP),
    num: int = typer.Option(1, "--num", "-n", min=1, max=MAX_IMAGES, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("inpainted")),
    region: RegionOptions = None,
    view: Context = None,
    options: SamplingOptions = None,
) -> None:
    """Regenerate a region of images (a mask or a box), unconditionally or as a class.

    With several images, --mask may be a folder: each image's mask is the file there with the image's
    name and any image extension (photos/cat.jpg → masks/cat.png)."""
    _edit_region("inpaint", images, region, view, label, num, out, options)


@with_sampling_options
@with_context_option
@with_region_options
def edit(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help=IMAGES_HELP, show_default=False),
    label: str = typer.Option(..., "--class", "-c", metavar="CLASS", help="Class index or name the region becomes."),
    num: int = typer.Option(1, "--num", "-n", min=1, max=MAX_IMAGES, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("edited")),
    region: RegionOptions = None,
    view: Context = None,
    options: SamplingOptions = None,
) -> None:
    """Class-conditional editing: regenerate a region of images as the given class.

    With several images, --mask may be a folder: each image's mask is the file there with the image's
    name and any image extension (photos/cat.jpg → masks/cat.png)."""
    _edit_region("edit", images, region, view, label, num, out, options)


@with_sampling_options
@with_context_option
def outpaint(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help=IMAGES_HELP.replace("to edit", "to extend"), show_default=False),
    left: int = typer.Option(0, "--left", help="Pixels to add on the left."),
    right: int = typer.Option(0, "--right", help="Pixels to add on the right."),
    top: int = typer.Option(0, "--top", help="Pixels to add at the top."),
    bottom: int = typer.Option(0, "--bottom", help="Pixels to add at the bottom."),
    expand: Optional[float] = typer.Option(None, "--expand", help="Grow both sides by this factor, centred (1.5: half as large again)."),
    to: Optional[str] = typer.Option(None, "--to", metavar="WxH", help=f"Grow to this size, centred: WIDTHxHEIGHT (at most {MAX_PIXELS:,} pixels)."),
    label: Optional[str] = typer.Option(None, "--class", "-c", metavar="CLASS", help=CLASS_HELP),
    num: int = typer.Option(1, "--num", "-n", min=1, max=MAX_IMAGES, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("outpainted")),
    match_colours: bool = typer.Option(True, "--match-colours/--no-match-colours", help=MATCH_COLOURS_HELP),
    view: Context = None,
    options: SamplingOptions = None,
) -> None:
    """Extend images' canvas and generate the new area; the original pixels stay as they are."""
    target_size = parse_size(to) if to is not None else None
    # sizes that scale memory are refused here, before any image is read or the model loads
    check_outpaint_options(left=left, right=right, top=top, bottom=bottom, expand=expand, to=target_size)

    def prepare(source: Path) -> EditRequest:
        return outpaint_request(source, left=left, right=right, top=top, bottom=bottom, expand=expand, to=target_size,
                                match_colours=match_colours)

    _run("outpaint", images, prepare, view, label, num, out, options)


def _edit_region(command: str, images: list[Path], region: RegionOptions, context: Context, label: str | None, num: int,
                 out: str | None, options: SamplingOptions) -> None:
    """inpaint and edit: regenerate the region of a mask (or each image's mask of a folder) or a box."""
    masks = MaskFolder(region.mask) if region.mask is not None and region.mask.is_dir() else None

    def prepare(source: Path) -> EditRequest:
        mask = None if region.mask is None else masks.mask_for(source) if masks is not None else region.mask
        return region_request(source, mask=mask, box=region.box, dilate=region.dilate, feather=region.feather,
                              match_colours=region.match_colours)

    _run(command, images, prepare, context, label, num, out, options)


# ---- several images ---------------------------------------------------------------------------
def expand_images(arguments: list[Path]) -> tuple[list[Path], bool]:
    """The image files the arguments name (a folder: its files with an image extension, sorted; a
    pattern with * ? or [ that names no file: the files it matches, sorted), each once; and whether
    this is a batch (several arguments, a folder or a pattern), where a bad image does not stop the
    others."""
    found: list[Path] = []
    batch = len(arguments) > 1
    for argument in arguments:
        if argument.is_dir():
            files = sorted(p for p in argument.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"{argument} is a folder, not an image file, and holds no images ({' '.join(IMAGE_SUFFIXES)})")
            found += files
            batch = True
        elif not argument.exists() and re.search(r"[*?\[]", str(argument)):
            files = sorted(Path(p) for p in glob.glob(str(argument)) if Path(p).is_file())
            if not files:
                raise InputError(f"no files match {argument}")
            found += files
            batch = True
        else:
            found.append(argument)  # a missing file is reported when it is read
    unique, seen = [], set()
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, batch


class MaskFolder:
    """A folder of masks: an image's mask is the file with the image's name and any image extension
    (photos/cat.jpg → masks/cat.png)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                self.by_name.setdefault(path.stem, []).append(path)

    def mask_for(self, image: Path) -> Path:
        found = self.by_name.get(image.stem, [])
        if not found:
            raise InputError(f"no mask for {image.name} in {self.folder} (looked for {image.stem}.png, .jpg …)")
        if len(found) > 1:
            raise InputError(f"{len(found)} masks for {image.name} in {self.folder} ({', '.join(p.name for p in found)}): keep one")
        if found[0].resolve() == image.resolve():
            raise InputError(f"the mask of {image.name} would be the image itself: keep the masks in a folder of their own")
        return found[0]


def planned_outputs(sources: list[Path], command: str, out: str | None, num: int, batch: bool) -> dict[Path, list[Path]]:
    """Each image's output files: --out with {name} (the image's stem) and {i}; refused before any
    work when several images would share a name."""
    template = out if out is not None else f"{{name}}-{DEFAULT_OUT_SUFFIX[command]}.png"
    if batch and "{name}" not in template:
        raise InputError("several images need {name} in --out (the image's name without extension), e.g. --out 'edited/{name}.png'")
    outputs, owner = {}, {}
    for source in sources:
        outputs[source] = output_paths(template.replace("{name}", source.stem), num)
        for path in outputs[source]:
            if path.resolve() in owner:
                raise InputError(f"{owner[path.resolve()]} and {source} would both be written to {path}: rename one, or edit them "
                                 f"in separate runs")
            owner[path.resolve()] = source
    return outputs


# ---- the run ----------------------------------------------------------------------------------
@dataclass
class Job:
    """An image between planning and writing: its planned edit (views generated `num` times each),
    where its outputs go, and the views generated so far."""

    source: Path
    planned: PlannedEdit
    paths: list[Path]
    generated: dict[int, np.ndarray] = field(default_factory=dict)  # item (variant * views + view) → (S, S, 3) uint8

    @property
    def notes(self) -> list[str]:
        return self.planned.notes


def _run(command: str, arguments: list[Path], prepare: Callable[[Path], EditRequest], context: Context, label: str | None,
         num: int, out: str | None, options: SamplingOptions) -> None:
    """Edit every image: plan each (outputs and the class are checked first, the model loads once
    the first image is planned), generate the views of all images in shared batches of one random
    stream, composite each image's variants and write them as soon as its views are done."""
    sources, batch_mode = expand_images(arguments)
    outputs = planned_outputs(sources, command, out, num, batch_mode)
    check_writable([path for paths in outputs.values() for path in paths], options.overwrite)
    # One image: its own errors (unreadable, too large, empty region) come first, before the model's
    # config is even read; in a batch they are reported per image instead.
    first = None if batch_mode else prepare(sources[0])
    config = options.checked_config()  # the class and steps are checked before the weights load
    index = None if label is None else class_index(label, config)
    run = _Run(command, options, index, num, batch_mode, context)
    tiny_note = tiny_model_note(options.model, config)
    with _images_progress(len(sources), quiet=options.as_json) as progress:
        run.progress = progress
        for source in sources:
            try:
                request = first if first is not None else prepare(source)
                planned = plan_request(request, config.tokenizer.image_size, context, num)
            except HmarError as exc:
                run.fail(source, exc)
                continue
            if tiny_note and not made_by(source, options.model):
                note(text(tiny_note))  # once: it is about the model, not this image
                tiny_note = None
            planned.notes += _output_notes(request.nature, outputs[source])
            run.add(Job(source, planned, outputs[source]))
        run.flush()
    run.finish()


class _Run:
    """The model, the random stream and the queue of views of one command."""

    def __init__(self, command: str, options: SamplingOptions, index: int | None, num: int, batch_mode: bool, context: Context):
        self.command, self.options, self.index, self.num, self.batch_mode, self.context = command, options, index, num, batch_mode, context
        self.pipe = self.settings = self.generator = None
        self.batch = options.batch_size
        self.queue: list[tuple[Job, int]] = []
        self.records: list[dict] = []
        self.failed: list[dict] = []
        self.single: dict = {}
        self.progress: Callable | None = None

    def fail(self, source: Path, exc: HmarError) -> None:
        """A bad image: fatal for one image, reported and skipped in a batch."""
        if not self.batch_mode:
            raise exc
        shown = message(exc)
        typer.echo(f"error: {shown if str(source) in shown else f'{source}: {shown}'}", err=True)
        self.failed.append({"source": str(source), "error": shown})
        self.progress(advance=1)

    def add(self, job: Job) -> None:
        if self.pipe is None:
            from hmar.sampler import make_generator

            self.pipe = self.options.load_pipeline()
            self.batch = self.batch or (job.planned.items if not self.batch_mode else EDIT_BATCH)
            self.settings = self.pipe.settings(**{**self.options.sampler_options(), "batch_size": self.batch})
            self.generator = make_generator(self.settings.seed, self.pipe.device)
        for line in map(text, job.notes):
            note(f"{job.source.name}: {line}" if self.batch_mode else line)
        self.queue += [(job, item) for item in range(job.planned.items)]
        while len(self.queue) >= self.batch:
            self._sample(self.queue[:self.batch])
            del self.queue[:self.batch]

    def flush(self) -> None:
        if self.queue:
            self._sample(self.queue)
            self.queue = []

    def _sample(self, items: list[tuple[Job, int]]) -> None:
        """One batch of views (of one or several images); images whose views are all done are written."""
        generated = sample_views(self.pipe, [job.planned.view(item) for job, item in items], self.index, self.generator,
                                 self.progress.step, **{**self.options.sampler_options(), "batch_size": self.batch})
        for (job, item), image in zip(items, generated):
            job.generated[item] = image
            if len(job.generated) == job.planned.items:
                self._write(job)

    def _write(self, job: Job) -> None:
        planned = job.planned
        try:
            edited = planned.finish([job.generated[item] for item in range(planned.items)])
            stored = edit_metadata(self.pipe, self.settings, self.index, self.command, self.context, planned, job.source.name)
            windows, enlargement = planned.window_fields()
            records = save_images(self.pipe, edited, [self.index] * self.num, job.paths, stored, self.options.overwrite,
                                  self.options.quality)
            # the JSON summary has the windows as lists of their own
            metadata = {key: value for key, value in stored.items() if key not in ("hmar:window", "hmar:enlargement")}
        except HmarError as exc:
            self.fail(job.source, exc)
            return
        finally:
            job.generated.clear()
        fields = {"size": list(edited[0].size), "window": windows, "enlargement": enlargement, "notes": [text(line) for line in job.notes]}
        if self.batch_mode:
            self.records += [{**record, "source": str(job.source), **fields} for record in records]
        else:
            self.records, self.single = records, {"metadata": metadata, **fields}
        self.progress(advance=1)

    def finish(self) -> None:
        """The closing report; exit code 1 when an image of a batch failed."""
        options = self.options
        if not self.batch_mode:
            report(options, self.pipe, self.single.pop("metadata"), self.records, **self.single)
            return
        done = len({record["source"] for record in self.records})
        total = done + len(self.failed)
        if self.pipe is not None and (self.records or options.as_json):
            shared = {"hmar:command": self.command, "hmar:context": str(self.context),
                      **settings_metadata(self.pipe, self.settings, [self.index] * self.num)}
            report(options, self.pipe, shared, self.records, failed=self.failed)
        elif options.as_json:
            print(json.dumps({"model": options.model, "command": self.command, "images": [], "failed": self.failed}))
        if self.failed:
            names = ", ".join(Path(f["source"]).name for f in self.failed)
            typer.echo(f"edited {done} of {total} images; {len(self.failed)} failed: {names}", err=True)
            raise typer.Exit(1)
        if not options.as_json:
            typer.echo(f"edited {done} of {total} images", err=True)


def _output_notes(nature: Nature, paths: list[Path]) -> list[str]:
    """What an output file cannot keep of its input: transparency in JPEG."""
    flattened = [path.name for path in paths if nature.alpha is not None and path.suffix.lower() in (".jpg", ".jpeg")]
    if not flattened:
        return []
    return [f"JPEG has no transparency: {', '.join(flattened)} shows the image on white (write .png or .webp to keep it)"]


class _ImagesProgress:
    """A transient bar on stderr counting images, its label following the sampling steps."""

    def __init__(self, progress: Progress, task):
        self.bar, self.task = progress, task

    def __call__(self, advance: int) -> None:
        self.bar.update(self.task, advance=advance)

    def step(self, event) -> None:
        self.bar.update(self.task, description=f"images (scale {event.scale + 1}, step {event.step + 1}/{event.steps_in_scale})")


@contextmanager
def _images_progress(total: int, quiet: bool) -> Iterator[_ImagesProgress]:
    """None drawn when stderr is no terminal (logs get no bar residue) or under --json."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=quiet or not err_console.is_terminal) as progress:
        yield _ImagesProgress(progress, progress.add_task("images", total=total))
