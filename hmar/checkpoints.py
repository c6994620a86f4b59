"""Reading weight files and loading them strictly, with errors a user can act on.

Published `.pth` files (nvidia/HMAR, FoundationVision/var) are plain state dicts, read only with
`torch.load(..., weights_only=True)` so that a file can never run code. Our own files are safetensors.
A state dict that does not fit the model names its first offending keys and the preset it resembles.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from hmar.config import ModelConfig, PRESET_NAMES
from hmar.errors import CheckpointError
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer, build_transformer

SHOWN_KEYS = 3  # how many offending keys an error names


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read weight file {path}: {reason[:200]}") from None
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"cannot read weight file {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors (keys: {_preview(list(state)[:SHOWN_KEYS]) if isinstance(state, Mapping) else type(state).__name__})")
    return dict(state)


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming what does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_preview(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
        if wrong:
            k = wrong[0]
            problems.append(f"{len(wrong)} shape mismatches ({k}: file {list(state[k].shape)} vs model {list(expected[k].shape)})")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems)}; the file {describe_state_dict(state)}")
    module.load_state_dict(state, strict=True)


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """What a state dict looks like: which family and size, and the published preset it resembles."""
    if "quantize.embedding.weight" in state:
        vocab, cvae = state["quantize.embedding.weight"].shape
        return f"looks like a tokenizer (vocab {vocab}, Cvae {cvae}; the published one is vae_ch160v4096z32)"
    family = "hmar" if "ns_head.weight" in state else "var" if "head.weight" in state else None
    if family is None or "class_emb.weight" not in state:
        return "does not look like an HMAR, VAR or tokenizer state dict"
    prefix = "base_blocks|ns_blocks|mask_blocks" if family == "hmar" else "blocks"
    indices = {m.group(0) for k in state if (m := re.match(rf"({prefix})\.\d+", k))}
    depth = len(indices) - (len([i for i in indices if i.startswith("mask_blocks")]) if family == "hmar" else 0)
    width = state["class_emb.weight"].shape[1]
    classes = state["class_emb.weight"].shape[0] - 1
    preset = f"{family}-d{depth}"
    resemblance = f"resembles preset {preset}" if preset in PRESET_NAMES and width == 64 * depth else "matches no published preset"
    return f"looks like {family} depth {depth}, width {width}, {classes} classes ({resemblance})"


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (", …" if len(keys) > SHOWN_KEYS else "")


def build_models(config: ModelConfig) -> tuple[MultiScaleVQVAE, ScaleTransformer]:
    """Randomly initialised tokenizer and transformer of a config."""
    tokenizer = MultiScaleVQVAE(config.tokenizer)
    transformer = build_transformer(config.transformer, config.patch_nums, config.tokenizer.vocab_size, config.tokenizer.z_channels)
    return tokenizer, transformer


def load_models(config: ModelConfig, folder: str | Path) -> tuple[MultiScaleVQVAE, ScaleTransformer]:
    """Build the models of `config` and load the weight files its `files` section names (relative
    to `folder` unless absolute)."""
    folder = Path(folder)
    for role in ("tokenizer", config.family):
        if role not in config.files:
            raise CheckpointError(f"config.json in {folder} names no {role!r} weight file under 'files'")
    tokenizer, transformer = build_models(config)
    for role, module in (("tokenizer", tokenizer), (config.family, transformer)):
        path = folder / config.files[role]
        load_weights(module, read_state_dict(path), f"{role} weights {path.name}")
    return tokenizer.eval(), transformer.eval()
