"""How often samples of a shape model are visibly of the asked class, measured by a shape classifier.

    python recipes/hmar-tiny/evaluate.py --model hmar-tiny [--per-class 50] [--seed 3] [--steps N]
        [--cfg X] [--top-k K] [--top-p P] [--json out.json] [--grid out.png]

For a model trained on the procedural shapes of `hmar.train.synthetic` (such as the bundled hmar-tiny),
the method of "Sampling defaults" in `hmar/bundled/hmar-tiny/README.md`:

1. A small CNN (four convolutions, the first with stride 2, the others followed by max pooling, then a
   linear layer; 64 px input) is trained on the CPU
   on 5000 images of `hmar.train.synthetic.render` (seed 7, at the model's resolution) and on their
   reconstructions by the model's own tokenizer (encoded to tokens and decoded again), so that the
   tokenizer's blur does not count against a sample. Its accuracy on 600 held-out renders (seed 8)
   and on their reconstructions is reported; both should be about 100 %. The trained weights are
   cached (`--classifier`, by default in the system temp folder under a name keyed by the tokenizer
   file's hash), so later evaluations of models with the same tokenizer skip this step.
2. `--per-class` images per class are sampled with `Pipeline.generate` (the model's own sampling
   defaults unless --steps, --cfg, --top-k or --top-p are given), seed `--seed`, class by class.
3. The classifier judges every sample. Per class: the share of samples it calls the asked class, the
   share it gives the asked class a probability of at least 0.9, the mean of that probability, and
   the wrong class it names most often; then the means over classes.

The classifier always names one of the ten classes, so it is lenient (a wavy two-colour pattern may
pass as a checkerboard). At 50 samples a class's share is uncertain by about ±0.07. The classifier
adds its own uncertainty: ones trained with other seeds, epochs or layouts are all but perfect on
renders yet disagree on ambiguous samples; for hmar-tiny at its defaults their means ranged from
0.67 to 0.74, and single classes (triangles, squares, stars) by up to ±0.2. Everything is seeded:
the same arguments give the same numbers on the same kind of device.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from hmar.errors import HmarError
from hmar.hub import resolve_model
from hmar.images import image_from_array
from hmar.outputs import grid
from hmar.pipeline import Generation, Pipeline, SamplingSettings
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.synthetic import CLASSES, render

SHAPES = list(CLASSES)  # the classifier's class order
TRAIN_IMAGES, TRAIN_SEED = 5000, 7
HELD_OUT_IMAGES, HELD_OUT_SEED = 600, 8
CLASSIFIER_SIZE = 64
CLASSIFIER_WIDTHS = (16, 32, 64, 128)
EPOCHS, TRAIN_BATCH, LEARNING_RATE, CLASSIFIER_SEED = 8, 64, 2e-3, 0
RECONSTRUCTION_BATCH = 8
CONFIDENT = 0.9
GRID_SAMPLES_PER_CLASS = 8
#: everything that decides the classifier's weights besides the tokenizer: part of its cache key
CLASSIFIER_RECIPE = (f"shapes {TRAIN_IMAGES}@{TRAIN_SEED} size {CLASSIFIER_SIZE} stride-2 first, widths {CLASSIFIER_WIDTHS} "
                     f"epochs {EPOCHS} batch {TRAIN_BATCH} lr {LEARNING_RATE} seed {CLASSIFIER_SEED}")

console = Console(stderr=True)


class ShapeClassifier(nn.Module):
    """Images (B, 3, H, W) in [0, 1] at any resolution → logits over SHAPES. At 64 px: a stride-2
    convolution, three convolutions each followed by 2×2 max pooling (down to 4×4), the mean over
    positions, a linear layer."""

    def __init__(self):
        super().__init__()
        first = CLASSIFIER_WIDTHS[0]
        layers = [nn.Conv2d(3, first, 3, stride=2, padding=1), nn.BatchNorm2d(first), nn.ReLU()]
        for channels, width in itertools.pairwise(CLASSIFIER_WIDTHS):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(CLASSIFIER_WIDTHS[-1], len(SHAPES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = shrink(images) * 2 - 1
        return self.head(self.features(pixels).mean(dim=(2, 3)))


def shrink(images: torch.Tensor) -> torch.Tensor:
    """Images at the classifier's resolution (unchanged when already there)."""
    return F.interpolate(images, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def rendered_shapes(count: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` renders, the same number of each shape: (images (N, 3, size, size) in [0, 1], labels)."""
    per_shape = count // len(SHAPES)
    images, labels = [], []
    with progress_bar() as progress:
        for label in progress.track(range(len(SHAPES)), description=f"rendering {count} shapes (seed {seed})"):
            for index in range(per_shape):
                images.append(np.asarray(render(SHAPES[label], index, seed=seed, size=size)))
                labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return pixels, torch.tensor(labels)


@torch.no_grad()
def reconstructions(tokenizer: MultiScaleVQVAE, images: torch.Tensor) -> torch.Tensor:
    """`images` (in [0, 1]) encoded to tokens and decoded by the tokenizer, at the classifier's resolution."""
    device = next(tokenizer.parameters()).device
    parts = []
    with progress_bar() as progress:
        for start in progress.track(range(0, len(images), RECONSTRUCTION_BATCH), description=f"reconstructing {len(images)} images"):
            batch = images[start:start + RECONSTRUCTION_BATCH].to(device) * 2 - 1
            decoded = tokenizer.decode_tokens(tokenizer.encode(batch)).float()
            parts.append(shrink((decoded.cpu() + 1) / 2))
    return torch.cat(parts)


def train_classifier(images: torch.Tensor, labels: torch.Tensor) -> ShapeClassifier:
    torch.manual_seed(CLASSIFIER_SEED)
    classifier = ShapeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=LEARNING_RATE)
    steps = EPOCHS * -(-len(images) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=steps)
    order = torch.Generator().manual_seed(CLASSIFIER_SEED)
    classifier.train()
    with progress_bar() as progress:
        task = progress.add_task("training the shape classifier", total=steps)
        for epoch in range(EPOCHS):
            for batch in torch.randperm(len(images), generator=order).split(TRAIN_BATCH):
                loss = F.cross_entropy(classifier(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update(task, advance=1, description=f"training the shape classifier: epoch {epoch + 1}/{EPOCHS}, loss {loss.item():.3f}")
    return classifier.eval()


@torch.no_grad()
def probabilities(classifier: ShapeClassifier, images: torch.Tensor) -> torch.Tensor:
    """(N, len(SHAPES)) class probabilities of `images` (in [0, 1])."""
    return torch.cat([classifier(batch.float()).softmax(dim=1) for batch in images.split(100)])


def accuracy(classifier: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities(classifier, images).argmax(dim=1) == labels).float().mean().item()


def classifier_cache_path(tokenizer_file: Path) -> Path:
    digest = hashlib.sha256(tokenizer_file.read_bytes() + CLASSIFIER_RECIPE.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"hmar-shape-classifier-{digest}.pt"


def shape_classifier(pipe: Pipeline, cache: Path) -> tuple[ShapeClassifier, dict[str, float]]:
    """The classifier for `pipe`'s tokenizer and its held-out accuracies: from `cache`, else trained and saved there."""
    classifier = ShapeClassifier()
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        classifier.load_state_dict(saved["weights"])
        console.print(f"shape classifier: {cache} (cached)")
        return classifier.eval(), saved["accuracy"]
    size = pipe.resolution
    train_images, train_labels = rendered_shapes(TRAIN_IMAGES, TRAIN_SEED, size)
    train_inputs = torch.cat([shrink(train_images), reconstructions(pipe.tokenizer, train_images)])
    classifier = train_classifier(train_inputs, torch.cat([train_labels, train_labels]))
    held_out, held_out_labels = rendered_shapes(HELD_OUT_IMAGES, HELD_OUT_SEED, size)
    held_out_accuracy = {
        "renders": accuracy(classifier, held_out, held_out_labels),
        "reconstructions": accuracy(classifier, reconstructions(pipe.tokenizer, held_out), held_out_labels),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": classifier.state_dict(), "accuracy": held_out_accuracy, "recipe": CLASSIFIER_RECIPE}, cache)
    console.print(f"shape classifier: trained, saved to {cache}")
    return classifier, held_out_accuracy


def class_scores(probs: torch.Tensor, asked: int, per_class: int) -> dict:
    """What the classifier says of one class's samples (`probs`: their probabilities over SHAPES)."""
    called = Counter(SHAPES[i] for i in probs.argmax(dim=1).tolist())
    wrong = [(name, count) for name, count in called.most_common() if name != SHAPES[asked]]
    return {
        "asked_class": called[SHAPES[asked]] / per_class,
        "confident": (probs[:, asked] >= CONFIDENT).float().mean().item(),
        "mean_probability": probs[:, asked].mean().item(),
        "most_common_wrong": {"class": wrong[0][0], "share": wrong[0][1] / per_class} if wrong else None,
        "called": dict(called.most_common()),
    }


def sample(pipe: Pipeline, labels: list[int], settings: SamplingSettings, options: dict) -> Generation:
    """`pipe.generate` with `options` (which `settings` resolves) under a progress bar."""
    batches = -(-len(labels) // settings.batch_size)
    with progress_bar() as progress:
        task = progress.add_task(f"sampling {len(labels)} images", total=sum(len(s) for s in settings.schedule) * batches)
        return pipe.generate(labels, progress=lambda event: progress.update(task, advance=1), **options)


def results_table(scores: dict[str, dict], means: dict[str, float], title: str, caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for column in ("class", "asked class", f"p ≥ {CONFIDENT}", "mean p", "most common wrong class"):
        table.add_column(column, justify="left" if "class" in column and column != "asked class" else "right")
    for name, s in scores.items():
        wrong = s["most_common_wrong"]
        table.add_row(name, f"{s['asked_class']:.2f}", f"{s['confident']:.2f}", f"{s['mean_probability']:.2f}",
                      f"{wrong['class']} ({wrong['share']:.2f})" if wrong else "—")
    table.add_section()
    table.add_row("mean", f"{means['asked_class']:.2f}", f"{means['confident']:.2f}", f"{means['mean_probability']:.2f}", "")
    return table


def save_grid(images: torch.Tensor, per_class: int, path: Path) -> None:
    """The first few samples of each class, one row per class."""
    columns = min(per_class, GRID_SAMPLES_PER_CLASS)
    chosen = [images[start + i] for start in range(0, len(images), per_class) for i in range(columns)]
    grid([image_from_array(image.permute(1, 2, 0).numpy()) for image in chosen], columns=columns).save(path)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME|FOLDER", help="registry name (e.g. hmar-tiny) or model folder, as for `hmar generate`")
    parser.add_argument("--per-class", type=positive_int, default=50, metavar="N", help="samples per class (default 50)")
    parser.add_argument("--seed", type=int, default=3, help="sampling seed (default 3)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--cfg", type=float, help="guidance strength (default: the model's)")
    parser.add_argument("--top-k", type=int, help="top-k filtering, 0 off (default: the model's)")
    parser.add_argument("--top-p", type=float, help="top-p filtering, 0 off (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per sampling batch (default 50; the samples depend on it)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto; the classifier always runs on the CPU")
    parser.add_argument("--classifier", type=Path, metavar="PATH", help="classifier weights: loaded if the file exists, else trained and "
                        "saved there (default: in the temp folder, named by the tokenizer's hash)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--grid", type=Path, metavar="PATH", help=f"write a PNG grid: one row per class, {GRID_SAMPLES_PER_CLASS} samples each")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    started = time.perf_counter()
    folder = resolve_model(args.model, download=True)
    pipe = Pipeline.from_folder(folder, device=args.device, name=args.model)
    class_names = list(pipe.config.class_names or [])
    if sorted(class_names) != sorted(SHAPES):
        raise SystemExit(f"{args.model} is not a model of the synthetic shapes: its classes are {class_names or 'unnamed'}, "
                         f"not {', '.join(SHAPES)}")
    options = {"steps": args.steps, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size}
    labels = [label for label in range(len(class_names)) for _ in range(args.per_class)]
    settings = pipe.settings(count=len(labels), **options)  # bad sampling options fail before the classifier is trained
    classifier, held_out_accuracy = shape_classifier(pipe, args.classifier or classifier_cache_path(folder / pipe.config.files["tokenizer"]))
    console.print(f"held-out accuracy: {held_out_accuracy['renders']:.1%} of {HELD_OUT_IMAGES} renders (seed {HELD_OUT_SEED}), "
                  f"{held_out_accuracy['reconstructions']:.1%} of their reconstructions")
    classifier_seconds = time.perf_counter() - started

    generation = sample(pipe, labels, settings, options)
    sampling_seconds = time.perf_counter() - started - classifier_seconds

    probs = probabilities(classifier, generation.images)
    scores = {name: class_scores(probs[label * args.per_class:(label + 1) * args.per_class], SHAPES.index(name), args.per_class)
              for label, name in enumerate(class_names)}
    means = {key: sum(s[key] for s in scores.values()) / len(scores) for key in ("asked_class", "confident", "mean_probability")}
    title = f"{args.model}: {sum(map(len, settings.schedule))} steps, cfg {settings.cfg:g}, top-k {settings.top_k}, top-p {settings.top_p:g}"
    Console().print(results_table(scores, means, title, caption=f"{args.per_class} samples per class, seed {args.seed}"))
    console.print(f"{time.perf_counter() - started:.0f} s in all: classifier {classifier_seconds:.0f} s, sampling {sampling_seconds:.0f} s")

    if args.grid:
        save_grid(generation.images, args.per_class, args.grid)
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "per_class": args.per_class, "sampling": settings.as_dict(), "device": str(pipe.device),
            "classifier": {"held_out_accuracy": held_out_accuracy, "recipe": CLASSIFIER_RECIPE, "confident_probability": CONFIDENT},
            "classes": scores, "mean": means,
            "seconds": {"classifier": classifier_seconds, "sampling": sampling_seconds},
        }, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except HmarError as error:  # a problem the user can fix (unknown model, bad sampling option): one line
        raise SystemExit(f"error: {error}") from None
