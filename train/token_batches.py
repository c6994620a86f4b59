"""Token batches for the transformer stages: from the token cache, or encoded on the fly.

Either way step s sees the same samples and flips (see `hmar.train.data.BatchOrder`). A batch in
which no image could be read is replaced by the previous one (and its images counted as skipped),
so that every process still takes part in the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from hmar.tokenizer import MultiScaleVQVAE
from hmar.train.data import BatchOrder, ImageFolder, image_batches
from hmar.train.distributed import Processes
from hmar.train.errors import TrainingError
from hmar.train.token_cache import cached_tokens


@dataclass
class TokenBatch:
    tokens: list[torch.Tensor]  # per scale (B, pn²), on the device
    labels: torch.Tensor  # (B,)
    skipped: int


def token_batches(
    folder: ImageFolder, tokenizer: MultiScaleVQVAE, order: BatchOrder, procs: Processes,
    start: int, stop: int, cache_path, num_workers: int,
) -> Iterator[TokenBatch]:
    device = procs.device
    if cache_path is not None:
        cache = cached_tokens(cache_path, folder, tokenizer, device, num_workers, procs.is_main, procs.barrier)
        raw = (cache.batch(order.batch(step)) for step in range(start, stop))
    else:
        raw = _encoded(folder, tokenizer, order, device, start, stop, num_workers)
    previous = None
    for step, (tokens, labels, skipped) in enumerate(raw, start):
        if labels.numel() == 0:
            if previous is None:
                raise TrainingError(f"no image of the batch of step {step} could be read; check the data folder {folder.root}")
            tokens, labels, skipped = previous.tokens, previous.labels, skipped
        else:
            tokens, labels = [t.to(device, non_blocking=True) for t in tokens], labels.to(device)
        previous = TokenBatch(tokens, labels, skipped)
        yield previous


@torch.no_grad()
def _encoded(folder, tokenizer, order, device, start, stop, num_workers):
    for batch in image_batches(folder, tokenizer.config.image_size, order, start, stop, num_workers):
        tokens = tokenizer.encode(batch.images.to(device)) if batch.labels.numel() else []
        yield tokens, batch.labels, batch.skipped
