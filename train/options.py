"""What a training run is told: one dataclass per stage, sharing the options every stage has.

The CLI (`hmar train tokenizer|stage1|stage2`) fills these from its flags; the library API
(`hmar.train.run_tokenizer/run_stage1/run_stage2`) takes them directly. Sizes are per process: with
torchrun the global batch is `batch_size` times the number of processes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmar.config import MAX_SEED, MAX_WORKERS, TokenizerConfig, TransformerConfig
from hmar.policy import PRECISIONS

LOSS_WEIGHTINGS = ("lognormal", "unweighted", "equal", "linear", "sqrt", "exp_decay")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
SHARDINGS = ("ddp", "fsdp")  # see hmar.train.sharding


def _check_range(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """`value` a finite number in the interval (open or closed at each end); ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _check_count(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


TOKENIZER_PARTS = ("all", "decoder")  # what `hmar train tokenizer --train` updates


@dataclass(kw_only=True)
class TrainConfig:
    """Options every stage shares."""

    data: Path  # image folder in ImageNet layout: one sub-folder per class
    out: Path  # run folder: checkpoints, metrics.jsonl, samples/, and the exported model
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05  # on matrices only (no biases, gains or 1-d parameters)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0  # max global gradient norm; 0 turns clipping off
    ema_decay: float = 0.0  # 0: no EMA; else the exported weights are the EMA's
    export_dtype: str = "float32"  # of the exported weight files (float16 halves a shipped model)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere
    device: str = "auto"  # auto: this process's CUDA device under torchrun, else cuda:0 or cpu
    compile: bool | None = None  # torch.compile the transformer blocks (hmar.compile); None: on CUDA only
    sharding: str = "ddp"  # with several processes: ddp replicates the model, fsdp shards it (stages 1 and 2)
    seed: int = 0
    num_workers: int = 2  # image decoding processes per training process
    log_every: int = 10
    checkpoint_every: int = 500
    sample_every: int = 0  # 0: no sample grids during training (one is always written at the end)
    resume: bool = False  # continue the run in `out` from its checkpoint
    progress: bool = True  # rich progress bar on rank 0

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.betas = tuple(float(b) for b in self.betas)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {self.export_dtype!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _check_count(name, getattr(self, name), 1)
        for name in ("warmup_steps", "sample_every"):
            _check_count(name, getattr(self, name), 0)
        _check_count("num_workers", self.num_workers, 0, MAX_WORKERS)
        _check_count("seed", self.seed, 0, MAX_SEED)
        _check_range("lr", self.lr, 0, math.inf, low_open=True, high_open=True)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        _check_range("weight_decay", self.weight_decay, 0, math.inf, high_open=True)
        _check_range("grad_clip", self.grad_clip, 0, math.inf, high_open=True)
        _check_range("ema_decay", self.ema_decay, 0, 1, high_open=True)
        for beta in self.betas:
            _check_range("betas", beta, 0, 1, high_open=True)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, recorded in the run folder and compared on --resume."""
        return _jsonable(dataclasses.asdict(self))


@dataclass(kw_only=True)
class TokenizerTrainConfig(TrainConfig):
    """Train the multi-scale VQ-VAE: reconstruction + commitment losses, dead-code restarts."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    lr: float = 2e-4
    dead_code_every: int = 200  # restart unused codes every N steps (0: never)
    dead_code_threshold: float = 0.05  # a code is dead when its EMA hits per batch, over all scales, are below this
    init: Path | None = None  # start from this tokenizer or model folder's tokenizer weights
    train_part: str = "all"  # "decoder": only the decoder side learns; the codes of every image stay as `init` gives them
    fresh_decoder: bool = False  # with train_part "decoder": start the decoder side from a new initialisation, not init's weights

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("dead_code_every", self.dead_code_every, 0)
        _check_range("dead_code_threshold", self.dead_code_threshold, 0, math.inf, high_open=True)
        self.init = None if self.init is None else Path(self.init)
        if self.train_part not in TOKENIZER_PARTS:
            raise ValueError(f"the trained part must be one of {TOKENIZER_PARTS}, got {self.train_part!r}")
        if self.train_part == "decoder" and self.init is None:
            raise ValueError("training only the decoder needs the tokenizer to start from (--init FOLDER)")
        if self.fresh_decoder and self.train_part != "decoder":
            raise ValueError("a fresh decoder is for training only the decoder (--train decoder)")
        if self.sharding != "ddp":  # dead-code restarts write into the whole codebook on every process
            raise ValueError(f"the tokenizer stage trains with sharding 'ddp' only, got {self.sharding!r}")


@dataclass(kw_only=True)
class Stage1Config(TrainConfig):
    """Markovian next-scale prediction (trunk + next-scale branch)."""

    tokenizer: Path  # a tokenizer folder (from `hmar train tokenizer`) or a model folder
    model: str | TransformerConfig = "hmar-d16"  # a preset name or an explicit HMAR config
    cond_drop_rate: float = 0.1  # label dropout for classifier-free guidance
    loss_weighting: str = "lognormal"
    lognormal_mu: float = -0.7  # of ln(scale position), position = (k+1)/K in (0, 1]
    lognormal_sigma: float = 0.75
    exp_decay_rate: float = 0.5  # exp_decay: weight ∝ exp(-rate·k)
    token_cache: Path | None = None  # encode the data set once into this file and train from it
    attention: str = "auto"  # auto or a name of hmar.attention.IMPLEMENTATIONS (hmar.policy.KernelPolicy.choose)
    cuda_graph: bool | None = None  # replay each step as one CUDA graph (hmar.cuda_graph.GraphedTrainStep); None: with one CUDA process

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tokenizer = Path(self.tokenizer)
        self.token_cache = None if self.token_cache is None else Path(self.token_cache)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        _check_range("cond_drop_rate", self.cond_drop_rate, 0, 1)
        _check_range("lognormal_mu", self.lognormal_mu, -math.inf, math.inf, low_open=True, high_open=True)
        _check_range("lognormal_sigma", self.lognormal_sigma, 0, math.inf, low_open=True, high_open=True)
        _check_range("exp_decay_rate", self.exp_decay_rate, -math.inf, math.inf, low_open=True, high_open=True)


@dataclass(kw_only=True)
class Stage2Config(TrainConfig):
    """Masked-prediction fine-tuning of the mask branch, starting from a stage-1 model folder."""

    init: Path  # the stage-1 run's model folder (`<stage1 out>/model`)
    token_cache: Path | None = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init = Path(self.init)
        self.token_cache = None if self.token_cache is None else Path(self.token_cache)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
