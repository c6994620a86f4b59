"""Reading weight files and loading them strictly, with errors a user can act on.

Published `.pth` files (nvidia/HMAR, FoundationVision/var) are plain state dicts, read only with
`torch.load(..., weights_only=True)` so that a file can never run code. Our own files are safetensors.
A state dict that does not fit the model names its first offending keys and the preset it resembles;
a parameter holding NaN or infinity is refused by name (it would sample flat garbage). Before a model
is built, its weight files are checked against the folder and its size against the memory budget.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from hmar import hub
from hmar.config import ModelConfig, PRESET_NAMES, check_memory
from hmar.errors import CheckpointError
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer, build_transformer

SHOWN_KEYS = 3  # how many offending keys an error names
SAFETENSORS_HEADER_LIMIT = 100_000_000  # bytes: the format's own bound on its JSON header


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
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):  # not a refusal: the bytes are no pickle at all
            raise CheckpointError(f"cannot read weight file {path}: {damaged(path) or _one_line(exc)}") from None
        raise CheckpointError(f"cannot read weight file {path}: it is no plain state dict of tensors, and hmar never runs code "
                              f"from a weight file; torch refused it: {_refusal(exc)}") from None
    except Exception as exc:  # zip, pickle, safetensors and OS errors all mean an unreadable file
        damage = damaged(path)
        reason = damage or _one_line(exc)
        raise CheckpointError(f"cannot read weight file {path}: {reason}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors (keys: {_preview([str(k) for k in list(state)[:SHOWN_KEYS]]) if isinstance(state, Mapping) else type(state).__name__})")
    return dict(state)


def _one_line(exc: BaseException) -> str:
    """The whole of an exception's message on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _refusal(exc: BaseException) -> str:
    """torch's reason for refusing a pickle, on one line, without its advice to load the file with
    weights_only=False (which would run the file's code)."""
    paragraphs = [" ".join(p.split()) for p in str(exc).split("\n\n") if p.strip()]
    reasons = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    return " ".join(reasons or paragraphs) or type(exc).__name__


def damaged(path: str | Path) -> str | None:
    """Why a weight file is cut short, judged from its ends without reading it (None: it looks
    whole). A zip archive (torch's format) must end in its end-of-archive record, and a
    safetensors file must hold the data its header promises; other files are not judged."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "the file is empty"
        with path.open("rb") as stream:
            head = stream.read(8)
            if head[:4] == b"PK\x03\x04":
                if not zipfile.is_zipfile(path):
                    return f"the file is cut short ({size} bytes: a zip archive without its end record)"
            elif path.suffix == ".safetensors":
                header_size = int.from_bytes(head, "little") if len(head) == 8 else size
                if header_size > SAFETENSORS_HEADER_LIMIT:
                    return f"the file is no safetensors file (its header claims {header_size} bytes)"
                if 8 + header_size > size:
                    return f"the file is cut short ({size} bytes, less than its own header)"
                header = json.loads(stream.read(header_size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + header_size + end > size:
                    return f"the file is cut short ({size} bytes of the {8 + header_size + end} its header describes)"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"its header is unreadable ({_one_line(exc)})"
    return None


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
    parameters = dict(module.named_parameters())
    for key, tensor in state.items():
        # parameters only: a buffer such as the attention mask holds -inf by design
        if key in parameters and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {key} holds NaN or infinite values; the file is damaged or was saved from a diverged run")
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


def build_models(config: ModelConfig, source: str = "config") -> tuple[MultiScaleVQVAE, ScaleTransformer]:
    """Randomly initialised tokenizer and transformer of a config (refused first if they would not
    fit the memory budget)."""
    check_memory(config, source=source)
    tokenizer = MultiScaleVQVAE(config.tokenizer)
    transformer = build_transformer(config.transformer, config.patch_nums, config.tokenizer.vocab_size, config.tokenizer.z_channels)
    return tokenizer, transformer


def load_models(config: ModelConfig, folder: str | Path) -> tuple[MultiScaleVQVAE, ScaleTransformer]:
    """Build the models of `config` and load the weight files its `files` section names, relative
    to `folder` (hmar's own folders of hub models name files in the Hugging Face cache). Files and
    sizes are checked before anything is allocated."""
    folder = Path(folder)
    hub_name = hub.hub_model_of_folder(folder)
    source = str(folder / "config.json")
    paths = config.weight_paths(folder, hub.hf_cache_dir() if hub_name else None, source)
    tokenizer, transformer = build_models(config, source)
    for role, module in (("tokenizer", tokenizer), (config.family, transformer)):
        path = paths[role]
        try:
            load_weights(module, read_state_dict(path), f"{role} weights {path.name}")
        except CheckpointError as exc:
            if hub_name is None:
                raise
            raise CheckpointError(f"{exc}; {hub.repair_hint(hub_name)}") from None
    return tokenizer.eval(), transformer.eval()
