"""The public API: a loaded model that generates and edits images.

    from hmar import Pipeline
    pipe = Pipeline.from_pretrained("hmar-d16")            # a registry name or a model folder
    result = pipe.generate([207, 281], steps=14, seed=0)   # result.images: (2, 3, H, W) in [0, 1]; result.to_pil()
    fixed = pipe.inpaint(photo, box=(40, 40, 200, 220))    # any size and mode, as `hmar inpaint`
    edited = pipe.edit(images, keep_pixels, labels=None)   # zero-shot editing at the model's resolution

`generate` and `edit` work on tensors at the model's resolution: labels are class indices (ints or an
integer tensor) or class names; images are float tensors (N, 3, H, W) in [0, 1]. `inpaint`,
`outpaint` and `edit_region` take images of any size and mode and return PIL images with their
metadata (`hmar.edit_api`). Anything else is an `InputError` naming the problem. Images are sampled
in batches of `default_batch_size` (16 at 256 px) unless `batch_size` says otherwise, and a batch
that would exceed the memory budget (`hmar.config.check_memory`) is refused before it starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from hmar.checkpoints import build_models, load_models
from hmar.classes import resolve_class
from hmar.config import DEFAULT_SAMPLING, MAX_SEED, ModelConfig, check_memory, is_integer, sampling_value
from hmar.cuda_graph import GraphedSampler
from hmar.editing import edit_target
from hmar.errors import DeviceError, InputError, arg
from hmar.inference import prepare_for_sampling
from hmar.policy import KernelPolicy
from hmar.sampler import EditTarget, ProgressCallback, SampleResult, check_finite, make_generator, sample
from hmar.schedule import Schedule, resolve_schedule

if TYPE_CHECKING:
    from PIL import Image

    from hmar.edit_api import EditResult

OPTIONS = ("steps", "schedule", "cfg", "top_k", "top_p", "seed", "batch_size")
DEFAULT_BATCH_PIXELS = 16 * 256 * 256  # a default batch holds this many output pixels: 16 images at 256 px


def default_batch_size(resolution: int) -> int:
    """Images per forward pass when the caller gives no batch size: 16 at 256 px, fewer for larger
    images (4 at 512 px, 1 at 1024 px), never the whole request."""
    return max(1, min(16, DEFAULT_BATCH_PIXELS // (resolution * resolution)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"CUDA was requested but no CUDA device is available here; use {arg('device', 'cpu')} or auto")
    return resolved


@dataclass
class SamplingSettings:
    """Everything that decides a sample besides the labels: recorded next to every image."""

    schedule: Schedule
    cfg: float
    top_k: int
    top_p: float
    seed: int | None
    batch_size: int

    def as_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "cfg": self.cfg, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "batch_size": self.batch_size}


@dataclass
class Generation:
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], on the CPU
    labels: list[int]
    settings: SamplingSettings
    tokens: list[torch.Tensor] = field(default_factory=list)  # per scale (N, pn²), on the CPU

    def to_pil(self) -> list[Image.Image]:
        """The images as 8-bit RGB PIL images (each pixel rounded to the nearest level)."""
        from hmar.images import image_from_array

        return [image_from_array(image.permute(1, 2, 0).numpy()) for image in self.images]


class Pipeline:
    """A model on a device, ready to sample. On CUDA: the transformer in bf16 (autocast, Linear weights
    stored in bf16), the decoder in float16 and channels-last with Triton norms, guidance, filtering,
    drawing and f̂ in float32 (`hmar.inference`); `compile` also compiles the transformer's blocks,
    and the decoder where it runs NCHW, as on the CPU (tens of seconds once per process, less with
    Inductor's on-disk cache; then faster sampling); `cuda_graph`
    replays generation batches as CUDA graphs from the second batch of the same settings on
    (`hmar.cuda_graph`; same images, memory held while the pipeline lives). On the CPU: float32
    throughout, the reference numerics. These choices are made once, here, as `policy`
    (`hmar.policy.KernelPolicy`)."""

    def __init__(self, config: ModelConfig, tokenizer, transformer, device: str | torch.device = "auto", name: str | None = None,
                 compile: bool = False, cuda_graph: bool = True, kernels: KernelPolicy | None = None):
        """`kernels`: the kernel policy to sample with; None chooses this device's for sampling, with
        `compile` and `cuda_graph` (`KernelPolicy.choose`); `KernelPolicy.reference()` runs the
        CPU's float32 reference path on any device."""
        self.config, self.name = config, name
        self.device = resolve_device(device)
        self.policy = KernelPolicy.choose(self.device, training=False, compile=compile, cuda_graph=cuda_graph) if kernels is None else kernels
        self.tokenizer = tokenizer.to(self.device).eval()
        self.transformer = transformer.to(self.device).eval()
        self.amp_dtype, self.compiled = self.policy.amp_dtype, self.policy.compile
        prepare_for_sampling(self.tokenizer, self.transformer, self.policy)
        graphed = self.policy.cuda_graph and self.device.type == "cuda"
        self.graphed = GraphedSampler(self.tokenizer, self.transformer, self.amp_dtype) if graphed else None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "auto", name: str | None = None, compile: bool = False,
                    cuda_graph: bool = True, kernels: KernelPolicy | None = None) -> "Pipeline":
        """A model folder (config.json + weights); registry names are `from_pretrained`'s."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            _refuse_folder(folder)
        config = ModelConfig.load(folder / "config.json")
        device = resolve_device(device)
        tokenizer, transformer = load_models(config, folder)
        return cls(config, tokenizer, transformer, device, name or folder.name, compile=compile, cuda_graph=cuda_graph, kernels=kernels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "auto", download: bool = False,
                        compile: bool = False, cuda_graph: bool = True, kernels: KernelPolicy | None = None) -> "Pipeline":
        """A registry name (hmar-d16, var-d30, hmar-tiny, …) or a model folder."""
        from hmar.hub import resolve_model

        return cls.from_folder(resolve_model(name_or_path, download=download), device, name=str(name_or_path), compile=compile,
                               cuda_graph=cuda_graph, kernels=kernels)

    @classmethod
    def random(cls, config: ModelConfig, device: str | torch.device = "auto", seed: int = 0, compile: bool = False,
               cuda_graph: bool = True, kernels: KernelPolicy | None = None) -> "Pipeline":
        """Randomly initialised weights (benchmarks, tests)."""
        torch.manual_seed(seed)
        return cls(config, *build_models(config), device=device, name="random", compile=compile, cuda_graph=cuda_graph, kernels=kernels)

    # ---- settings -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.transformer.num_classes

    @property
    def resolution(self) -> int:
        return self.config.tokenizer.image_size

    def settings(self, *, steps=None, schedule=None, cfg=None, top_k=None, top_p=None, seed=None, batch_size=None, count: int = 1) -> SamplingSettings:
        """The settings of a request for `count` images: the caller's options, else the model's
        defaults (its config's `sampling`), else hmar's; each checked, and the batch against the
        memory budget."""
        defaults = {**DEFAULT_SAMPLING, **self.config.sampling}
        if steps is None and schedule is None:
            steps, schedule = defaults.get("steps"), defaults.get("schedule")
        elif steps is not None:
            steps = sampling_value("steps", steps, "steps", InputError)
        resolved = resolve_schedule(self.config.patch_nums, steps=steps, schedule=schedule, family=self.config.family)
        top_k = sampling_value("top_k", defaults["top_k"] if top_k is None else top_k, "top-k", InputError)
        top_p = sampling_value("top_p", defaults["top_p"] if top_p is None else top_p, "top-p", InputError)
        cfg = sampling_value("cfg", defaults["cfg"] if cfg is None else cfg, "cfg", InputError)
        if seed is not None and not (is_integer(seed) and 0 <= seed <= MAX_SEED):
            raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
        if batch_size is None:
            batch_size = default_batch_size(self.resolution)
        elif not is_integer(batch_size) or batch_size <= 0:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        self._check_memory(min(batch_size, max(count, 1)))
        return SamplingSettings(resolved, cfg, top_k, top_p, None if seed is None else int(seed), batch_size)

    def _check_memory(self, batch: int, results: int = 0) -> None:
        """`check_memory` for a batch on this pipeline's device (half-precision activations and no
        attention score matrix on CUDA), and `results` images held together on the CPU."""
        cuda = self.device.type == "cuda"
        half = self.policy.amp_dtype is not None
        check_memory(self.config, batch, element_bytes=2 if half else 4, dense_attention=not cuda, results=results)

    def check_labels(self, labels: Any) -> list[int]:
        """Class indices from ints, an integer tensor or class names (as `--class` takes them);
        floats, booleans and anything else are refused rather than rounded into a class."""
        if isinstance(labels, torch.Tensor):
            if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex() or labels.dim() > 1:
                raise InputError(f"labels must be class indices (a 1-D integer tensor), got a {labels.dim()}-D {labels.dtype} tensor")
            labels = labels.reshape(-1).tolist()
        elif isinstance(labels, (str, bytes)) or is_integer(labels):
            raise InputError(f"labels must be a list of classes (one per image), got the single value {labels!r}; write [{labels!r}]")
        elif not isinstance(labels, Sequence):
            raise InputError(f"labels must be a list of class indices or names, got {type(labels).__name__}")
        out = []
        for label in labels:
            if isinstance(label, torch.Tensor) and label.dim() == 0 and not (label.dtype == torch.bool or label.is_floating_point()):
                label = label.item()
            if not (is_integer(label) or isinstance(label, str)):
                raise InputError(f"label {label!r} is not a class: give a class index (int) or a class name")
            out.append(resolve_class(label, self.num_classes, self.config.class_names))
        if not out:
            raise InputError("no labels given: pass one class per image to generate")
        return out

    # ---- sampling -----------------------------------------------------------------------------
    def generate(self, labels: Sequence[int | str] | torch.Tensor, *, progress: ProgressCallback | None = None, **options) -> Generation:
        """Sample one image per label, all returned together (a request whose images would not fit
        the memory budget together is refused: iterate `generate_batches` instead). Options:
        steps | schedule, cfg, top_k, top_p, seed, batch_size."""
        labels, settings = self._request(labels, options)
        self._check_memory(min(settings.batch_size, len(labels)), results=len(labels))
        return _joined(list(self._batches(labels, settings, None, progress)), labels, settings)

    def generate_batches(self, labels: Sequence[int | str] | torch.Tensor, *, progress: ProgressCallback | None = None,
                         **options) -> Iterator[Generation]:
        """As `generate`, but one `Generation` per batch as soon as it is sampled (the same images in
        the same order), so that any number of images can be written out as they come."""
        labels, settings = self._request(labels, options)  # checked now, not at the first batch
        return self._batches(labels, settings, None, progress)

    def _request(self, labels: Any, options: dict[str, Any]) -> tuple[list[int], SamplingSettings]:
        _check_options(options)
        labels = self.check_labels(labels)
        return labels, self.settings(count=len(labels), **options)

    def edit(
        self,
        images: torch.Tensor,
        keep_pixels: torch.Tensor,
        labels: Sequence[int | str] | torch.Tensor | None = None,
        *,
        progress: ProgressCallback | None = None,
        generator: torch.Generator | None = None,
        **options,
    ) -> Generation:
        """Regenerate what `keep_pixels` (N, H, W) or (N, 1, H, W) bool leaves out of `images`
        (N, 3, H, W) float in [0, 1] at the model resolution (images of other sizes: `inpaint`). No labels: the null class (unconditional), as VAR edits.
        `generator` (on the device) continues a random stream across calls instead of starting one
        from the seed."""
        _check_options(options)
        if isinstance(keep_pixels, torch.Tensor) and keep_pixels.dim() == 4 and keep_pixels.shape[1] == 1:
            keep_pixels = keep_pixels[:, 0]  # (N, 1, H, W), the channel axis of a mask batch
        count = self.check_edit_inputs(images, keep_pixels)
        labels = [self.num_classes] * count if labels is None else self.check_labels(labels)
        if len(labels) != count:
            raise InputError(f"edit got {count} images but {len(labels)} labels; give one label per image (or none)")
        settings = self.settings(count=count, **options)
        self._check_memory(min(settings.batch_size, count), results=count)
        return _joined(list(self._batches(labels, settings, (images, keep_pixels), progress, generator)), labels, settings)

    def inpaint(self, image, mask=None, *, box=None, label: int | str | None = None, num: int = 1, context=None, dilate: int = 0,
                feather: int | None = None, match_colours: bool = True, progress: ProgressCallback | None = None,
                **options) -> EditResult:
        """Regenerate a region of `image`, of any size and mode (a PIL image, a file, an array or a
        tensor: `hmar.edit_api.ImageLike`), given by `mask` (a mask image or file, or an (H, W) array
        or tensor: `MaskLike`) or `box` (x0, y0, x1, y1), unconditionally or as `label`, `num`
        variants; as `hmar inpaint` does, with its defaults. `context`: how much around the region
        the model sees (pixels, a fraction of the region or "full"); `dilate`, `feather` (None: a
        quarter of the narrowest region's width, at most 32) and `match_colours` as the CLI's options.
        Options: steps | schedule, cfg, top_k, top_p, seed (None: a fresh one, in the metadata),
        batch_size (views per forward pass; default all)."""
        from hmar import edit_api

        return edit_api.edit_image(self, "inpaint", image, lambda: edit_api.region_request(
            image, mask=mask, box=box, dilate=dilate, feather=feather, match_colours=match_colours),
            label=label, num=num, context=context, progress=progress, options=options)

    def edit_region(self, image, box=None, label: int | str | None = None, *, mask=None, num: int = 1, context=None,
                    dilate: int = 0, feather: int | None = None, match_colours: bool = True,
                    progress: ProgressCallback | None = None, **options) -> EditResult:
        """Regenerate the `box` (x0, y0, x1, y1) or `mask` of `image` as class `label` (required),
        as `hmar edit` does; otherwise as `inpaint`."""
        from hmar import edit_api

        if label is None:
            raise InputError("edit_region needs a label, the class the region becomes (inpaint regenerates without one)")
        return edit_api.edit_image(self, "edit", image, lambda: edit_api.region_request(
            image, mask=mask, box=box, dilate=dilate, feather=feather, match_colours=match_colours),
            label=label, num=num, context=context, progress=progress, options=options)

    def outpaint(self, image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, expand: float | None = None,
                 to=None, label: int | str | None = None, num: int = 1, context=None, match_colours: bool = True,
                 progress: ProgressCallback | None = None, **options) -> EditResult:
        """Extend `image`'s canvas by sides (pixels), by a factor `expand` (centred) or to a size `to`
        ((W, H) or "WxH", centred) and generate the new area, the original pixels kept as they are;
        as `hmar outpaint` does. Other arguments as `inpaint`."""
        from hmar import edit_api

        return edit_api.edit_image(self, "outpaint", image, lambda: edit_api.outpaint_request(
            image, left=left, right=right, top=top, bottom=bottom, expand=expand, to=to, match_colours=match_colours),
            label=label, num=num, context=context, progress=progress, options=options)

    def check_edit_inputs(self, images: Any, keep_pixels: Any) -> int:
        """The number of images of an edit request, after checking that `images` are N float
        pictures in [0, 1] at the model resolution and `keep_pixels` N bool masks of that size."""
        size = self.resolution
        wanted = f"a float tensor (N, 3, {size}, {size}) in [0, 1] (the model resolution)"
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be {wanted}, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size) or images.shape[0] == 0:
            other_size = images.dim() >= 2 and tuple(images.shape[-2:]) != (size, size)
            raise InputError(f"images must be {wanted}, got shape {tuple(images.shape)}"
                             f"{' (images of any size: Pipeline.inpaint)' if other_size else ''}")
        if not images.is_floating_point():
            hint = " (8-bit pixels: divide by 255)" if images.dtype == torch.uint8 else ""
            raise InputError(f"images must be {wanted}, got {images.dtype}{hint}")
        if not bool(torch.isfinite(images).all()):
            raise InputError("images hold NaN or infinite values")
        low, high = (float(v) for v in torch.aminmax(images))
        if low < 0 or high > 1:
            hint = " (pixels in 0..255: divide by 255)" if high > 1 and low >= 0 else " (pixels in -1..1: add 1 and halve)" if low >= -1 and high <= 1 else ""
            raise InputError(f"images must be in [0, 1], got values from {low:g} to {high:g}{hint}")
        if not isinstance(keep_pixels, torch.Tensor) or keep_pixels.dtype != torch.bool:
            got = keep_pixels.dtype if isinstance(keep_pixels, torch.Tensor) else type(keep_pixels).__name__
            raise InputError(f"keep_pixels must be a bool tensor (N, {size}, {size}), True where the image is kept, got {got}")
        if keep_pixels.dim() != 3 or tuple(keep_pixels.shape[-2:]) != (size, size):
            raise InputError(f"keep_pixels must have shape (N, {size}, {size}) or (N, 1, {size}, {size}), got {tuple(keep_pixels.shape)}")
        if keep_pixels.shape[0] != images.shape[0]:
            raise InputError(f"edit got {images.shape[0]} images but {keep_pixels.shape[0]} keep_pixels masks; give one mask per image")
        return images.shape[0]

    def _batches(self, labels: list[int], settings: SamplingSettings, edit: tuple[torch.Tensor, torch.Tensor] | None,
                 progress, generator: torch.Generator | None = None) -> Iterator[Generation]:
        """Sample `labels` batch by batch from one random stream (`generator`, else one seeded with
        the settings' seed); an edit's images are encoded a batch at a time too, so that memory
        follows the batch, never the request."""
        generator = make_generator(settings.seed, self.device) if generator is None else generator
        for start in range(0, len(labels), settings.batch_size):
            end = min(start + settings.batch_size, len(labels))
            target = None if edit is None else edit_target(self.tokenizer, *(t[start:end].to(self.device) for t in edit))
            result = self.sample_batch(torch.tensor(labels[start:end], device=self.device), settings, generator, target, progress)
            check_finite(result)  # before anything of the batch is handed out (copying it to the CPU waits for the GPU anyway)
            yield Generation(images=result.images.float().cpu(), labels=labels[start:end], settings=settings,
                             tokens=[t.cpu() for t in result.tokens])

    def sample_batch(self, labels: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None,
                     target: EditTarget | None = None, progress: ProgressCallback | None = None) -> SampleResult:
        """One batch of `labels` (on the device), through the CUDA graph when there is one and nothing
        is forced (editing samples once per image, so it would never replay)."""
        options = dict(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p, generator=generator, progress=progress)
        if self.graphed is not None and target is None:
            return self.graphed(labels, settings.schedule, **options)
        return sample(self.tokenizer, self.transformer, labels, settings.schedule, edit=target, amp_dtype=self.amp_dtype, **options)


def _refuse_folder(folder: Path) -> None:
    """A folder without config.json: a registry name given as a folder gets pointed to
    `from_pretrained`."""
    from hmar.hub import ModelNotFoundError, registry_entry

    try:
        name = registry_entry(str(folder)).name
    except ModelNotFoundError:
        name = None
    if name is not None and not folder.exists():
        raise ModelNotFoundError(f"{str(folder)!r} is a registry name, not a folder: use Pipeline.from_pretrained({name!r})")
    where = "no such folder" if not folder.exists() else "no config.json in it"
    raise ModelNotFoundError(f"no model folder at {folder} ({where}); Pipeline.from_pretrained takes a folder or a registry name")


def _joined(parts: list[Generation], labels: list[int], settings: SamplingSettings) -> Generation:
    images = torch.cat([g.images for g in parts])
    tokens = [torch.cat([g.tokens[k] for g in parts]) for k in range(len(parts[0].tokens))]
    return Generation(images=images, labels=labels, settings=settings, tokens=tokens)


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown sampling option {', '.join(unknown)}; the options are {', '.join(OPTIONS)}")
