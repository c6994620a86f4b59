"""What the stages read and write: tokenizer folders and model folders the CLI can load.

A tokenizer folder (`hmar train tokenizer`): `tokenizer.json` (the TokenizerConfig) and
`tokenizer.safetensors`. A model folder (stages 1 and 2): `config.json` in the schema of
`hmar.config.ModelConfig` (tokenizer and hmar sections, `files`, `class_names`, `sampling`) with
`tokenizer.safetensors` and `hmar.safetensors` beside it: `hmar generate --model <folder>` loads it.
Files are written with `hmar.atomic.atomic_write`, so a reader never sees half a file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from hmar.atomic import atomic_write
from hmar.checkpoints import load_models, load_weights, read_state_dict
from hmar.config import ModelConfig, TokenizerConfig
from hmar.errors import ConfigError
from hmar.hub import resolve_model
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer

TOKENIZER_CONFIG = "tokenizer.json"
TOKENIZER_WEIGHTS = "tokenizer.safetensors"
MODEL_CONFIG = "config.json"


def save_weights(state: Mapping[str, torch.Tensor], path: Path, dtype: str = "float32") -> None:
    """Floating-point tensors are stored as `dtype`; integer buffers keep theirs."""
    cast = getattr(torch, dtype)
    with atomic_write(path, overwrite=True) as temporary:
        save_file({k: (v.to(cast) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}, str(temporary))


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, overwrite=True) as temporary:
        temporary.write_text(text)


def write_tokenizer_folder(folder: Path, tokenizer: MultiScaleVQVAE, state: Mapping[str, torch.Tensor] | None = None,
                           dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(state if state is not None else tokenizer.state_dict(), folder / TOKENIZER_WEIGHTS, dtype)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(tokenizer.config).items()}
    _write_text(folder / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def tokenizer_files(path: Path | str) -> tuple[TokenizerConfig, Path]:
    """The tokenizer config and weight file of a tokenizer folder, of a model folder, or of a
    registry model by name (`hmar-tiny`, or a cached hub model), as `--model` takes them."""
    path = Path(path)
    if not path.exists() and path.name == str(path):  # a bare name, not a path: the registry's model
        path = resolve_model(str(path))
    if (path / TOKENIZER_CONFIG).is_file():
        try:
            config = TokenizerConfig(**json.loads((path / TOKENIZER_CONFIG).read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"cannot read {path / TOKENIZER_CONFIG}: {exc}") from None
        return config, path / TOKENIZER_WEIGHTS
    if (path / MODEL_CONFIG).is_file():
        model_config = ModelConfig.load(path / MODEL_CONFIG)
        return model_config.tokenizer, path / model_config.files.get("tokenizer", TOKENIZER_WEIGHTS)
    raise ConfigError(f"{path} is neither a tokenizer folder ({TOKENIZER_CONFIG}) nor a model folder ({MODEL_CONFIG})")


def load_tokenizer(path: Path, config: TokenizerConfig | None = None) -> MultiScaleVQVAE:
    """The frozen tokenizer of a tokenizer folder or of a model folder, in eval mode; `config`
    builds it with other settings than the folder's (the weights must fit it)."""
    folder_config, weights = tokenizer_files(path)
    tokenizer = MultiScaleVQVAE(config or folder_config)
    load_weights(tokenizer, read_state_dict(weights), f"tokenizer weights {weights.name}")
    return tokenizer.eval()


def write_model_folder(
    folder: Path,
    config: ModelConfig,
    tokenizer_state: Mapping[str, torch.Tensor],
    transformer_state: Mapping[str, torch.Tensor],
    dtype: str = "float32",
) -> Path:
    """Weights plus config.json (written last, so a folder with a config is complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer": TOKENIZER_WEIGHTS, config.family: f"{config.family}.safetensors"}
    save_weights(tokenizer_state, folder / files["tokenizer"], dtype)
    save_weights(transformer_state, folder / files[config.family], dtype)
    data = dataclasses.replace(config, files=files).to_dict()
    _write_text(folder / MODEL_CONFIG, json.dumps(data, indent=2) + "\n")
    return folder


def load_model_folder(folder: Path) -> tuple[ModelConfig, MultiScaleVQVAE, ScaleTransformer]:
    config = ModelConfig.load(Path(folder) / MODEL_CONFIG)
    tokenizer, transformer = load_models(config, folder)
    return config, tokenizer, transformer
