"""How much detail an inpainted region keeps in a large photo: the context window against --context full.

    python recipes/hmar-tiny/edit_detail.py --model hmar-tiny [--photos 6] [--seed 0] [--json out.json]
    python recipes/hmar-tiny/edit_detail.py --save-photo photo.png [--index 0]        # one of the photos
    python recipes/hmar-tiny/edit_detail.py --compare out.png --box X0,Y0,X1,Y1 input.png a.png b.png …

The photos are made at run time: `--size` px (2048) renders of the classes of `hmar.train.synthetic`
(shapes drawn at 512 px, enlarged), with a fractal grain (random fields at 4, 16 and 64 px cells) and
pixel noise, so that, like a real photo, they have detail at every scale up to the pixel. Each photo
is inpainted unconditionally in a centred square box of each `--regions` size, with the model's
sampling defaults, colour matching and a hard edge (feather 0: the seam is the fill's, not a blend's),
planned and composited as `hmar inpaint` does (`hmar.edit_api`), once per `--contexts` value: the
default context window (0.5), the smallest (0.125) and `full` (the whole 2048-px square).

- detail: high-frequency energy (mean squared difference from a Gaussian blur of sigma 1.5 px, on
  luminance) inside the box, divided by the same in the 64-px ring around it: 1 = as detailed as
  its surroundings, near 0 = a smooth blur. The input's own ratio is printed beside it.
- seam: `edit_seams.seam`, the RGB step across the box's sides (levels of 255).
- enlargement: the window's side over the model's resolution.

`--compare` writes the crops of the box (with a margin of half its size) of each file side by side,
downscaled to `--crop-size` px each: the README's before/after figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from hmar.edit_api import plan_request, region_request, sample_views
from hmar.edit_window import DEFAULT_CONTEXT, parse_context
from hmar.images import load_image
from hmar.outputs import save_image
from hmar.pipeline import Pipeline
from hmar.regions import Box, box_mask, parse_box
from hmar.train.synthetic import CLASSES, render

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_seams import seam  # noqa: E402  (a sibling recipe)

GRAIN_CELLS = (4, 16, 64)  # px: the grain's scales
GRAIN_LEVELS = 10.0  # levels of 255 per scale
NOISE_LEVELS = 4.0
RING = 64
BLUR_SIGMA = 1.5


def photo(index: int, size: int = 2048) -> Image.Image:
    """A large procedural photo: shape `index` (classes in turn) with grain and noise."""
    names = list(CLASSES)
    base = np.asarray(render(names[index % len(names)], 200 + index, seed=1, size=512).resize((size, size), Image.BICUBIC),
                      dtype=np.float32)
    rng = np.random.default_rng([11, index])
    grain = sum(cv2.resize(rng.normal(0, GRAIN_LEVELS, (size // cell, size // cell)).astype(np.float32), (size, size),
                           interpolation=cv2.INTER_CUBIC) for cell in GRAIN_CELLS)
    pixels = base + grain[..., None] + rng.normal(0, NOISE_LEVELS, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def detail(pixels: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared high-pass of the luminance of (H, W, 3) `pixels` over `mask`."""
    gray = cv2.cvtColor(pixels.astype(np.float32), cv2.COLOR_RGB2GRAY)
    high = gray - cv2.GaussianBlur(gray, (0, 0), BLUR_SIGMA)
    return float((high[mask] ** 2).mean())


def detail_ratio(pixels: np.ndarray, box: Box) -> float:
    inside = box_mask(box, (pixels.shape[1], pixels.shape[0]))
    grown = cv2.dilate(inside.astype(np.uint8), np.ones((2 * RING + 1, 2 * RING + 1), np.uint8)).astype(bool)
    return detail(pixels, inside) / detail(pixels, grown & ~inside)


def centred_box(size: int, side: int) -> Box:
    start = (size - side) // 2
    return Box(start, start, start + side, start + side)


def measure(args) -> None:
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    contexts = {text: parse_context(text) for text in args.contexts}
    jobs = []  # (photo index, region side, context name, planned edit)
    pictures = [photo(i, args.size) for i in range(args.photos)]
    for side in args.regions:
        box = centred_box(args.size, side)
        for i, picture in enumerate(pictures):
            request = region_request(picture, box=box, feather=0)
            for name, context in contexts.items():
                jobs.append((i, side, name, plan_request(request, pipe.resolution, context)))
    # The pieces under Pipeline.inpaint, not it: the views of every photo, box and context share
    # batches of one random stream (as a several-image `hmar inpaint` does), where one inpaint call
    # per edit would draw each from a stream of its own.
    views = [planned.view(item) for *_, planned in jobs for item in range(planned.items)]
    outputs = sample_views(pipe, views, None, None, seed=args.seed, batch_size=args.batch_size)
    results, first = {}, 0
    for i, side, name, planned in jobs:
        edited = planned.finish(outputs[first:first + planned.items])[0]
        results[i, side, name] = (np.asarray(edited, dtype=np.float32), planned.plan.views[0].enlargement)
        first += planned.items
    rows = []
    for side in args.regions:
        box = centred_box(args.size, side)
        corners = (box.x0, box.y0, box.x1, box.y1)
        for name in contexts:
            found = {"detail": [], "seam": [], "input_detail": [], "input_seam": [], "enlargement": []}
            for i, picture in enumerate(pictures):
                result, enlargement = results[i, side, name]
                original = np.asarray(picture, dtype=np.float32)
                found["detail"].append(detail_ratio(result, box))
                found["seam"].append(seam(result, corners))
                found["input_detail"].append(detail_ratio(original, box))
                found["input_seam"].append(seam(original, corners))
                found["enlargement"].append(enlargement)
            row = {"region": side, "context": name, **{k: float(np.mean(v)) for k, v in found.items()}}
            rows.append(row)
            print(f"region {side:>4} px  context {name:<5}  enlarged {row['enlargement']:5.2f}x  detail {row['detail']:.3f} "
                  f"(input {row['input_detail']:.3f})  seam {row['seam']:5.1f} (input {row['input_seam']:4.1f})", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as stream:
            json.dump({"model": args.model, "photos": args.photos, "size": args.size, "seed": args.seed, "rows": rows}, stream, indent=1)


def compare(args) -> None:
    """The box (and half its size around it) of each file, side by side."""
    box = parse_box(args.box)
    margin = max(box.x1 - box.x0, box.y1 - box.y0) // 2
    crops = []
    for path in args.files:
        pixels = np.asarray(load_image(path))
        crop = pixels[max(0, box.y0 - margin):box.y1 + margin, max(0, box.x0 - margin):box.x1 + margin]
        crops.append(cv2.resize(crop, (args.crop_size, args.crop_size), interpolation=cv2.INTER_AREA))
    gap = np.full((args.crop_size, 8, 3), 255, np.uint8)
    row = np.concatenate([part for crop in crops for part in (crop, gap)][:-1], axis=1)
    save_image(Image.fromarray(row), args.compare, {"Description": f"crops of {args.box} (+{margin} px) of " + ", ".join(map(str, args.files))},
             overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hmar-tiny")
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--size", type=int, default=2048, help="the photos' side in px")
    parser.add_argument("--regions", type=int, nargs="+", default=[128, 512], help="box sides in px")
    parser.add_argument("--contexts", nargs="+", default=[str(DEFAULT_CONTEXT), "0.125", "full"], help="--context values to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the rows here")
    parser.add_argument("--save-photo", metavar="PATH", help="write photo --index and stop")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--compare", metavar="OUT", help="write the box's crops of FILES side by side and stop")
    parser.add_argument("--box", help="with --compare: x0,y0,x1,y1")
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    if args.save_photo:
        save_image(photo(args.index, args.size), args.save_photo, {"Description": f"edit_detail.py photo {args.index}"}, overwrite=True)
    elif args.compare:
        compare(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
