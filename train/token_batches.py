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
from hmar.train.data import BatchOrder, ImageFolder, image_batches, with_readable
from hmar.train.distributed import Processes
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
    # On the device once per step; a batch that stands in for an unreadable one is not moved again.
    moved = (([t.to(device, non_blocking=True) for t in tokens], labels.to(device), skipped) for tokens, labels, skipped in raw)
    for (_, _, skipped), (tokens, labels, _) in with_readable(moved, start, folder.root, lambda b: b[1].numel() == 0):
        yield TokenBatch(tokens, labels, skipped)


@torch.no_grad()
def _encoded(folder, tokenizer, order, device, start, stop, num_workers):
    for batch in image_batches(folder, tokenizer.config.image_size, order, start, stop, num_workers):
        tokens = tokenizer.encode(batch.images.to(device)) if batch.labels.numel() else []
        yield tokens, batch.labels, batch.skipped
