"""Pre-encoded tokens: run the frozen tokenizer over the data set once, then train from the file.

Every image is encoded as it is and flipped, so random flips still apply. The file records the image
list and a digest of the tokenizer weights; a cache made from other images or another tokenizer is
refused rather than silently used.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import ImageBatches, ImageFolder, collate_readable, ignore_stop_signals
from hmar.train.errors import TrainingError

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
    start = 0
    for batch, readable in loader:
        chunk = keys[start:start + len(readable)]
        start += len(readable)
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
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "tokens": cache.tokens, "labels": cache.labels, "valid": cache.valid,
        "patch_nums": list(cache.patch_nums), "files": [str(f.relative_to(folder.root)) for f in folder.files],
        "tokenizer": digest,
    }, tmp)
    os.replace(tmp, path)


def load_cache(path: Path, folder: ImageFolder, digest: str) -> TokenCache:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: say which and why
        raise TrainingError(f"cannot read token cache {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    files = [str(f.relative_to(folder.root)) for f in folder.files]
    if data.get("files") != files:
        raise TrainingError(f"token cache {path} was made from other images than {folder.root}; delete it or give another --token-cache path")
    if data.get("tokenizer") != digest:
        raise TrainingError(f"token cache {path} was made with another tokenizer; delete it or give another --token-cache path")
    return TokenCache(data["tokens"], data["labels"], data["valid"], tuple(data["patch_nums"]))


def cached_tokens(path: Path, folder: ImageFolder, tokenizer: MultiScaleVQVAE, device: torch.device, num_workers: int, is_main: bool, barrier) -> TokenCache:
    """Load the cache at `path`, encoding the folder first (on the main process) if it is missing."""
    digest = tokenizer_digest(tokenizer)
    if is_main and not path.exists():
        save_cache(encode_folder(folder, tokenizer, device, num_workers), path, folder, digest)
    barrier()
    return load_cache(path, folder, digest)
