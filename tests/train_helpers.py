"""Tiny models and data for the training tests, and a script entry point for runs in a subprocess.

    python tests/train_helpers.py '<json>'   # {"stage": "stage1", "sleep_at_step": 4, ...options}

runs one stage with those options (under torchrun too); with `sleep_at_step` it pauses after logging
that step, so that a test can kill or signal it at a known point; with `fail_at_step` every process
raises there instead (a crash between checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from hmar.config import TokenizerConfig, TransformerConfig
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train import Stage1Config, Stage2Config, TokenizerTrainConfig, run_stage1, run_stage2, run_tokenizer, write_dataset
from hmar.train.model_folders import write_tokenizer_folder

IMAGE_SIZE = 64


def tiny_tokenizer_config() -> TokenizerConfig:
    """A 4-level (downsampling 16) tokenizer at 64 px: 4 scales (1, 2, 3, 4), 64 codes."""
    return TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, patch_nums=(1, 2, 3, 4), image_size=IMAGE_SIZE)


def tiny_transformer_config() -> TransformerConfig:
    return TransformerConfig(family="hmar", depth=2, width=32, num_heads=2, branch_depth=1, num_classes=10)


def make_data(root: Path, images_per_class: int = 4) -> Path:
    return write_dataset(root, images_per_class=images_per_class, size=IMAGE_SIZE, seed=0)


def make_tokenizer_folder(root: Path) -> Path:
    """A randomly initialised tokenizer written as a tokenizer folder (stages 1–2 only need it frozen)."""
    torch.manual_seed(0)
    return write_tokenizer_folder(root, MultiScaleVQVAE(tiny_tokenizer_config()))


def quiet(**options) -> dict:
    """Options every test run shares: in-process data loading, no progress bar, log every step."""
    return {"num_workers": 0, "progress": False, "log_every": 1, "warmup_steps": 1, "batch_size": 4, **options}


def run_from_json(spec: dict) -> None:
    spec = dict(spec)
    stage, sleep_at, sleep_seconds = spec.pop("stage"), spec.pop("sleep_at_step", None), spec.pop("sleep_seconds", 60)
    fail_at = spec.pop("fail_at_step", None)

    def on_step(step: int, record: dict) -> None:
        if step == sleep_at:
            time.sleep(sleep_seconds)
        if step == fail_at:
            raise RuntimeError(f"crash requested at step {step}")
    if stage == "stage1":
        if isinstance(spec.get("model"), dict):
            spec["model"] = TransformerConfig(**spec["model"])
        run_stage1(Stage1Config(**spec), on_step)
    elif stage == "stage2":
        run_stage2(Stage2Config(**spec), on_step)
    else:
        spec["model"] = TokenizerConfig(**spec["model"])
        run_tokenizer(TokenizerTrainConfig(**spec), on_step)


def spec_of(config: TransformerConfig) -> dict:
    return dataclasses.asdict(config)


if __name__ == "__main__":
    run_from_json(json.loads(sys.argv[1]))
