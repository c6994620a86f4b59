"""Engine example (the README's main job until the bundled model ships): load the conformance model
(random weights, 80 px) from ../shared/conformance or $HMAR_CONFORMANCE_DIR, sample its labels with the
authors' sampler semantics, and save the images side by side.

    python -m hmar.example --out samples.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hmar.checkpoints import load_models
from hmar.config import ModelConfig
from hmar.errors import HmarError
from hmar.pipeline import Pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixtures", default=os.environ.get("HMAR_CONFORMANCE_DIR", "../shared/conformance"))
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folder = Path(args.fixtures)
        data = json.loads((folder / "config.json").read_text())
        config = ModelConfig.from_dict(data, "hmar")
        pipe = Pipeline(config, *load_models(config, folder), device="auto", name="conformance-hmar")
        schedule = json.loads((folder / data["mask_schedule"]).read_text())
        gen = pipe.generate(data["labels"], schedule=schedule, seed=args.seed, top_k=8, top_p=0.9)
    except (HmarError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    row = (gen.images.permute(0, 2, 3, 1).clamp(0, 1).mul(255).round().byte().numpy())
    Image.fromarray(np.concatenate(list(row), axis=1)).save(args.out)
    print(f"wrote {args.out}: {len(row)} images of classes {gen.labels}, schedule {gen.settings.schedule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
