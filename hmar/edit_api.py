"""Editing images of any size and mode with a loaded model: inpainting, outpainting and class-
conditional region edits, from PIL images (or arrays, tensors, files) to PIL images with the
metadata and notes the CLI writes and prints.

An edit is a request (`EditRequest`: the picture the model works on, what to regenerate, how the
result is blended in), planned into the model's square views (`plan_request`, through
`hmar.edit_window.plan_edit`), sampled in batches of views (`sample_views`) and put back at the image's
size with the input's nature (`PlannedEdit.finish`). `edit_image` does all of it for one image, which
is what `Pipeline.inpaint`, `Pipeline.outpaint` and `Pipeline.edit_region` are; the CLI uses the
same pieces so that the views of many images share batches.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np  # torch and cv2 are imported where used: the CLI imports this module to start
from PIL import Image, ImageOps

from hmar.config import ModelConfig, format_size, is_integer, memory_budget
from hmar.edit_window import DEFAULT_CONTEXT, Context, EditPlan, View, parse_context, plan_edit
from hmar.errors import HmarError, InputError, arg, library_spelling, worded
from hmar.images import MAX_PIXELS, Nature, image_from_array, load_mask, load_picture, mask_from_image, picture_from_image, restore_nature
from hmar.metadata import image_metadata, settings_metadata
from hmar.regions import (Box, box_mask, check_outpaint_options, check_pixels_option, check_region, clip_box, default_feather,
                          extend_canvas, outpaint_margins, parse_box, parse_size)

if TYPE_CHECKING:
    import torch

    from hmar.pipeline import Pipeline, SamplingSettings
    from hmar.sampler import ProgressCallback

#: what an edit takes as its image: a PIL image (any mode), an image file, an (H, W), (H, W, 1|3|4)
#: array or a (1|3|4, H, W) tensor (or one such in a batch of one), uint8 or float in [0, 1]
ImageLike = Any
#: what an edit takes as its mask: a mask image or file (read by `hmar.images.MASK_RULE`, resized to
#: the image with a note), or an (H, W) array or tensor of the image's size: bool (True =
#: regenerate), uint8 (above 127) or float in [0, 1] (above 0.5)
MaskLike = Any
IN_MEMORY = "(in memory)"  # the name of a mask given as an array or an unnamed image, in the metadata


@dataclass
class EditRequest:
    """One image to edit: the picture the model works on (the input, or outpainting's larger
    canvas), what to regenerate in it, and how the request reads in the outputs' metadata."""

    picture: Image.Image
    regenerate: np.ndarray  # (H, W) bool, True where pixels are generated
    metadata: dict[str, str]
    notes: tuple[str, ...]
    dilate: int = 0
    feather: int = 0
    match_colours: bool = True
    origin: tuple[int, int] = (0, 0)  # where the input image's pixel (0, 0) is in `picture`
    nature: Nature = Nature(gray=False)  # what of the input the outputs keep (grayscale, alpha)
    source: str | None = None  # the input's file name, when it came from a file


@dataclass
class EditResult:
    """An edit's outputs: `images` (one per variant, each of the input's size, or outpainting's
    canvas, and mode: L, LA, RGB or RGBA), the `metadata` the CLI stores in each (besides each
    image's own class and index: `metadata_of`), the `notes` it prints, and each view's `windows`
    (x0, y0, x1, y1 in the input's pixels) and `enlargement` (image pixels per model pixel)."""

    images: list[Image.Image]
    metadata: dict[str, str]
    notes: list[str]
    windows: list[list[int]]
    enlargement: list[float]
    labels: list[int | None]  # each image's class (None: the null class)
    own: list[dict[str, str]] = field(default_factory=list, repr=False)

    def metadata_of(self, index: int) -> dict[str, str]:
        """Everything the CLI writes into the file of image `index`."""
        return {**self.metadata, **self.own[index]}


# ---- inputs -----------------------------------------------------------------------------------
def read_image(image: ImageLike) -> tuple[Image.Image, Nature, str | None]:
    """An edit's input as upright 8-bit RGB (transparency on white), its `Nature`, and its file
    name (None unless it was given as a file)."""
    if isinstance(image, (str, os.PathLike)):
        picture, nature = load_picture(image)
        return picture, nature, Path(image).name
    if isinstance(image, Image.Image):
        _check_size(image.size, "image")
        picture, nature = picture_from_image(ImageOps.exif_transpose(image))
        return picture, nature, None
    return (*picture_from_image(_array_image(image)), None)


def _array_image(image: Any) -> Image.Image:
    """An array or tensor image (see `ImageLike`) as a PIL image of 1, 3 or 4 bands."""
    wanted = "an (H, W, 3) array, a (3, H, W) tensor (or 1 or 4 channels), uint8 or float in [0, 1]"
    pixels = _numpy(image, f"image must be a PIL image, a file or {wanted}")
    if _is_tensor(image):  # channels first, as torch keeps them
        if pixels.ndim == 4 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.ndim == 4:
            raise InputError(f"image must be one image: got a batch of {pixels.shape[0]}; edit them one at a time")
        if pixels.ndim == 3:
            pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)) or 0 in pixels.shape:
        raise InputError(f"image must be {wanted}, got shape {tuple(image.shape)}")
    _check_size((pixels.shape[1], pixels.shape[0]), "image")
    mode = "L" if pixels.ndim == 2 else {3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(_levels(pixels, "image")), mode=mode)


def _levels(pixels: np.ndarray, what: str) -> np.ndarray:
    """uint8 as it is; floats in [0, 1] rounded to 8 bits; anything else refused."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind != "f":
        raise InputError(f"{what} must be uint8 (0..255) or float in [0, 1], got {pixels.dtype}")
    if not np.isfinite(pixels).all():
        raise InputError(f"{what} holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 1:
        hint = " (pixels in 0..255: divide by 255, or pass uint8)" if low >= 0 else ""
        raise InputError(f"{what} floats must be in [0, 1], got values from {low:g} to {high:g}{hint}")
    return np.rint(pixels.astype(np.float32) * np.float32(255.0)).astype(np.uint8)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _numpy(value: Any, refusal: str) -> np.ndarray:
    """An ndarray or a torch tensor as an ndarray (on the CPU); anything else refused."""
    if _is_tensor(value):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise InputError(f"{refusal}, got {type(value).__name__}")


def _check_size(size: tuple[int, int], what: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise InputError(f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of {MAX_PIXELS:,} "
                         f"(downscale it first)")


def read_mask(mask: MaskLike, size: tuple[int, int]) -> tuple[np.ndarray, tuple[str, ...], str]:
    """The (H, W) bool region to regenerate of an image of `size` (W, H), the notes about reading it,
    and its name for the metadata."""
    if isinstance(mask, (str, os.PathLike)):
        loaded = load_mask(mask, size)
        return loaded.regenerate, loaded.notes, Path(mask).name
    if isinstance(mask, Image.Image):
        _check_size(mask.size, "mask")
        name = Path(mask.filename).name if getattr(mask, "filename", "") else IN_MEMORY
        loaded = mask_from_image(ImageOps.exif_transpose(mask), size, name)
        return loaded.regenerate, loaded.notes, name
    width, height = size
    values = _numpy(mask, f"mask must be a mask image, a file, or an ({height}, {width}) array or tensor")
    shape = tuple(values.shape)
    while values.ndim > 2 and values.shape[0] == 1:  # (1, H, W) and (1, 1, H, W): one mask, as a batch of one
        values = values[0]
    if values.ndim == 3 and values.shape[-1] == 1 and not _is_tensor(mask):
        values = values[..., 0]
    if values.ndim != 2:
        many = f" ({shape[0]} masks: one image takes one)" if len(shape) >= 3 and shape[0] > 1 else ""
        raise InputError(f"mask must be ({height}, {width}) (H, W) for this {width}x{height} image, or (1, {height}, {width}) or "
                         f"(1, 1, {height}, {width}), got shape {shape}{many}")
    if values.shape != (height, width):
        raise InputError(f"mask is {values.shape[1]}x{values.shape[0]} but the image is {width}x{height}: an array mask must "
                         f"have the image's size (a mask image is resized to it)")
    if values.dtype == np.bool_:
        regenerate = values.copy()
    else:
        regenerate = _levels(values, "mask") > 127
    if not regenerate.any():
        raise InputError("the mask selects nothing to regenerate (True, or above half, = regenerate): nothing to do")
    return regenerate, (), IN_MEMORY


def read_box(box: Any) -> Box:
    """A `Box`, four whole numbers x0, y0, x1, y1 (x1, y1 exclusive) or the text "x0,y0,x1,y1"."""
    if isinstance(box, Box):
        return box
    if isinstance(box, str):
        return parse_box(box)
    if _is_tensor(box) or isinstance(box, np.ndarray):
        box = np.asarray(box.detach().cpu() if _is_tensor(box) else box).tolist()
    if not isinstance(box, Sequence) or len(box) != 4 or not all(is_integer(v) for v in box):
        raise InputError(f"box must be four whole numbers (x0, y0, x1, y1) in pixels, x1 and y1 exclusive, got {box!r}")
    return parse_box(",".join(str(int(v)) for v in box))


def read_context(context: Context | str | int | float | None) -> Context:
    """A `Context`; "full"; whole pixels (an int, or text such as "64"); a fraction of the region's
    larger side (a float, or text such as "0.5"); None: the default."""
    if context is None:
        return DEFAULT_CONTEXT
    if isinstance(context, Context):
        return context
    if isinstance(context, bool):
        raise InputError(f"{arg('context')} must be pixels (int), a fraction (float) or 'full', got {context!r}")
    if is_integer(context):
        return parse_context(str(int(context)))
    if isinstance(context, float):
        return parse_context(repr(context))
    if isinstance(context, str):
        return parse_context(context)
    raise InputError(f"{arg('context')} must be pixels (int), a fraction (float) or 'full', got {type(context).__name__}")


# ---- requests ---------------------------------------------------------------------------------
def region_request(image: ImageLike, *, mask: MaskLike = None, box: Any = None, dilate: int = 0, feather: int | None = None,
                   match_colours: bool = True) -> EditRequest:
    """inpaint and edit: regenerate the region of `mask` or `box` (exactly one; a box reaching past
    the image is clipped to it, with a note), grown by `dilate` pixels and blended in over `feather`
    (None: `hmar.regions.default_feather`)."""
    check_region_options(mask, box, dilate, feather)
    box = None if box is None else read_box(box)  # a bad box is refused before the image is read
    picture, nature, source = read_image(image)
    if box is not None:
        box, notes = clip_box(box, picture.size)
        regenerate = box_mask(box, picture.size)
        details = {"hmar:box": f"{box.x0},{box.y0},{box.x1},{box.y1}"}
    else:
        regenerate, notes, name = read_mask(mask, picture.size)
        details = {"hmar:mask": name}
    # an empty region, or one whose model window would be too large, fails here: before the model works
    check_region(regenerate, dilate_pixels=dilate, feather_pixels=feather or 0)
    feather = default_feather(regenerate, dilate) if feather is None else int(feather)
    details.update({"hmar:dilate": str(dilate), "hmar:feather": str(feather), "hmar:match_colours": str(bool(match_colours)).lower()})
    return EditRequest(picture, regenerate, details, notes, int(dilate), feather, bool(match_colours), nature=nature, source=source)


def check_region_options(mask: Any, box: Any, dilate: int, feather: int | None) -> None:
    """What `region_request` refuses before any image is read: not exactly one of `mask` and `box`,
    a `dilate` or `feather` that is no whole number of pixels within the limit."""
    if (mask is None) == (box is None):
        raise InputError(f"give the region to regenerate as either a mask ({arg('mask')}) or a box ({arg('box')}), one of them")
    check_pixels_option("dilate", dilate)
    if feather is not None:
        check_pixels_option("feather", feather)


def outpaint_request(image: ImageLike, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                     expand: float | None = None, to: tuple[int, int] | str | None = None,
                     match_colours: bool = True) -> EditRequest:
    """Outpainting: the image on a canvas grown by sides, by a factor `expand` (centred) or to a
    size `to` (W, H) or "WxH" (centred); exactly one way. The new area is generated."""
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if not is_integer(value):
            raise InputError(f"{arg(name)} must be a whole number of pixels, got {value!r}")
    if expand is not None and (isinstance(expand, bool) or not isinstance(expand, (int, float))):
        raise InputError(f"{arg('expand')} must be a number (1.5 = half as large again), got {expand!r}")
    target = _target_size(to)
    # sizes that scale memory are refused here, before any image is read
    check_outpaint_options(left=left, right=right, top=top, bottom=bottom, expand=expand, to=target)
    original, nature, source = read_image(image)
    margins = outpaint_margins(original.size, left=left, right=right, top=top, bottom=bottom, expand=expand, to=target)
    canvas, regenerate = extend_canvas(original, margins)
    details = {"hmar:margins": f"{margins.left},{margins.top},{margins.right},{margins.bottom}",
               "hmar:source_size": f"{original.width}x{original.height}", "hmar:match_colours": str(bool(match_colours)).lower()}
    return EditRequest(canvas, regenerate, details, (), match_colours=bool(match_colours), origin=(margins.left, margins.top),
                       nature=nature, source=source)


def _target_size(to: Any) -> tuple[int, int] | None:
    if to is None:
        return None
    if isinstance(to, str):
        return parse_size(to)
    if isinstance(to, Sequence) and len(to) == 2 and all(is_integer(v) for v in to):
        return parse_size(f"{int(to[0])}x{int(to[1])}")
    raise InputError(f"{arg('to')} must be a size (width, height) or 'WIDTHxHEIGHT', got {to!r}")


# ---- planning, sampling, compositing ----------------------------------------------------------
@dataclass
class PlannedEdit:
    """A request planned into the model's views, `num` variants of it: item `v * len(views) + g` is
    view g of variant v. What the outputs need of the `EditRequest`, without the picture, which the
    plan holds."""

    plan: EditPlan
    metadata: dict[str, str]
    origin: tuple[int, int]
    nature: Nature
    # arguments named as `hmar.errors.arg` marks them: `worded(note, library_spelling)` to show one
    notes: list[str]
    num: int

    @property
    def items(self) -> int:
        return self.num * len(self.plan.views)

    def view(self, item: int) -> View:
        return self.plan.views[item % len(self.plan.views)]

    def finish(self, generated: Sequence[np.ndarray]) -> list[Image.Image]:
        """The `num` edited images from the model's outputs of all items, in item order: each
        variant's views composited back, with the input's nature (grayscale, alpha) restored."""
        views = len(self.plan.views)
        if len(generated) != self.items:
            raise ValueError(f"expected {self.items} generated views ({self.num} variants of {views}), got {len(generated)}")
        return [restore_nature(self.plan.composite(generated[v * views:(v + 1) * views]), self.nature, self.plan.alpha > 0,
                               self.origin) for v in range(self.num)]

    def window_fields(self) -> tuple[list[list[int]], list[float]]:
        """Each view's window as x0, y0, x1, y1 in the input image's pixels (outpainting: negative
        or past its size in the new area), and how much each view is enlarged from the model's
        resolution."""
        dx, dy = self.origin
        windows = [[x0 - dx, y0 - dy, x1 - dx, y1 - dy] for x0, y0, x1, y1 in (view.window.bounds for view in self.plan.views)]
        return windows, [round(view.enlargement, 2) for view in self.plan.views]


def plan_request(request: EditRequest, resolution: int, context: Context, num: int = 1) -> PlannedEdit:
    """The views a model of `resolution` px sees for `num` variants of `request`, and every note
    about the input, the region and the views."""
    plan = plan_edit(request.picture, request.regenerate, resolution, dilate_pixels=request.dilate,
                     feather_pixels=request.feather, colour_matching=request.match_colours, context=context)
    notes = [*request.notes, *plan.notes, *nature_notes(request.nature)]
    return PlannedEdit(plan, request.metadata, request.origin, request.nature, notes, num)


def nature_notes(nature: Nature) -> list[str]:
    """What no output can keep of its input."""
    return ["the image has more than 8 bits a channel: the output has 8 (the kept pixels are its 8-bit reading)"] if nature.deep else []


def sample_views(pipe: Pipeline, views: Sequence[View], label: int | None, generator: torch.Generator | None,
                 progress: ProgressCallback | None = None, **options) -> list[np.ndarray]:
    """The model's (S, S, 3) uint8 output for each view, sampled together (one batch when
    `batch_size` allows) from `generator`'s stream; `label` None: the null class."""
    import torch

    pixels = torch.from_numpy(np.stack([view.image for view in views])).permute(0, 3, 1, 2).float().div(255)
    keep = torch.from_numpy(np.stack([view.keep for view in views]))
    labels = None if label is None else [label] * len(views)
    result = pipe.edit(pixels, keep, labels, progress=progress, generator=generator, **options)
    return [np.asarray(image_from_array(image.permute(1, 2, 0).numpy())) for image in result.images]


def edit_metadata(pipe: Pipeline, settings: SamplingSettings, label: int | None, command: str, context: Context,
                  planned: PlannedEdit, source: str | None = None) -> dict[str, str]:
    """What the outputs of an edit store besides each one's class and index: the settings, the
    command, the input file's name (when there is one), the context, the request and the views."""
    windows, enlargement = planned.window_fields()
    return {**settings_metadata(pipe, settings, [label] * planned.num), "hmar:command": command,
            **({} if source is None else {"hmar:source": source}), "hmar:context": str(context), **planned.metadata,
            "hmar:window": ";".join(",".join(map(str, w)) for w in windows),
            "hmar:enlargement": ";".join(f"{e:g}" for e in enlargement)}


def tiny_model_note(model: str | None, config: ModelConfig) -> str | None:
    """The bundled demonstration model knows a few drawn shapes, nothing of photos: what to say when
    `model` (a name or folder, of `config`) is it and edits an image it did not make (None for any
    other model)."""
    from hmar import hub  # only this note needs the registry

    try:
        folder = hub.resolve_model(model)
    except (HmarError, TypeError):  # no model's name (a pipeline built from weights in memory)
        return None
    if folder.parent.resolve() != hub.BUNDLED_DIR.resolve():
        return None
    names = ", ".join(map(str, config.class_names or ()))
    return (f"{folder.name} is a demonstration model that knows only {config.transformer.num_classes} procedural shape classes "
            f"({names}), not photos: `hmar models download hmar-d16` gives the real model (then {arg('model', 'hmar-d16')})")


def made_by(image: ImageLike, model: str | None) -> bool:
    """Whether `image` (a file or a PIL image read from one) is an output of `model`: its metadata
    names it."""
    from hmar.outputs import read_metadata

    if isinstance(image, (str, os.PathLike)):
        try:
            return read_metadata(image).get("hmar:model") == model
        except HmarError:
            return False
    return isinstance(image, Image.Image) and image.info.get("hmar:model") == model


def edit_image(pipe: Pipeline, command: str, image: ImageLike, prepare: Callable[[], EditRequest], *, label: int | str | None,
               num: int, context: Context | str | int | float | None, progress: ProgressCallback | None,
               options: dict[str, Any]) -> EditResult:
    """One image's edit on `pipe` (`prepare` makes its request), `num` variants, as the CLI edits
    one image: its views sampled `batch_size` at a time (default: all of them in one batch) from one
    random stream seeded with `seed` (None: a fresh one, stored in the metadata). The arguments are
    checked before the image is read, the request before anything is sampled."""
    from hmar.pipeline import _check_options
    from hmar.sampler import make_generator

    _check_options(options)
    if isinstance(num, bool) or not is_integer(num) or num < 1:
        raise InputError(f"num must be a whole number of variants >= 1, got {num!r}")
    context = read_context(context)
    index = None if label is None else pipe.check_labels([label])[0]
    request = prepare()
    planned = plan_request(request, pipe.resolution, context, num)
    width, height = request.picture.size
    held = num * width * height * 4  # the variants at the image's size (RGBA at most), all returned together
    if held > memory_budget():
        raise InputError(f"{num} variants of a {width}x{height} image take about {format_size(held)} held together, over the "
                         f"memory budget: ask for fewer at a time")
    if options.get("seed") is None:  # an unrepeatable draw would be no use: pick a seed, so that the metadata can repeat it
        options["seed"] = secrets.randbelow(2**31)
    if options.get("batch_size") is None:
        options["batch_size"] = planned.items
    settings = pipe.settings(count=planned.items, **options)
    pipe._check_memory(min(settings.batch_size, planned.items), results=planned.items)
    generator = make_generator(settings.seed, pipe.device)
    generated: list[np.ndarray] = []
    for start in range(0, planned.items, settings.batch_size):
        views = [planned.view(item) for item in range(start, min(start + settings.batch_size, planned.items))]
        generated += sample_views(pipe, views, index, generator, progress, **options)
    images = planned.finish(generated)
    windows, enlargement = planned.window_fields()
    notes = list(planned.notes)
    tiny = tiny_model_note(pipe.name, pipe.config)
    if tiny is not None and not made_by(image, pipe.name):
        notes.insert(0, tiny)
    notes = [worded(line, library_spelling) for line in notes]
    return EditResult(images, edit_metadata(pipe, settings, index, command, context, planned, request.source), notes, windows,
                      enlargement, [index] * num, [image_metadata(pipe, index, i) for i in range(num)])
