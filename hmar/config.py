"""Model sizes as dataclasses, the on-disk `config.json` form, its validation, the memory a model
needs, and presets for the published models.

A model folder's `config.json` has a `tokenizer` section, exactly one of `hmar` / `var`, and optionally
`files` (weight file names, relative to the folder), `class_names` and `sampling` defaults. Every
field is checked (type, range, and how the fields fit together) when a config is built, and an error
names the file and the key. Keys a section does not know are refused: a misspelt key would otherwise
fall back to a default and quietly build another model. The conformance fixtures use the same
schema plus test data of their own, so `ModelConfig.from_dict(json.load(...), family)` reads them
too; `ModelConfig.load`, which reads a model folder, refuses top-level keys it does not know.

Before any weights are allocated, `check_memory` compares the parameters and an estimate of one
sampling batch's activations with a budget (`HMAR_MEMORY_BUDGET`), so that a config asking for a
billion blocks is refused at once instead of filling the machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from hmar.errors import CheckpointError, ConfigError, InputError, ScheduleError
from hmar.kernels.scales import PATCH_NUMS
from hmar.schedule import resolve_schedule

FAMILIES = ("hmar", "var")
TOP_LEVEL_KEYS = ("tokenizer", *FAMILIES, "files", "class_names", "sampling")
WEIGHT_ROLES = ("tokenizer", *FAMILIES)
# Sampling settings a model folder's config.json does not name. Here, not in hmar.pipeline, so that
# the CLI can show them in --help without importing torch or the training code.
DEFAULT_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds
# Inductor modes the training benchmark's `compile_mode` takes ("max-autotune" itself would add
# Inductor's own CUDA graphs, which the whole-step graph replaces).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Training limits, here for the same reason.
MAX_WORKERS = 64  # image decoding processes per training process: each is a whole Python process
MAX_IMAGES_PER_CLASS = 100_000  # of the synthetic data set: its whole job list is built up front


# ---- field rules ---------------------------------------------------------------------------------
# Each rule checks one value and returns it in canonical form, or raises ConfigError naming `key`.
# Booleans are refused where numbers are wanted: JSON `true` is no depth.
def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        return math.copysign(math.inf, value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(_as_float(value))


def integer_at_least(low: int) -> Callable[[str, Any], int]:
    def rule(key: str, value: Any) -> int:
        if not is_integer(value) or value < low:
            wanted = "a positive integer" if low == 1 else f"an integer of at least {low}"
            raise ConfigError(f"{key} must be {wanted}, got {_shown(value)}")
        return int(value)

    return rule


def real_in(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
            nonzero: bool = False) -> Callable[[str, Any], float]:
    def rule(key: str, value: Any) -> float:
        ok = _is_real(value)
        if ok:
            v = float(value)
            ok = ((low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open else v <= high))
                  and not (nonzero and abs(v) <= 1e-6))
        if not ok:
            lower = "" if low is None else f"{'above' if low_open else 'at least'} {low:g}"
            upper = "" if high is None else f"{'below' if high_open else 'at most'} {high:g}"
            bounds = " and ".join(b for b in (lower, upper) if b)
            wanted = "a finite number" + (" other than 0" if nonzero else "") + (f", {bounds}" if bounds else "")
            raise ConfigError(f"{key} must be {wanted}, got {_shown(value)}")
        return float(value)

    return rule


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {_shown(value)}")
    return value


def positive_integers(increasing: bool = False) -> Callable[[str, Any], tuple[int, ...]]:
    def rule(key: str, value: Any) -> tuple[int, ...]:
        wanted = "a non-empty list of positive integers" + (", strictly increasing" if increasing else "")
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} must be {wanted}, got {_shown(value)}")
        if not all(is_integer(v) and v > 0 for v in value) or (increasing and any(a >= b for a, b in zip(value, value[1:]))):
            raise ConfigError(f"{key} must be {wanted}, got {_shown(list(value))}")
        return tuple(int(v) for v in value)

    return rule


positive_integer = integer_at_least(1)

TOKENIZER_RULES = {
    "vocab_size": positive_integer,
    "z_channels": positive_integer,
    "ch": positive_integer,
    "ch_mult": positive_integers(),
    "num_res_blocks": positive_integer,
    # VAR stores no φ weights for a zero ratio, and other sharing modes under other keys
    "quant_resi": real_in(-1.0, 1.0, nonzero=True),
    "share_quant_resi": integer_at_least(2),
    "patch_nums": positive_integers(increasing=True),
    "image_size": positive_integer,
    "beta": real_in(0.0),
    "decoder_norm_groups": positive_integer,
}

TRANSFORMER_RULES = {
    "depth": positive_integer,
    "width": positive_integer,
    "num_heads": positive_integer,
    "num_classes": positive_integer,
    "mlp_ratio": real_in(0.0, low_open=True),
    "attn_l2_norm": boolean,
    "shared_aln": boolean,
    "norm_eps": real_in(0.0, low_open=True),
    "cond_drop_rate": real_in(0.0, 1.0),
    "drop_path_rate": real_in(0.0, 1.0, high_open=True),
    "branch_depth": positive_integer,
}


def _apply_rules(instance: Any, rules: dict[str, Callable[[str, Any], Any]], section: str) -> None:
    for name, rule in rules.items():
        object.__setattr__(instance, name, rule(f"{section}.{name}", getattr(instance, name)))


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
        _apply_rules(self, TOKENIZER_RULES, "tokenizer")
        if any(self.ch * m % 32 for m in self.ch_mult):  # the VQ-VAE's GroupNorms use 32 groups
            raise ConfigError(f"tokenizer.ch {self.ch} times each of tokenizer.ch_mult {list(self.ch_mult)} must be a multiple of 32")
        if any(self.ch * m % self.decoder_norm_groups for m in self.ch_mult):
            raise ConfigError(f"tokenizer.decoder_norm_groups {self.decoder_norm_groups} must divide tokenizer.ch {self.ch} "
                              f"times each of tokenizer.ch_mult {list(self.ch_mult)}")
        if self.image_size != self.patch_nums[-1] * self.downsample:
            raise ConfigError(
                f"tokenizer.image_size {self.image_size} does not match tokenizer.patch_nums[-1] = {self.patch_nums[-1]} "
                f"times the downsampling factor {self.downsample} (2 to the number of tokenizer.ch_mult entries less one)"
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
            raise ConfigError(f"unknown model family {_shown(self.family)}; expected one of {', '.join(FAMILIES)}")
        section = self.family
        _apply_rules(self, TRANSFORMER_RULES, section)
        if self.width % self.num_heads:
            raise ConfigError(f"{section}.width {self.width} is not divisible by {section}.num_heads {self.num_heads}")
        if round(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"{section}.mlp_ratio {self.mlp_ratio:g} times {section}.width {self.width} leaves no hidden units")
        if self.family == "hmar" and self.branch_depth > self.depth:
            raise ConfigError(f"hmar.branch_depth {self.branch_depth} must be in 1..hmar.depth ({self.depth})")

    @property
    def base_depth(self) -> int:
        """HMAR's shared trunk: the first depth - branch_depth blocks (the published split)."""
        return self.depth - self.branch_depth

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# ---- sampling defaults ---------------------------------------------------------------------------
SAMPLING_KEYS = ("steps", "schedule", "cfg", "top_k", "top_p")
_SAMPLING_RULES = {
    "cfg": real_in(),
    "top_k": integer_at_least(0),
    "top_p": real_in(0.0, 1.0),
    "steps": positive_integer,
}


def sampling_value(name: str, value: Any, label: str | None = None, error: type = ConfigError) -> Any:
    """`value` of the sampling setting `name` (cfg, top_k, top_p, steps) checked and in canonical
    form. The same rule serves config.json defaults and the caller's options; the error is of type
    `error` and names `label` (the config key, or the option as the caller spelled it)."""
    try:
        return _SAMPLING_RULES[name](label or name, value)
    except ConfigError as exc:
        raise error(str(exc)) from None


def check_sampling(values: Any, patch_nums: tuple[int, ...], family: str) -> dict[str, Any]:
    """A config's `sampling` section, each default checked as the matching option would be, and
    the schedule (steps or schedule) against the model's scales; errors name the config key."""
    if not isinstance(values, dict):
        raise ConfigError(f"sampling must be an object with some of {', '.join(SAMPLING_KEYS)}, got {_shown(values)}")
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"sampling has unknown keys {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
    out = {name: sampling_value(name, values[name], f"sampling.{name}") for name in _SAMPLING_RULES if name in values}
    if "steps" in values and "schedule" in values:
        raise ConfigError("sampling gives both steps and schedule; keep one")
    if "schedule" in values:
        schedule = values["schedule"]
        if isinstance(schedule, str):
            out["schedule"] = schedule
        elif isinstance(schedule, list) and all(isinstance(s, list) and all(is_integer(c) for c in s) for s in schedule):
            out["schedule"] = [[int(c) for c in s] for s in schedule]
        else:
            raise ConfigError(f"sampling.schedule must be text like \"1;1,3;4\" or a list of lists of counts, got {_shown(schedule)}")
    if "steps" in out or "schedule" in out:
        try:
            resolve_schedule(patch_nums, steps=out.get("steps"), schedule=out.get("schedule"), family=family)
        except ScheduleError as exc:
            key = "steps" if "steps" in out else "schedule"
            raise ConfigError(f"sampling.{key} does not fit the model's scales: {exc}") from None
    return out


# ---- files -----------------------------------------------------------------------------------
def _check_files(values: Any, roles: tuple[str, ...] | None) -> dict[str, str]:
    """`files`: role -> file name relative to the model folder (`roles`: the roles allowed, None: any)."""
    if not isinstance(values, dict):
        raise ConfigError(f"files must map weight roles ({', '.join(WEIGHT_ROLES)}) to file names, got {_shown(values)}")
    for role, name in values.items():
        if roles is not None and role not in roles:
            raise ConfigError(f"files.{role} is not a weight role of this model; expected {', '.join(roles)}")
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ConfigError(f"files.{role} must be a file name, got {_shown(name)}")
    return dict(values)


def weight_path(folder: Path, role: str, name: str, external_root: Path | None = None, source: str = "config") -> Path:
    """The weight file `files.<role>` names, checked: relative to the model folder, never leaving it
    (no absolute path, no `..`), an existing regular file. An absolute name is allowed only inside
    `external_root` (hmar's own folders for hub models name files in the Hugging Face cache). The
    check is on the name as written: a symlink the folder's owner put inside it is followed.
    A bad name is a ConfigError, a missing file a CheckpointError; both name `source` and the key."""
    key = f"files.{role}"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        path = Path(name)
        if external_root is None or not _inside(path, external_root):
            raise ConfigError(f"{source}: {key} must be a file name relative to the model folder, got the absolute path {_shown(name)}")
    else:
        if ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise ConfigError(f"{source}: {key} must stay inside the model folder, got {_shown(name)}")
        path = folder / name
    if not path.exists():
        raise CheckpointError(f"weight file not found: {path} ({key} of {source})")
    if not path.is_file():
        raise ConfigError(f"{source}: {key} names {_shown(name)}, which is not a regular file")
    return path


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return False
    return ".." not in path.parts


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: tokenizer plus one transformer, with optional files, class names and defaults."""

    tokenizer: TokenizerConfig
    transformer: TransformerConfig
    files: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, (str, bytes, dict)) or not isinstance(names, (list, tuple)):
                raise ConfigError(f"class_names must be a list of names, one per class, got {_shown(names)}")
            bad = next((i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()), None)
            if bad is not None:
                raise ConfigError(f"class_names[{bad}] must be a non-empty name, got {_shown(names[bad])}")
            if len(names) != self.transformer.num_classes:
                raise ConfigError(f"class_names has {len(names)} entries but {self.family}.num_classes is {self.transformer.num_classes}")
            object.__setattr__(self, "class_names", tuple(names))
        object.__setattr__(self, "sampling", check_sampling(self.sampling, self.patch_nums, self.family))

    @property
    def family(self) -> str:
        return self.transformer.family

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.tokenizer.patch_nums

    # ---- on-disk form -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str | None = None, source: str = "config",
                  strict: bool = False) -> "ModelConfig":
        """Read the config.json schema. `family` picks a section when both are present (fixtures).
        `strict` (model folders): refuse top-level keys and weight roles outside the schema. Errors
        start with `source`, the file they come from."""
        try:
            return cls._from_dict(data, family, strict)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: Any, family: str | None, strict: bool) -> "ModelConfig":
        if not isinstance(data, dict) or "tokenizer" not in data:
            raise ConfigError("no 'tokenizer' section")
        if strict:
            unknown = sorted(str(k) for k in data if k not in TOP_LEVEL_KEYS)
            if unknown:
                raise ConfigError(f"unknown keys {', '.join(unknown)}; a model folder's config.json has {', '.join(TOP_LEVEL_KEYS)}")
        present = [f for f in FAMILIES if f in data]
        if family is None:
            if len(present) != 1:
                raise ConfigError(f"must have exactly one of 'hmar' / 'var' sections, found {' and '.join(present) or 'none'}")
            family = present[0]
        elif family not in present:
            raise ConfigError(f"no {family!r} section")
        tokenizer = _build(TokenizerConfig, data["tokenizer"], "tokenizer")
        section = data[family]
        if family == "var" and isinstance(section, dict):
            section = {k: v for k, v in section.items() if k != "branch_depth"}
        transformer = _build(TransformerConfig, section, family, family=family)
        files = _check_files(data.get("files", {}), ("tokenizer", family) if strict else None)
        return cls(tokenizer, transformer, files, data.get("class_names"), data.get("sampling", {}))

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
        """A model folder's config.json, strictly (see `from_dict`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())  # NaN and Infinity parse, and the field rules refuse them by key
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot read {path}: {reason}") from None
        return cls.from_dict(data, family, source=str(path), strict=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def weight_paths(self, folder: str | Path, external_root: Path | None = None, source: str | None = None) -> dict[str, Path]:
        """The tokenizer's and the transformer's weight files, each checked by `weight_path`."""
        folder = Path(folder)
        source = source or str(folder / "config.json")
        paths = {}
        for role in ("tokenizer", self.family):
            if role not in self.files:
                raise ConfigError(f"{source}: files.{role} is missing: name the {role} weight file under 'files'")
            paths[role] = weight_path(folder, role, self.files[role], external_root, source)
        return paths

    # ---- memory ---------------------------------------------------------------------------------
    def parameter_count(self) -> int:
        """Parameters and buffers of the tokenizer and the transformer, as `build_models` makes them
        (computed from the sizes, so that an absurd config costs nothing to judge)."""
        return _tokenizer_size(self.tokenizer) + _transformer_size(self.transformer, self.tokenizer)

    def result_bytes(self) -> int:
        """What one finished image holds on the CPU: its float32 pixels and its tokens."""
        return 4 * 3 * self.tokenizer.image_size ** 2 + 8 * self.tokenizer.num_tokens

    def activation_bytes(self, batch: int, element_bytes: int = 4, dense_attention: bool = True) -> int:
        """A generous estimate of the memory one sampling (or editing) batch of `batch` images
        needs on top of the weights: the largest scale's transformer activations (both guidance
        rows, attention scores when they are materialised, the logits and their sorted copies), the
        key/value cache of VAR, and the largest feature map of the VQ-VAE at full resolution."""
        t, k = self.transformer, self.tokenizer
        rows, width = 2 * batch, t.width
        hidden = round(width * t.mlp_ratio)
        peak, context = 0, 0
        for p in k.patch_nums:
            n = p * p
            context = context + n if t.family == "var" else n
            scores = rows * t.num_heads * n * context if dense_attention else 0
            peak = max(peak, rows * n * (4 * width + hidden) + scores + 3 * rows * n * k.vocab_size)
        cache = 2 * t.depth * rows * k.num_tokens * width if t.family == "var" else 0
        side, feature = k.image_size, 0
        for level, mult in enumerate(k.ch_mult):
            feature = max(feature, 3 * batch * k.ch * mult * (side >> level) ** 2)
        lowest = (side >> (len(k.ch_mult) - 1)) ** 2
        feature = max(feature, batch * lowest * lowest)  # the pixel attention at the lowest resolution
        return (peak + cache + feature) * element_bytes


def _build(kind: type, values: Any, section: str, **extra):
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be an object, got {_shown(values)}")
    known = {f.name for f in dataclasses.fields(kind)} - set(extra)
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(f"unknown keys in {section}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return kind(**values, **extra)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---- sizes ----------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel + cout


def _resnet(cin: int, cout: int) -> int:
    return 2 * cin + _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + (_conv(cin, cout, 1) if cin != cout else 0)


def _pixel_attention(c: int) -> int:
    return 2 * c + _conv(c, 3 * c, 1) + _conv(c, c, 1)


def _middle(c: int) -> int:
    return 2 * _resnet(c, c) + _pixel_attention(c)


def _tokenizer_size(k: TokenizerConfig) -> int:
    ch, mults, z, last = k.ch, k.ch_mult, k.z_channels, len(k.ch_mult) - 1
    encoder, block_in = _conv(3, ch, 3), ch
    for i, mult in enumerate(mults):
        for _ in range(k.num_res_blocks):
            encoder += _resnet(block_in, ch * mult) + (_pixel_attention(ch * mult) if i == last else 0)
            block_in = ch * mult
        if i != last:
            encoder += _conv(block_in, block_in, 3)
    encoder += _middle(block_in) + 2 * block_in + _conv(block_in, z, 3)
    block_in = ch * mults[-1]
    decoder = _conv(z, block_in, 3) + _middle(block_in)
    for i in reversed(range(len(mults))):
        for _ in range(k.num_res_blocks + 1):
            decoder += _resnet(block_in, ch * mults[i]) + (_pixel_attention(ch * mults[i]) if i == last else 0)
            block_in = ch * mults[i]
        if i:
            decoder += _conv(block_in, block_in, 3)
    decoder += 2 * block_in + _conv(block_in, 3, 3)
    quantizer = k.vocab_size * z + k.share_quant_resi * _conv(z, z, 3) + k.num_scales * k.vocab_size
    return encoder + decoder + quantizer + 2 * _conv(z, z, 3)


def _transformer_size(t: TransformerConfig, k: TokenizerConfig) -> int:
    C, hidden, vocab, L = t.width, round(t.width * t.mlp_ratio), k.vocab_size, k.num_tokens
    block = 4 * C * C + 4 * C + (t.num_heads if t.attn_l2_norm else 0) + 2 * C * hidden + hidden + C
    block += 6 * C if t.shared_aln else 6 * C * C + 6 * C
    shared = (t.num_classes + 1) * C + k.patch_nums[0] ** 2 * C + L * C + k.num_scales * C + L + L * L
    shared += 6 * C * C + 6 * C if t.shared_aln else 0
    head = 2 * C * C + 2 * C + C * vocab + vocab
    if t.family == "hmar":
        return shared + (t.depth + t.branch_depth) * block + 2 * head + k.z_channels * C + 2 * C
    return shared + t.depth * block + head + k.z_channels * C + C


# ---- the memory budget ---------------------------------------------------------------------------
MEMORY_BUDGET_VARIABLE = "HMAR_MEMORY_BUDGET"
# bytes: room for the largest published model (hmar-d30 at 512 px) and its default batch several
# times over, while a config with absurd sizes is refused before it can fill the machine
DEFAULT_MEMORY_BUDGET = 64 * 10**9
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_budget() -> int:
    """Bytes a model and one sampling batch may need: HMAR_MEMORY_BUDGET (e.g. 128GB, 2e11), else 64 GB."""
    text = os.environ.get(MEMORY_BUDGET_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MEMORY_BUDGET
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{MEMORY_BUDGET_VARIABLE}={text!r} is not a size; write e.g. 128GB or 2e11 (bytes)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{MEMORY_BUDGET_VARIABLE}={text!r} must be a positive size")
    return int(value)


def format_size(size: float) -> str:
    """Bytes in decimal units, as the Hub shows them: 436.0 MB, 1.9 GB."""
    if size >= 10**18:  # sizes from hostile configs can be beyond float range
        return "over 1000000 TB"
    if size < 1000:
        return f"{int(size)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def check_memory(config: ModelConfig, batch: int | None = None, element_bytes: int = 4, dense_attention: bool = True,
                 source: str = "config", results: int = 0) -> None:
    """Refuse, before anything is allocated, a model (with `batch`, a sampling batch; with
    `results`, that many finished images held together on the CPU) whose estimated memory exceeds
    `memory_budget()`. A model that is too big is a ConfigError naming its largest sizes (`source`:
    where the config comes from); a batch or a request that is too big is an InputError saying what fits."""
    budget = memory_budget()
    weights = 4 * config.parameter_count()
    raise_hint = f"raise {MEMORY_BUDGET_VARIABLE} (now {format_size(budget)}) if this machine has the memory"
    if weights > budget:
        t, k = config.transformer, config.tokenizer
        raise ConfigError(
            f"{source}: the model needs about {format_size(weights)} for its weights alone ({config.family}.depth {t.depth}, "
            f"{config.family}.width {t.width}, tokenizer.vocab_size {k.vocab_size}, {k.num_tokens} tokens), over the memory budget; "
            f"check these sizes, or {raise_hint}")
    if batch is None:
        return

    def fits(batch: int, results: int = 0) -> bool:
        return weights + config.activation_bytes(batch, element_bytes, dense_attention) + results * config.result_bytes() <= budget

    size = config.tokenizer.image_size
    if not fits(batch):
        most = _largest(lambda n: fits(n), batch - 1)  # activations grow with the batch
        smaller = f"use a batch size of {most} or less" if most else "no batch fits"
        needed = weights + config.activation_bytes(batch, element_bytes, dense_attention)
        raise InputError(f"a batch of {batch} images at {size} px needs about {format_size(needed)} "
                         f"with this model, over the memory budget: {smaller}, or {raise_hint}")
    if results and not fits(batch, results):
        most = _largest(lambda n: fits(min(batch, n), n), results - 1)
        raise InputError(f"{results} images at {size} px take about {format_size(results * config.result_bytes())} held together, "
                         f"over the memory budget: ask for at most {most} at a time (or take them batch by batch), or {raise_hint}")


def _largest(ok: Callable[[int], bool], high: int) -> int:
    """The largest n in 1..high with ok(n) (ok holds up to some n and fails beyond), else 0."""
    best, low = 0, 1
    while low <= high:
        mid = (low + high) // 2
        if ok(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


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
