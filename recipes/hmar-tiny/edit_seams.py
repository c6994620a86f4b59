"""How visible the edge of an inpainted box is, with and without the editing commands' colour matching.

    python recipes/hmar-tiny/edit_seams.py --model hmar-tiny [--images 12] [--seed 0] [--json out.json]

For a model of the procedural shapes of `hmar.train.synthetic` (such as the bundled hmar-tiny), at its
resolution (128 px for hmar-tiny; the boxes below are in 128 px coordinates, scaled to others):

- images: `--images` plain backgrounds (the generator's flat colours and gradients, so the input has
  no edge at all where the box is) and as many shape images (`render`, classes in turn, seed 1);
- boxes: the centre (32,32)-(96,96) and a corner one (0,80)-(48,128);
- each image is inpainted unconditionally (`Pipeline.inpaint`) and as its class (`Pipeline.edit_region`;
  the background images as the classes in turn) with the model's sampling defaults, seed `--seed`,
  `context="full"` (the images are the model's size, so its one view is the whole image) and a hard
  edge (`feather=0`: the seam is the fill's, not a blend's), with and without colour matching; both
  composites use the same sample (same seed, same view).

The seam is the RGB distance (levels of 255) between the mean colours of the 4-pixel strips just
inside and just outside each box side that lies inside the image, averaged over sides and images.
The input's own seam is printed beside it: ~0 for backgrounds, larger for shapes, whose edges may
cross the box's. A shape drawn into the box that reaches its edge also counts, so conditional
inpainting of a centre box measures the drawing as much as the colour cast.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from hmar.pipeline import Pipeline
from hmar.train.synthetic import CLASSES, background, render

BOXES = {"centre": (32, 32, 96, 96), "corner": (0, 80, 48, 128)}  # at 128 px
STRIP = 4


def seam(pixels: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean RGB step across the sides of `box` that lie inside the (H, W, 3) image."""
    x0, y0, x1, y1 = box
    height, width = pixels.shape[:2]
    steps = []
    if y0 > 0:
        steps.append(pixels[y0:y0 + STRIP, x0:x1].mean((0, 1)) - pixels[y0 - STRIP:y0, x0:x1].mean((0, 1)))
    if y1 < height:
        steps.append(pixels[y1 - STRIP:y1, x0:x1].mean((0, 1)) - pixels[y1:y1 + STRIP, x0:x1].mean((0, 1)))
    if x0 > 0:
        steps.append(pixels[y0:y1, x0:x0 + STRIP].mean((0, 1)) - pixels[y0:y1, x0 - STRIP:x0].mean((0, 1)))
    if x1 < width:
        steps.append(pixels[y0:y1, x1 - STRIP:x1].mean((0, 1)) - pixels[y0:y1, x1:x1 + STRIP].mean((0, 1)))
    return float(np.mean([np.linalg.norm(step) for step in steps]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hmar-tiny")
    parser.add_argument("--images", type=int, default=12, help="images of each kind (backgrounds, shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also write the rows here")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    size, names = pipe.resolution, list(CLASSES)
    scale = size / 128
    pictures = {
        "background": [background(np.random.default_rng([7, i]), size)[0] for i in range(args.images)],
        "shape": [render(names[i % len(names)], 100 + i, seed=1, size=size) for i in range(args.images)],
    }
    rows = []
    for kind, images in pictures.items():
        for box_name, box in BOXES.items():
            box = tuple(round(v * scale) for v in box)
            for conditional in (False, True):
                seams = {"raw": [], "matched": [], "input": []}
                for i, picture in enumerate(images):
                    for matched, name in ((False, "raw"), (True, "matched")):
                        options = dict(context="full", feather=0, match_colours=matched, seed=args.seed)
                        edited = (pipe.edit_region(picture, box, i % len(names), **options) if conditional else
                                  pipe.inpaint(picture, box=box, **options))
                        seams[name].append(seam(np.asarray(edited.images[0], dtype=np.float32), box))
                    seams["input"].append(seam(np.asarray(picture, dtype=np.float32), box))
                row = {"images": kind, "box": box_name, "class": conditional, **{k: float(np.mean(v)) for k, v in seams.items()}}
                rows.append(row)
                print(f"{kind:<10} {box_name:<6} {'class' if conditional else 'uncond':<6}  seam raw {row['raw']:5.1f}  "
                      f"matched {row['matched']:5.1f}  (input {row['input']:4.1f})", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as stream:
            json.dump({"model": args.model, "images": args.images, "seed": args.seed, "rows": rows}, stream, indent=1)


if __name__ == "__main__":
    main()
