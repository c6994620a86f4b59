"""`hmar inpaint`, `hmar outpaint` and `hmar edit`: zero-shot editing of an image file.

The image may have any size and mode (`hmar.images.load_image`). What to regenerate comes from a
mask file, a box, or (outpainting) the canvas added around the image. `plan_edit` picks the square
window of the image the model sees and resizes it to the model's resolution; the model keeps the
tokens of the kept pixels and generates the others; the result is resized back, its colours matched
to the kept pixels at the region's edge (unless --no-match-colours), and blended in only inside the
(dilated, feathered) region, so that every other output pixel is the input's, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from PIL import Image

from hmar.errors import InputError
from hmar.images import (MASK_RULE, MAX_PIXELS, Box, box_mask, check_outpaint_options, check_pixels_option, check_region, check_writable,
                         clip_box, extend_canvas, image_from_array, load_image, load_mask, output_paths, outpaint_margins, parse_box,
                         parse_size, plan_edit)
from hmar_cli.options import option_group
from hmar_cli.sampling import SamplingOptions, class_index, note, report, sampling_progress, save_images, settings_metadata, with_sampling_options

CLASS_HELP = "Class index or name to generate as (default: unconditional, the null class)."
IMAGE_HELP = "The image to edit (any size and mode)."
NUM_HELP = "Variants to make (different draws from the one seed)."
OUT_HELP = "Output PNG (default: <image>-{}.png here); several: {{i}} in the name, else -0, -1 … appended."
DEFAULT_OUT_SUFFIX = {"inpaint": "inpainted", "outpaint": "outpainted", "edit": "edited"}


@dataclass
class EditRequest:
    """One image to edit: the picture the model works on (the input, or outpainting's larger
    canvas), what to regenerate in it, and how the request reads in the outputs' metadata."""

    command: str
    source: Path
    picture: Image.Image
    regenerate: np.ndarray  # (H, W) bool, True where pixels are generated
    metadata: dict[str, str]
    notes: tuple[str, ...]
    dilate: int = 0
    feather: int = 0
    match_colours: bool = True


MATCH_COLOURS_HELP = ("Shift the generated pixels' colours smoothly so that they meet the kept ones at the region's edge "
                      "(removes a colour cast that would show the region's outline; detail is the model's own).")


@dataclass(frozen=True)
class RegionOptions:
    """Where inpaint and edit regenerate: a mask file or a box, grown and blended."""

    mask: Path | None
    box: Box | None
    dilate: int
    feather: int
    match_colours: bool


def _region_options(
    mask: Optional[Path] = typer.Option(None, "--mask", help=f"Mask image: {MASK_RULE}. A mask of another size is resized to the image (a note says so, and "
                                        "whether it was stretched to another aspect ratio)."),
    box: Optional[str] = typer.Option(None, "--box", metavar="X0,Y0,X1,Y1", help="Region to regenerate instead of a mask: x0,y0 the top-left corner, x1,y1 the "
                                      "bottom-right, in pixels; a box reaching past the image is clipped to it (with a note)."),
    dilate: int = typer.Option(0, "--dilate", min=0, help="Grow the region by this many pixels first (covers halos around an object)."),
    feather: int = typer.Option(0, "--feather", min=0, help="Blend generated pixels in over this many pixels inside the region's edge (0: a hard edge)."),
    match_colours: bool = typer.Option(True, "--match-colours/--no-match-colours", help=MATCH_COLOURS_HELP),
) -> RegionOptions:
    if (mask is None) == (box is None):
        raise InputError("give the region to regenerate as either --mask FILE or --box x0,y0,x1,y1 (one of them)")
    check_pixels_option("dilate", dilate)
    check_pixels_option("feather", feather)
    return RegionOptions(mask, parse_box(box) if box is not None else None, dilate, feather, match_colours)


with_region_options = option_group(_region_options, "region")


@with_sampling_options
@with_region_options
def inpaint(
    image: Path = typer.Argument(..., help=IMAGE_HELP),
    label: Optional[str] = typer.Option(None, "--class", "-c", metavar="CLASS", help=CLASS_HELP),
    num: int = typer.Option(1, "--num", "-n", min=1, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("inpainted")),
    region: RegionOptions = None,
    options: SamplingOptions = None,
) -> None:
    """Regenerate a region of an image (a mask or a box), unconditionally or as a class."""
    _edit_region("inpaint", image, region, label, num, out, options)


@with_sampling_options
@with_region_options
def edit(
    image: Path = typer.Argument(..., help=IMAGE_HELP),
    label: str = typer.Option(..., "--class", "-c", metavar="CLASS", help="Class index or name the region becomes."),
    num: int = typer.Option(1, "--num", "-n", min=1, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("edited")),
    region: RegionOptions = None,
    options: SamplingOptions = None,
) -> None:
    """Class-conditional editing: regenerate a region of an image as the given class."""
    _edit_region("edit", image, region, label, num, out, options)


@with_sampling_options
def outpaint(
    image: Path = typer.Argument(..., help="The image to extend (any size and mode)."),
    left: int = typer.Option(0, "--left", help="Pixels to add on the left."),
    right: int = typer.Option(0, "--right", help="Pixels to add on the right."),
    top: int = typer.Option(0, "--top", help="Pixels to add at the top."),
    bottom: int = typer.Option(0, "--bottom", help="Pixels to add at the bottom."),
    expand: Optional[float] = typer.Option(None, "--expand", help="Grow both sides by this factor, centred (1.5: half as large again)."),
    to: Optional[str] = typer.Option(None, "--to", metavar="WxH", help=f"Grow to this size, centred: WIDTHxHEIGHT (at most {MAX_PIXELS:,} pixels)."),
    label: Optional[str] = typer.Option(None, "--class", "-c", metavar="CLASS", help=CLASS_HELP),
    num: int = typer.Option(1, "--num", "-n", min=1, help=NUM_HELP),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="PATH", help=OUT_HELP.format("outpainted")),
    match_colours: bool = typer.Option(True, "--match-colours/--no-match-colours", help=MATCH_COLOURS_HELP),
    options: SamplingOptions = None,
) -> None:
    """Extend an image's canvas and generate the new area; the original pixels stay as they are."""
    target_size = parse_size(to) if to is not None else None
    check_outpaint_options(left=left, right=right, top=top, bottom=bottom, expand=expand, to=target_size)
    paths = _checked_outputs(image, "outpaint", out, num, options)
    original = load_image(image)
    margins = outpaint_margins(original.size, left=left, right=right, top=top, bottom=bottom, expand=expand, to=target_size)
    canvas, regenerate = extend_canvas(original, margins)
    details = {"hmar:margins": f"{margins.left},{margins.top},{margins.right},{margins.bottom}",
               "hmar:source_size": f"{original.width}x{original.height}", "hmar:match_colours": str(match_colours).lower()}
    _run(EditRequest("outpaint", image, canvas, regenerate, details, (), match_colours=match_colours), label, num, paths, options)


def _edit_region(command: str, image: Path, region: RegionOptions, label: str | None, num: int, out: str | None,
                 options: SamplingOptions) -> None:
    """inpaint and edit: regenerate the region of a mask or a box."""
    paths = _checked_outputs(image, command, out, num, options)
    picture = load_image(image)
    if region.box is not None:
        box, notes = clip_box(region.box, picture.size)
        regenerate = box_mask(box, picture.size)
        details = {"hmar:box": f"{box.x0},{box.y0},{box.x1},{box.y1}"}
    else:
        loaded = load_mask(region.mask, picture.size)
        regenerate, notes = loaded.regenerate, loaded.notes
        details = {"hmar:mask": region.mask.name}
    # an empty region, or one whose model window would be too large, fails here: before the model loads
    check_region(regenerate, dilate_pixels=region.dilate, feather_pixels=region.feather)
    details.update({"hmar:dilate": str(region.dilate), "hmar:feather": str(region.feather),
                    "hmar:match_colours": str(region.match_colours).lower()})
    _run(EditRequest(command, image, picture, regenerate, details, notes, region.dilate, region.feather, region.match_colours),
         label, num, paths, options)


def _checked_outputs(image: Path, command: str, out: str | None, num: int, options: SamplingOptions) -> list[Path]:
    """The output files (default: <image stem>-inpainted.png … in the current folder), checked
    before anything is read."""
    paths = output_paths(out if out is not None else f"{image.stem}-{DEFAULT_OUT_SUFFIX[command]}.png", num)
    check_writable(paths, options.overwrite)
    return paths


def _run(request: EditRequest, label: str | None, num: int, paths: list[Path], options: SamplingOptions) -> None:
    """Load the model, edit `num` variants of the request at the model's resolution, composite each
    back at full size and write it."""
    config = options.checked_config()  # the class and steps are checked before the weights load
    index = None if label is None else class_index(label, config)
    pipe = options.load_pipeline()
    plan = plan_edit(request.picture, request.regenerate, pipe.resolution, dilate_pixels=request.dilate,
                     feather_pixels=request.feather, colour_matching=request.match_colours)
    notes = [*request.notes, *plan.notes]
    for line in notes:
        note(line)

    pixels = torch.from_numpy(plan.model_image).permute(2, 0, 1).float().div(255).repeat(num, 1, 1, 1)
    keep = torch.from_numpy(plan.model_keep).repeat(num, 1, 1)
    settings = pipe.settings(count=num, **options.sampler_options())
    with sampling_progress(settings, num, quiet=options.as_json) as progress:
        result = pipe.edit(pixels, keep, None if index is None else [index] * num, progress=progress, **options.sampler_options())

    edited = [plan.composite(image_from_array(image.permute(1, 2, 0).numpy())) for image in result.images]
    metadata = {**settings_metadata(pipe, settings, [index] * num), "hmar:command": request.command, "hmar:source": request.source.name,
                **request.metadata}
    records = save_images(pipe, edited, [index] * num, paths, metadata, options.overwrite)
    report(options, pipe, metadata, records, size=list(edited[0].size), notes=notes)
