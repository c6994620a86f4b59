"""`hmar train data|tokenizer|stage1|stage2`: thin commands over `hmar.train`.

The same command runs on one CPU, one GPU or, under `torchrun --nproc_per_node N -m hmar_cli.app …`
(or `torchrun $(which hmar) …`), on many. Options every stage shares are added to each command by
`shared_options` (see `hmar_cli.options`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hmar.config import MAX_IMAGES_PER_CLASS, MAX_SEED, MAX_WORKERS, TokenizerConfig, TransformerConfig, tokenizer_preset
from hmar.errors import InputError
from hmar_cli.options import option_group

#: parameters (tokenizer and transformer) above which stage 1 refuses to start on the CPU without --allow-large:
#: a step of hmar-d16 takes minutes there and its checkpoint (weights, AdamW state) gigabytes
CPU_TRAIN_PARAMETERS = 150_000_000
SHARDING_HELP = "Under torchrun: ddp replicates the model on every process, fsdp shards it over them (large models)."
app = typer.Typer(help="Train a tokenizer, stage 1 (next-scale) and stage 2 (mask branch).", no_args_is_help=True)


def _shared(
    data: Path = typer.Option(..., "--data", help="Image folder in ImageNet layout (one sub-folder per class)."),
    out: Path = typer.Option(..., "--out", help="Run folder (new, or the run to --resume)."),
    steps: int = typer.Option(1000, "--steps", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Per process."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Peak learning rate (stage default if unset)."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0),
    ema_decay: float = typer.Option(0.0, "--ema", min=0.0, max=1.0, help="EMA decay of the exported weights, below 1 (0: off)."),
    export_dtype: str = typer.Option("float32", "--export-dtype", help="float32, float16 or bfloat16 weight files."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA), bf16 or fp32."),
    device: str = typer.Option("auto", "--device"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the transformer blocks (default: on CUDA)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    num_workers: int = typer.Option(2, "--workers", min=0, max=MAX_WORKERS),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=1),
    sample_every: int = typer.Option(0, "--sample-every", min=0),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint."),
) -> dict:
    return {k: v for k, v in locals().items() if v is not None}


shared_options = option_group(_shared, "shared")


def _read_section(path: Path, kind: type, what: str):
    try:
        values = json.loads(path.read_text())
        return kind(**values)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"cannot use {path} as a {what} config: {exc}") from None


def _build(config_class, **options):
    try:
        return config_class(**options)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_cpu_size(tokenizer: Path, transformer: str | TransformerConfig, device: str) -> None:
    """Refuse, before any data is read, a model that cannot train on the CPU in reasonable time."""
    from hmar.config import ModelConfig, transformer_preset
    from hmar.pipeline import resolve_device
    from hmar.train.model_folders import tokenizer_files

    if resolve_device(device).type != "cpu":
        return
    sizes = transformer_preset(transformer) if isinstance(transformer, str) else transformer
    count = ModelConfig(tokenizer_files(tokenizer)[0], sizes).parameter_count()
    if count > CPU_TRAIN_PARAMETERS:
        name = transformer if isinstance(transformer, str) else "this model"
        raise InputError(f"{name} has {count / 1e6:.0f} M parameters, too many to train on the CPU in reasonable time; train it "
                         f"on a GPU, use a small model (--model recipes/hmar-tiny/hmar.json, the bundled hmar-tiny's sizes), "
                         f"or pass --allow-large")


def _report(result) -> None:
    typer.echo(f"trained {result.steps} steps; wrote {result.exported}")


@app.command("data")
def data(
    out: Path = typer.Option(..., "--out", help="New folder for the data set."),
    images_per_class: int = typer.Option(500, "--images-per-class", min=1, max=MAX_IMAGES_PER_CLASS),
    size: int = typer.Option(64, "--size", min=64, max=512, help="Image side in pixels (64–512)."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    workers: int = typer.Option(1, "--workers", min=1, max=MAX_WORKERS, help="Processes rendering in parallel (same files for any number)."),
) -> None:
    """Write the procedural 10-class data set (shapes and patterns) anyone can regenerate offline."""
    from hmar.train import write_dataset

    typer.echo(f"wrote {write_dataset(out, images_per_class=images_per_class, size=size, seed=seed, workers=workers)}")


@app.command("tokenizer")
@shared_options
def tokenizer(
    resolution: int = typer.Option(256, "--resolution", help="Published tokenizer shape at this resolution."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON tokenizer section (sizes) instead of --resolution "
                                          "(with --init: its settings, which may change only decoder_norm_groups and beta)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this tokenizer folder, or the tokenizer of a model folder or registry model (hmar-tiny)."),
    part: str = typer.Option("all", "--train", help="all, or decoder: fine-tune only the decoder (needs --init); "
                             "every image keeps its token codes, so transformers trained on them stay valid."),
    fresh_decoder: bool = typer.Option(False, "--fresh-decoder", help="With --train decoder: start the decoder from a new "
                                       "initialisation instead of --init's weights."),
    shared: dict = None,
) -> None:
    """Train the multi-scale VQ-VAE on the images; writes <out>/tokenizer."""
    from hmar.train import TokenizerTrainConfig, run_tokenizer
    from hmar.train.model_folders import tokenizer_files

    if config:
        model = _read_section(config, TokenizerConfig, "tokenizer")
    else:
        model = tokenizer_files(init)[0] if init else tokenizer_preset(resolution)
    _report(run_tokenizer(_build(TokenizerTrainConfig, model=model, init=init, train_part=part, fresh_decoder=fresh_decoder, **shared)))


@app.command("stage1")
@shared_options
def stage1(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer folder (from `hmar train tokenizer`), a model folder, or a "
                                   "registry model's name (hmar-tiny) for its tokenizer."),
    model: str = typer.Option("hmar-d16", "--model", help="Preset (hmar-d16 …) or a JSON file with an hmar section's sizes "
                              "(recipes/hmar-tiny/hmar.json: the bundled model's). On the CPU, models above "
                              f"{CPU_TRAIN_PARAMETERS // 1_000_000} M parameters need --allow-large."),
    loss_weighting: str = typer.Option("lognormal", "--loss-weighting", help="lognormal, unweighted, equal, linear, sqrt or exp_decay."),
    token_cache: Optional[Path] = typer.Option(None, "--token-cache", help="Encode the images once into this file."),
    sharding: str = typer.Option("ddp", "--sharding", help=SHARDING_HELP),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="Replay each step as one CUDA graph: no "
                                              "launch gaps between kernels. Default: with one CUDA process."),
    allow_large: bool = typer.Option(False, "--allow-large", help="Train a model too large for the CPU there anyway."),
    shared: dict = None,
) -> None:
    """Markovian next-scale prediction; writes the model folder <out>/model."""
    from hmar.train import Stage1Config, run_stage1

    transformer = _read_section(Path(model), TransformerConfig, "transformer") if model.endswith(".json") else model
    config = _build(Stage1Config, tokenizer=tokenizer, model=transformer, loss_weighting=loss_weighting, token_cache=token_cache,
                    sharding=sharding, cuda_graph=cuda_graph, **shared)
    if not allow_large:
        _check_cpu_size(tokenizer, transformer, shared["device"])
    _report(run_stage1(config))


@app.command("stage2")
@shared_options
def stage2(
    init: Path = typer.Option(..., "--init", help="The stage-1 model folder (<stage1 out>/model)."),
    token_cache: Optional[Path] = typer.Option(None, "--token-cache"),
    sharding: str = typer.Option("ddp", "--sharding", help=SHARDING_HELP),
    shared: dict = None,
) -> None:
    """Fine-tune the mask branch (base frozen, mask ratio ~ U(0,1)); writes <out>/model."""
    from hmar.train import Stage2Config, run_stage2

    _report(run_stage2(_build(Stage2Config, init=init, token_cache=token_cache, sharding=sharding, **shared)))
