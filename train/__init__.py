"""Training HMAR on class-labelled images: tokenizer, stage 1 (next-scale), stage 2 (masked).

    from hmar.train import Stage1Config, run_stage1
    result = run_stage1(Stage1Config(data="imagenet/train", out="runs/s1", tokenizer="runs/tok/tokenizer", model="hmar-d16"))

The same call runs alone, or under `torchrun --nproc_per_node N` as one of N processes (DDP, or
FSDP with `sharding="fsdp"` in stages 1 and 2: `hmar.train.sharding`).
Each run writes into its own folder: checkpoint.pt, run.json, metrics.jsonl, samples/, and at the end
`tokenizer/` (tokenizer stage) or `model/` (stages 1 and 2, a folder `hmar generate --model` loads).
"""
from __future__ import annotations

import traceback

from hmar.train.checkpoint import discard_failed_start
from hmar.train.distributed import setup
from hmar.train.loop import RunResult, StepCallback, train
from hmar.train.options import Stage1Config, Stage2Config, TokenizerTrainConfig, TrainConfig
from hmar.train.synthetic import write_dataset

__all__ = [
    "TrainConfig", "TokenizerTrainConfig", "Stage1Config", "Stage2Config", "RunResult",
    "run_tokenizer", "run_stage1", "run_stage2", "write_dataset",
]


def _run(stage_class, config, on_step: StepCallback | None) -> RunResult:
    procs = setup(config.device)
    created = not config.out.exists()
    together = True
    try:
        return train(stage_class(config, procs), on_step)
    except BaseException as exc:
        together = False
        # a new run that fails before its first checkpoint leaves nothing behind: neither a new start
        # nor --resume would otherwise accept the folder
        if not config.resume and procs.is_main:
            discard_failed_start(config.out, created)
        # the run's finished frames hold its model (and through it the process group) for as long as
        # the exception lives: let go of them, so that `close` ends the group (see there)
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        procs.close(together)


def run_tokenizer(config: TokenizerTrainConfig, on_step: StepCallback | None = None) -> RunResult:
    """Train the multi-scale VQ-VAE; writes `<out>/tokenizer`."""
    from hmar.train.stage_tokenizer import TokenizerStage

    return _run(TokenizerStage, config, on_step)


def run_stage1(config: Stage1Config, on_step: StepCallback | None = None) -> RunResult:
    """Next-scale prediction from a trained tokenizer; writes the model folder `<out>/model`."""
    from hmar.train.stage1 import Stage1

    return _run(Stage1, config, on_step)


def run_stage2(config: Stage2Config, on_step: StepCallback | None = None) -> RunResult:
    """Mask-branch fine-tuning from a stage-1 model folder; writes the model folder `<out>/model`."""
    from hmar.train.stage2 import Stage2

    return _run(Stage2, config, on_step)
