"""Pre-encoded tokens: run the frozen tokenizer over the data set once, then train from the file.

Every image is encoded as it is and flipped, so random flips still apply. The file records the image
list and a digest of the tokenizer weights; a cache made from other images or another tokenizer is
refused rather than silently used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hmar.atomic import atomic_write
from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import ImageBatches, ImageFolder, collate_readable, ignore_stop_signals
from hmar.train.errors import TrainingError, note

ENCODE_BATCH = 64


def tokenizer_digest(tokenizer: MultiScaleVQVAE) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TokenCache:
    tokens: torch.Tensor  # (N, 2, L): all scales of each image, unflipped then flipped
    labels: torch.Tensor  # (N,)
    valid: torch.Tensor  # (N,) bool: False where the image could not be read
    patch_nums: tuple[int, ...]

    def batch(self, keys: Sequence[tuple[int, bool]]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """Per-scale tokens (B', pn²), labels (B',) and the number of unreadable images left out."""
        kept = [(i, f) for i, f in keys if bool(self.valid[i])]
        index = torch.tensor([i for i, _ in kept], dtype=torch.long)
        flip = torch.tensor([int(f) for _, f in kept], dtype=torch.long)
        flat = self.tokens[index, flip].long()
        sizes = [p * p for p in self.patch_nums]
        return list(flat.split(sizes, dim=1)), self.labels[index], len(keys) - len(kept)


@torch.no_grad()
def encode_folder(folder: ImageFolder, tokenizer: MultiScaleVQVAE, device: torch.device, num_workers: int) -> TokenCache:
    size = tokenizer.config.image_size
    keys = [(i, flip) for i in range(len(folder)) for flip in (False, True)]
    loader = torch.utils.data.DataLoader(
        ImageBatches(folder, size),
        batch_sampler=[keys[s:s + ENCODE_BATCH] for s in range(0, len(keys), ENCODE_BATCH)],
        num_workers=num_workers, collate_fn=_collate_with_keys, worker_init_fn=ignore_stop_signals,
    )
    L = tokenizer.config.num_tokens
    dtype = torch.int16 if tokenizer.config.vocab_size <= 2**15 else torch.int32
    tokens = torch.zeros(len(folder), 2, L, dtype=dtype)
    valid = torch.ones(len(folder), dtype=torch.bool)
    start, reported = 0, 0
    for batch, readable in loader:
        chunk = keys[start:start + len(readable)]
        start += len(readable)
        if 10 * start // len(keys) > reported:  # a line per tenth: readable in a log as on a terminal
            reported = 10 * start // len(keys)
            note(f"token cache: encoded {start}/{len(keys)} images and mirror images")
        if batch.images.numel():
            encoded = torch.cat(tokenizer.encode(batch.images.to(device)), dim=1).cpu().to(dtype)
            positions = [k for k, ok in zip(chunk, readable) if ok]
            for (index, flip), row in zip(positions, encoded):
                tokens[index, int(flip)] = row
        for (index, _), ok in zip(chunk, readable):
            if not ok:
                valid[index] = False
    return TokenCache(tokens, torch.tensor(folder.labels), valid, tuple(tokenizer.patch_nums))


def _collate_with_keys(samples):
    return collate_readable(samples), [image is not None for image, _ in samples]


def save_cache(cache: TokenCache, path: Path, folder: ImageFolder, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tokens": cache.tokens, "labels": cache.labels, "valid": cache.valid,
        "patch_nums": list(cache.patch_nums), "files": [str(f.relative_to(folder.root)) for f in folder.files],
        "tokenizer": digest,
    }
    try:
        with atomic_write(path) as temporary:
            torch.save(record, temporary)
    except OSError as exc:
        raise TrainingError(f"cannot write token cache {path}: {exc.strerror or exc}") from None


def load_cache(path: Path, folder: ImageFolder, digest: str) -> TokenCache:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: say which and why
        raise TrainingError(f"cannot read token cache {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    problem = _malformed(data)
    if problem:
        raise TrainingError(f"{path} is not a token cache ({problem}); delete it or give another --token-cache path")
    files = [str(f.relative_to(folder.root)) for f in folder.files]
    if data.get("files") != files:
        raise TrainingError(f"token cache {path} was made from other images than {folder.root}; delete it or give another --token-cache path")
    if data.get("tokenizer") != digest:
        raise TrainingError(f"token cache {path} was made with another tokenizer; delete it or give another --token-cache path")
    return TokenCache(data["tokens"], data["labels"], data["valid"], tuple(data["patch_nums"]))


def _malformed(data) -> str | None:
    """What makes `data` something other than what `save_cache` writes (None: nothing)."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}"
    missing = [k for k in ("tokens", "labels", "valid", "patch_nums", "files", "tokenizer") if k not in data]
    if missing:
        return f"no {', '.join(missing)}"
    tokens, labels, valid = data["tokens"], data["labels"], data["valid"]
    if not all(isinstance(t, torch.Tensor) for t in (tokens, labels, valid)):
        return "tokens, labels and valid are not all tensors"
    patch_nums = data["patch_nums"]
    if not (isinstance(patch_nums, list) and patch_nums and all(type(p) is int and p > 0 for p in patch_nums)):
        return "patch_nums is not a list of positive integers"
    n = len(tokens) if tokens.ndim else 0
    if tokens.ndim != 3 or tokens.shape[1:] != (2, sum(p * p for p in patch_nums)) or tokens.dtype.is_floating_point:
        return f"tokens of shape {tuple(tokens.shape)} and type {tokens.dtype} do not fit its scales"
    if labels.shape != (n,) or valid.shape != (n,) or valid.dtype != torch.bool or labels.dtype.is_floating_point:
        return "labels or valid do not fit its tokens"
    if not isinstance(data["files"], list) or len(data["files"]) != n:
        return "its file list does not fit its tokens"
    return None


def cached_tokens(path: Path, folder: ImageFolder, tokenizer: MultiScaleVQVAE, device: torch.device, num_workers: int, is_main: bool, barrier) -> TokenCache:
    """Load the cache at `path`, encoding the folder first (on the main process) if it is missing."""
    digest = tokenizer_digest(tokenizer)
    if is_main and not path.exists():
        note(f"encoding the {len(folder)} images and their mirror images once into the token cache {path}")
        save_cache(encode_folder(folder, tokenizer, device, num_workers), path, folder, digest)
    barrier()
    return load_cache(path, folder, digest)
