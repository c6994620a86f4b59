"""Model sizes as dataclasses, the on-disk `config.json` form, and presets for the published models.

A model folder's `config.json` has a `tokenizer` section, exactly one of `hmar` / `var`, and optionally
`files` (weight file names), `class_names` and `sampling` defaults. The conformance fixtures use the
same schema, so `ModelConfig.from_dict(json.load(...))` reads them too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmar.errors import ConfigError

# Scale sizes (token-map side lengths) per image resolution, as VAR/HMAR use them (downsampling 16).
PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

FAMILIES = ("hmar", "var")


@dataclass(frozen=True)
class TokenizerConfig:
    """VAR's multi-scale residual VQ-VAE (defaults: the published vae_ch160v4096z32 at 256 px)."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: width of a code vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    quant_resi: float = 0.5  # φ(h) = (1 - r)·h + r·conv(h)
    share_quant_resi: int = 4  # number of φ convolutions shared across scales
    patch_nums: tuple[int, ...] = PATCH_NUMS[256]
    image_size: int = 256
    beta: float = 0.25  # commitment loss weight (training only)
    # GroupNorm groups of the decoder (VAR's 32). A narrow decoder needs fewer: with one channel per
    # group the norm erases each feature map's per-image mean and scale, and the decoder learns to
    # smuggle them past it in a spike of activation at a fixed position, which shows in every image.
    decoder_norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(c) for c in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.patch_nums or any(p <= 0 for p in self.patch_nums):
            raise ConfigError(f"patch_nums must be positive, got {self.patch_nums}")
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ConfigError(f"patch_nums must be strictly increasing, got {self.patch_nums}")
        if any(self.ch * m % 32 for m in self.ch_mult):  # the VQ-VAE's GroupNorms use 32 groups
            raise ConfigError(f"ch {self.ch} times each of ch_mult {self.ch_mult} must be a multiple of 32")
        if self.decoder_norm_groups <= 0 or any(self.ch * m % self.decoder_norm_groups for m in self.ch_mult):
            raise ConfigError(f"decoder_norm_groups {self.decoder_norm_groups} must be positive and divide ch {self.ch} times each of ch_mult {self.ch_mult}")
        if self.image_size != self.patch_nums[-1] * self.downsample:
            raise ConfigError(
                f"image_size {self.image_size} does not match patch_nums[-1]={self.patch_nums[-1]} "
                f"times the downsampling factor {self.downsample}"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)


@dataclass(frozen=True)
class TransformerConfig:
    """An HMAR or VAR transformer. HMAR splits `depth` into depth-2·branch_depth… see `base_depth`."""

    family: str = "hmar"
    depth: int = 16
    width: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1  # label dropout for classifier-free guidance (training)
    drop_path_rate: float = 0.0
    branch_depth: int = 8  # HMAR only: blocks in each of the next-scale and mask branches

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.family == "hmar" and not 0 < self.branch_depth <= self.depth:
            raise ConfigError(f"branch_depth {self.branch_depth} must be in 1..depth ({self.depth})")

    @property
    def base_depth(self) -> int:
        """HMAR's shared trunk: the first depth - branch_depth blocks (the published split)."""
        return self.depth - self.branch_depth

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: tokenizer plus one transformer, with optional files, class names and defaults."""

    tokenizer: TokenizerConfig
    transformer: TransformerConfig
    files: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.transformer.family

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.tokenizer.patch_nums

    # ---- on-disk form -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str | None = None) -> "ModelConfig":
        """Read the config.json schema. `family` picks a section when both are present (fixtures)."""
        if not isinstance(data, dict) or "tokenizer" not in data:
            raise ConfigError("config has no 'tokenizer' section")
        present = [f for f in FAMILIES if f in data]
        if family is None:
            if len(present) != 1:
                raise ConfigError(f"config must have exactly one of 'hmar' / 'var' sections, found {present or 'none'}")
            family = present[0]
        elif family not in present:
            raise ConfigError(f"config has no {family!r} section")
        tokenizer = _build(TokenizerConfig, data["tokenizer"], "tokenizer")
        section = dict(data[family])
        if family == "var":
            section.pop("branch_depth", None)
        transformer = _build(TransformerConfig, {**section, "family": family}, family)
        names = data.get("class_names")
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != transformer.num_classes:
                raise ConfigError(f"class_names has {len(names)} entries but the model has {transformer.num_classes} classes")
        files = data.get("files", {})
        if not isinstance(files, dict):
            raise ConfigError("'files' must map roles (tokenizer, hmar/var) to file names")
        return cls(tokenizer, transformer, dict(files), names, dict(data.get("sampling", {})))

    def to_dict(self) -> dict[str, Any]:
        transformer = dataclasses.asdict(self.transformer)
        family = transformer.pop("family")
        if family == "var":
            transformer.pop("branch_depth")
        out: dict[str, Any] = {"tokenizer": _jsonable(dataclasses.asdict(self.tokenizer)), family: transformer}
        if self.files:
            out["files"] = dict(self.files)
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        if self.sampling:
            out["sampling"] = dict(self.sampling)
        return out

    @classmethod
    def load(cls, path: str | Path, family: str | None = None) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(data, family)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _build(kind: type, values: Any, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be an object")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in config section {section!r}: {', '.join(unknown)}")
    try:
        return kind(**values)
    except TypeError as exc:
        raise ConfigError(f"bad config section {section!r}: {exc}") from None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---- presets for the published weights ----------------------------------------------------------
def tokenizer_preset(resolution: int = 256) -> TokenizerConfig:
    """The shared published tokenizer (vae_ch160v4096z32) at a resolution with known patch_nums."""
    if resolution not in PATCH_NUMS:
        raise ConfigError(f"no patch_nums preset for {resolution} px; known: {sorted(PATCH_NUMS)}")
    return TokenizerConfig(patch_nums=PATCH_NUMS[resolution], image_size=resolution)


def transformer_preset(name: str) -> TransformerConfig:
    """`hmar-d16` … `var-d30`: width 64·depth, depth heads, head dim 64 (as published)."""
    try:
        family, depth_text = name.split("-d")
        depth = int(depth_text)
    except ValueError:
        raise ConfigError(f"unknown preset {name!r}; expected e.g. hmar-d16 or var-d20") from None
    if family not in FAMILIES or depth not in (16, 20, 24, 30):
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    return TransformerConfig(family=family, depth=depth, width=64 * depth, num_heads=depth)


def model_preset(name: str, resolution: int = 256) -> ModelConfig:
    return ModelConfig(tokenizer_preset(resolution), transformer_preset(name))


PRESET_NAMES = tuple(f"{family}-d{d}" for family in FAMILIES for d in (16, 20, 24, 30))
