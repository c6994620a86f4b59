"""The public API: a loaded model that generates and edits images.

    from hmar import Pipeline
    pipe = Pipeline.from_folder("path/to/model")          # or Pipeline.from_pretrained("hmar-d16")
    result = pipe.generate([207, 281], steps=14, seed=0)   # result.images: (2, 3, H, W) in [0, 1]
    edited = pipe.edit(images, keep_pixels, labels=None)   # zero-shot inpainting / outpainting

Images here are tensors at the model's resolution; cropping, compositing and files are the caller's
(see `hmar.images` and the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from hmar.checkpoints import build_models, load_models
from hmar.config import ModelConfig
from hmar.cuda_graph import GraphedSampler
from hmar.editing import edit_target
from hmar.errors import DeviceError, InputError
from hmar.inference import prepare_for_sampling
from hmar.sampler import EditTarget, ProgressCallback, SampleResult, check_finite, make_generator, sample
from hmar.schedule import Schedule, resolve_schedule

DEFAULT_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA device is available here; use --device cpu or auto")
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


class Pipeline:
    """A model on a device, ready to sample. On CUDA: the transformer in bf16 (autocast, Linear weights
    stored in bf16), the decoder in float16 and channels-last with Triton norms, guidance, filtering,
    drawing and f̂ in float32 (`hmar.inference`); `compile` also compiles the transformer's blocks,
    and the decoder where it runs NCHW, as on the CPU (tens of seconds once per process, less with
    Inductor's on-disk cache; then faster sampling); `cuda_graph`
    replays generation batches as CUDA graphs from the second batch of the same settings on
    (`hmar.cuda_graph`; same images, memory held while the pipeline lives). On the CPU: float32
    throughout, the reference numerics."""

    def __init__(self, config: ModelConfig, tokenizer, transformer, device: str | torch.device = "auto", name: str | None = None,
                 compile: bool = False, cuda_graph: bool = True):
        self.config, self.name = config, name
        self.device = resolve_device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.transformer = transformer.to(self.device).eval()
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.compiled = compile
        prepare_for_sampling(self.tokenizer, self.transformer, self.amp_dtype, compile=compile)
        use_graph = cuda_graph and self.device.type == "cuda"
        self.graphed = GraphedSampler(self.tokenizer, self.transformer, self.amp_dtype) if use_graph else None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "auto", name: str | None = None, compile: bool = False,
                    cuda_graph: bool = True) -> "Pipeline":
        folder = Path(folder)
        config = ModelConfig.load(folder / "config.json")
        device = resolve_device(device)
        tokenizer, transformer = load_models(config, folder)
        return cls(config, tokenizer, transformer, device, name or folder.name, compile=compile, cuda_graph=cuda_graph)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device = "auto", download: bool = False,
                        compile: bool = False, cuda_graph: bool = True) -> "Pipeline":
        """A registry name (hmar-d16, var-d30, hmar-tiny, …) or a model folder."""
        from hmar.hub import resolve_model

        return cls.from_folder(resolve_model(name_or_path, download=download), device, name=str(name_or_path), compile=compile,
                               cuda_graph=cuda_graph)

    @classmethod
    def random(cls, config: ModelConfig, device: str | torch.device = "auto", seed: int = 0, compile: bool = False,
               cuda_graph: bool = True) -> "Pipeline":
        """Randomly initialised weights (benchmarks, tests)."""
        torch.manual_seed(seed)
        return cls(config, *build_models(config), device=device, name="random", compile=compile, cuda_graph=cuda_graph)

    # ---- settings -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.transformer.num_classes

    @property
    def resolution(self) -> int:
        return self.config.tokenizer.image_size

    def settings(self, *, steps=None, schedule=None, cfg=None, top_k=None, top_p=None, seed=None, batch_size=None, count: int = 1) -> SamplingSettings:
        defaults = {**DEFAULT_SAMPLING, **self.config.sampling}
        if steps is None and schedule is None:
            steps, schedule = defaults.get("steps"), defaults.get("schedule")
        resolved = resolve_schedule(self.config.patch_nums, steps=steps, schedule=schedule, family=self.config.family)
        top_k = int(defaults["top_k"] if top_k is None else top_k)
        top_p = float(defaults["top_p"] if top_p is None else top_p)
        if top_k < 0:
            raise InputError(f"top-k must be 0 (off) or positive, got {top_k}")
        if not 0.0 <= top_p <= 1.0:
            raise InputError(f"top-p must be between 0 (off) and 1, got {top_p}")
        batch_size = count if batch_size is None else int(batch_size)
        if batch_size <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}")
        cfg = float(defaults["cfg"] if cfg is None else cfg)
        return SamplingSettings(resolved, cfg, top_k, top_p, seed, batch_size)

    def check_labels(self, labels: Sequence[int]) -> list[int]:
        out = []
        for label in labels:
            if not 0 <= int(label) < self.num_classes:
                raise InputError(f"class {label} is out of range: this model has classes 0..{self.num_classes - 1}")
            out.append(int(label))
        return out

    # ---- sampling -----------------------------------------------------------------------------
    def generate(self, labels: Sequence[int], *, progress: ProgressCallback | None = None, **options) -> Generation:
        """Sample one image per label. Options: steps | schedule, cfg, top_k, top_p, seed, batch_size."""
        labels = self.check_labels(labels)
        settings = self.settings(count=len(labels), **options)
        return self._run(labels, settings, None, progress)

    def edit(
        self,
        images: torch.Tensor,
        keep_pixels: torch.Tensor,
        labels: Sequence[int] | None = None,
        *,
        progress: ProgressCallback | None = None,
        **options,
    ) -> Generation:
        """Regenerate what `keep_pixels` (B, H, W) bool leaves out of `images` (B, 3, H, W) in [0, 1]
        at the model resolution. No labels: the null class (unconditional), as VAR edits."""
        size = self.resolution
        if images.shape[-2:] != (size, size) or keep_pixels.shape[-2:] != (size, size):
            raise InputError(f"edit inputs must be {size}x{size} (the model resolution), got {tuple(images.shape[-2:])}")
        labels = [self.num_classes] * images.shape[0] if labels is None else self.check_labels(labels)
        settings = self.settings(count=len(labels), **options)
        target = edit_target(self.tokenizer, images.to(self.device), keep_pixels.to(self.device))
        return self._run(labels, settings, target, progress)

    def _run(self, labels: list[int], settings: SamplingSettings, target: EditTarget | None, progress) -> Generation:
        generator = make_generator(settings.seed, self.device)
        results: list[SampleResult] = []
        for start in range(0, len(labels), settings.batch_size):
            end = min(start + settings.batch_size, len(labels))
            part = None if target is None else EditTarget([t[start:end] for t in target.tokens], [m[start:end] for m in target.keep])
            results.append(self.sample_batch(torch.tensor(labels[start:end], device=self.device), settings, generator, part, progress))
        for result in results:  # after the last batch: checking earlier would wait for the GPU between batches
            check_finite(result)
        images = torch.cat([r.images.float().cpu() for r in results])
        tokens = [torch.cat([r.tokens[k].cpu() for r in results]) for k in range(len(self.config.patch_nums))]
        return Generation(images=images, labels=labels, settings=settings, tokens=tokens)

    def sample_batch(self, labels: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None,
                     target: EditTarget | None = None, progress: ProgressCallback | None = None) -> SampleResult:
        """One batch of `labels` (on the device), through the CUDA graph when there is one and nothing
        is forced (editing samples once per image, so it would never replay)."""
        options = dict(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p, generator=generator, progress=progress)
        if self.graphed is not None and target is None:
            return self.graphed(labels, settings.schedule, **options)
        return sample(self.tokenizer, self.transformer, labels, settings.schedule, edit=target, amp_dtype=self.amp_dtype, **options)
