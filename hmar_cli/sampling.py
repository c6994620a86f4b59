"""What the sampling commands (generate, inpaint, outpaint, edit) share: the model and sampling
options, loading the model, the progress bar, the metadata that makes every output
reproducible, notes, and the closing report (one line, or a JSON summary with --json)."""
from __future__ import annotations

import json
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import typer
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hmar.classes import resolve_class
from hmar.config import DEFAULT_SAMPLING, MAX_SEED, ModelConfig
from hmar.errors import InputError
from hmar.metadata import image_metadata
from hmar.outputs import DEFAULT_QUALITY, save_image
from hmar.schedule import DEFAULT_STEPS, resolve_schedule
from hmar_cli.downloads import DEFAULT_MODELS, default_model, model_config, model_folder
from hmar_cli.options import option_group

if TYPE_CHECKING:  # the engine (torch) is imported by the commands that run it, not by --help
    from hmar.pipeline import Pipeline, SamplingSettings
    from hmar.sampler import ProgressCallback

err_console = Console(stderr=True)
#: images one command makes: all of them are held in memory until they are written
MAX_IMAGES = 1000
#: guidance strength: far beyond any useful value, larger ones push the guided logits towards overflow
MAX_CFG = 100.0
#: --kernels: the fast paths this device takes (hmar.policy.KernelPolicy.choose), or the float32 reference path
KERNELS = ("auto", "reference")
KERNELS_HELP = "auto: the fast paths this device takes (see `hmar env`); reference: PyTorch's float32 ops, as on the CPU, on any device."


@dataclass(frozen=True)
class SamplingOptions:
    """The options every sampling command takes (added to it by `with_sampling_options`)."""

    model: str
    steps: int | None
    schedule: str | None
    cfg: float | None
    top_k: int | None
    top_p: float | None
    seed: int
    batch_size: int | None
    device: str
    overwrite: bool
    as_json: bool
    compile: bool = False
    quality: int = DEFAULT_QUALITY
    kernels: str = "auto"  # one of KERNELS

    def sampler_options(self) -> dict:
        """The keyword arguments of `Pipeline.settings`, `generate` and `edit`."""
        return {"steps": self.steps, "schedule": self.schedule, "cfg": self.cfg, "top_k": self.top_k,
                "top_p": self.top_p, "seed": self.seed, "batch_size": self.batch_size}

    def checked_config(self) -> ModelConfig:
        """The model's config, read without loading (or downloading) its weights, with --steps or
        --schedule checked against its scales: bad requests fail before the slow part."""
        config = model_config(self.model)
        if self.steps is not None or self.schedule is not None:
            resolve_schedule(config.patch_nums, steps=self.steps, schedule=self.schedule, family=config.family)
        return config

    def load_pipeline(self) -> Pipeline:
        """A registry name (downloaded on first use) or a model folder (config.json + weights)."""
        from hmar.pipeline import Pipeline
        from hmar.policy import KernelPolicy

        folder = model_folder(self.model, err_console, quiet=self.as_json)
        kernels = KernelPolicy.reference() if self.kernels == "reference" else None
        return Pipeline.from_folder(folder, device=self.device, name=self.model, compile=self.compile, kernels=kernels)


def _sampling_options(
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="NAME|FOLDER", help="Registry name (see `hmar models ls`) or model folder (config.json + weights). "
                                        f"Default: the first of {', '.join(DEFAULT_MODELS)} that is downloaded."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help=f"Sampling steps in all, from one per scale to one per token (default: the model's, else {DEFAULT_STEPS}, the authors' choice); VAR models take exactly one per scale."),
    schedule: Optional[str] = typer.Option(None, "--schedule", metavar="SCHEDULE", help='Instead of --steps: tokens committed per step, scales separated by ";" and steps by "," '
                                   '(each scale\'s counts sum to its tokens), e.g. "1;1,3;1,1,2,5;16;25;36;64;100;169;256".'),
    cfg: Optional[float] = typer.Option(None, "--cfg", min=0.0, max=MAX_CFG, help=f"Classifier-free guidance strength, 0 to {MAX_CFG:g} (default: the model's, else {DEFAULT_SAMPLING['cfg']})."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help=f"Keep the k most likely tokens (0: off; default: the model's, else {DEFAULT_SAMPLING['top_k']})."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help=f"Nucleus filtering (0: off; default: the model's, else {DEFAULT_SAMPLING['top_p']})."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=MAX_SEED, help="Random seed, 0 to 2^64-1 (default: a fresh one, recorded in the PNG); same seed and settings give the same pixels."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, max=MAX_IMAGES, help="Images per forward pass (default: the library's, a fixed bound: never all images at once)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    quality: int = typer.Option(DEFAULT_QUALITY, "--quality", min=1, max=100, help="JPEG and WebP outputs (--out x.jpg, x.webp): compression quality, 1 to 100 (PNG is lossless)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the transformer blocks (and, on the CPU, the decoder): "
                                 "tens of seconds once per run, then faster sampling (on a GPU, for many images)."),
    kernels: str = typer.Option("auto", "--kernels", help=KERNELS_HELP),
) -> SamplingOptions:
    if steps is not None and schedule is not None:
        raise InputError("give either --steps or --schedule, not both")
    check_kernels(kernels, compile=compile)
    from hmar.pipeline import resolve_device

    resolve_device(device)  # an unknown or missing device fails before anything loads or downloads
    if model is None:
        model = default_model()
        err_console.print(f"model: {model} (the best downloaded; --model picks another)", highlight=False)
    # without a seed the draw would be unrepeatable: pick one, so that the metadata can repeat it
    seed = secrets.randbelow(2**31) if seed is None else seed
    return SamplingOptions(model, steps, schedule, cfg, top_k, top_p, seed, batch_size, device, overwrite, as_json, compile, quality, kernels)


def check_kernels(kernels: str, **flags: bool | None) -> None:
    """--kernels is one of KERNELS; the reference path runs eagerly, so it takes none of the `flags`
    given (--compile, --cuda-graph)."""
    if kernels not in KERNELS:
        raise InputError(f"--kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    if kernels == "reference" and given:
        raise InputError(f"--kernels reference runs PyTorch's ops eagerly; drop {' and '.join(given)}")


#: gives a command the shared options; it receives them as one `SamplingOptions` argument `options`
with_sampling_options = option_group(_sampling_options, "options")


@contextmanager
def sampling_progress(settings: SamplingSettings, count: int, quiet: bool) -> Iterator[ProgressCallback]:
    """A transient bar on stderr over every step of every batch of `count` images (none when
    stderr is no terminal: logs get no bar residue); yields the callback to hand to the pipeline."""
    batches = -(-count // settings.batch_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=quiet or not err_console.is_terminal) as progress:
        task = progress.add_task("sampling", total=sum(len(steps) for steps in settings.schedule) * batches)

        def advance(event) -> None:
            progress.update(task, advance=1, description=f"scale {event.scale + 1}/{len(settings.schedule)} step {event.step + 1}/{event.steps_in_scale}")

        yield advance


def class_index(value: str, config: ModelConfig) -> int:
    """`--class` (a number or a name) as the model's class index."""
    return resolve_class(value, config.transformer.num_classes, config.class_names)


#: metadata values that are numbers in the --json summary (the rest stay text)
_NUMBERS = {"seed": int, "cfg": float, "top_k": int, "top_p": float, "batch_size": int, "dilate": int, "feather": int}


def _json_value(key: str, text: str):
    if key == "classes":
        return [None if c == "none" else int(c) for c in text.split(",")]
    return _NUMBERS[key](text) if key in _NUMBERS else text


def save_images(pipe: Pipeline, images: Sequence[Image.Image], labels: Sequence[int | None], paths: Sequence[Path],
                metadata: dict[str, str], overwrite: bool, quality: int = DEFAULT_QUALITY) -> list[dict]:
    """Write each image (in the format its path names) with `metadata` and its class (None: the
    null class); one record each."""
    records = []
    for index, (image, label, path) in enumerate(zip(images, labels, paths)):
        own = image_metadata(pipe, label, index)
        save_image(image, path, {**metadata, **own}, overwrite, quality)
        records.append({"path": str(path), "class": label, "class_name": own["hmar:class_name"]})
    return records


def note(message: str) -> None:
    """Something the user should know that is no error: one line on stderr."""
    typer.echo(f"note: {message}", err=True)


def report(options: SamplingOptions, pipe: Pipeline, metadata: dict[str, str], records: list[dict],
           also_written: Sequence[Path] = (), **summary) -> None:
    """The closing report: one line on stderr, or with --json a summary on stdout (device, images,
    the settings from `metadata` and whatever `summary` adds)."""
    if options.as_json:
        settings = {key: _json_value(key, value) for key, value in
                    ((k.split(":", 1)[1], v) for k, v in metadata.items() if k.startswith("hmar:"))
                    if key not in ("model", "device")}  # both are in the summary already
        print(json.dumps({"model": pipe.name, "device": str(pipe.device), "images": records, **summary, **settings}))
    else:
        written = ", ".join(record["path"] for record in records) + "".join(f" and {path}" for path in also_written)
        err_console.print(f"wrote {len(records)} image(s): {written}", markup=False, highlight=False, soft_wrap=True)
