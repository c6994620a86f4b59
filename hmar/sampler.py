"""Class-conditional sampling for HMAR and VAR, with guidance, top-k/top-p, mask schedules and forced
tokens for zero-shot editing.

The sampler owns the loop over scales and steps; the transformer knows nothing of schedules and the
tokenizer nothing of classes. For every scale k (K scales, l = pn² tokens):

1. next-scale step: the transformer sees the scale's input (f̂ of scales < k at scale k's size) for
   the batch doubled (labels, then the null class); guided logits = (1+t)·cond − t·uncond with
   t = cfg·k/(K−1); top-k then top-p filtering; one token per position drawn from the softmax.
2. HMAR only, for a scale whose schedule entry has several steps: the least confident tokens (the
   probability of the drawn token under the filtered guided distribution; ties: lower position
   first) are re-masked, as many as the rest of the entry sums to, and the mask branch re-predicts
   them (guidance practically off: t = cfg·1e-6, as the authors sample). Each further step keeps the
   least confident of the still-masked set.
3. f̂ += φ_k(upsampled code embeddings of the scale); the image is the decoder's view of the final f̂.

Random numbers are drawn exactly as the reference implementations draw them (one `torch.multinomial`
per step on the filtered probabilities viewed as (B·l, V), from a generator on the model's device,
here computed as multinomial computes it, see `draw_one`), so a seed reproduces the authors' own
samples. The loop reads no tensor value on the host: nothing waits for the GPU until the images are
used.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import HMAR, VAR, ScaleTransformer, kv_cache

# Guidance strength of the mask-branch steps relative to cfg (the authors' setting: practically none).
MASK_STEP_GUIDANCE = 1e-6

# Images decoded per decoder call (bounds the decoder's activation memory; results are identical). At
# 256 px on an H100 with the channels-last float16 decoder, 8 a call decode 64 images in 119 ms alone
# (16: 95 ms, +0.8 GiB of activations), and sampling a batch of 64 peaks at 4.25 GiB (the CUDA
# graph's pool included), under the 4.4 GiB goal; see BENCHMARKS.md.
DECODE_CHUNK = 8

# Logits sorted at a time by the top-p filter (bounds the memory of the sort; results are identical).
TOP_P_CHUNK = 1 << 24


@dataclass(frozen=True)
class SamplingProgress:
    scale: int  # 0-based scale index
    step: int  # 0-based step within the scale
    steps_in_scale: int
    done: int  # steps finished so far, over all scales
    total: int


ProgressCallback = Callable[[SamplingProgress], None]


@dataclass
class EditTarget:
    """Tokens to force while sampling (zero-shot editing): per scale, ground-truth tokens (B, pn²) and a
    keep mask (B, pn²), True where the token is known and must not change."""

    tokens: list[torch.Tensor]
    keep: list[torch.Tensor]


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], float32
    tokens: list[torch.Tensor]  # per scale (B, pn²)
    f_hat: torch.Tensor  # (B, Cvae, P, P) final cumulative reconstruction


def filter_logits_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Keep the top-k logits, then the smallest set of top logits holding top_p of the probability;
    the rest become -inf. In place, on (..., V). top_k >= V keeps everything."""
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_largest, -torch.inf)
    if top_p > 0:
        V = logits.shape[-1]
        for rows in logits.view(-1, V).split(max(1, TOP_P_CHUNK // V)):  # views: filtered in place
            sorted_logits, order = rows.sort(dim=-1, descending=False)
            drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
            drop_sorted[..., -1:] = False  # always keep the most likely token
            rows.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits


def draw_tokens(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter (in place) and draw one token per position. Returns tokens (B, l) and the filtered
    probabilities (B, l, V)."""
    B, l, V = logits.shape
    probs = filter_logits_(logits, top_k, top_p).softmax(dim=-1)
    return draw_one(probs.view(-1, V), generator).view(B, l), probs


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` (N, V): what `torch.multinomial(probs, 1, generator=generator)`
    returns, computed as it computes a single draw (argmax of probs / Exp(1) noise, the same random
    numbers), without the checks it runs first that the probabilities are finite, non-negative and
    not all zero: host syncs (`.item()`) in older torch, a dozen small kernels and device asserts in
    newer. A softmax of filtered logits always passes them."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def guide_(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch (conditional first, then null class):
    (1+t)·cond − t·uncond, rounded step by step as the reference computes it. Overwrites the
    unconditional half of `logits` (one full-size temporary fewer)."""
    B = logits.shape[0] // 2
    return logits[:B].mul(1 + t).sub_(logits[B:].mul_(t))


class _Steps:
    """Counts steps for the progress callback."""

    def __init__(self, schedule: Sequence[Sequence[int]], callback: ProgressCallback | None):
        self.total, self.done, self.callback = sum(len(e) for e in schedule), 0, callback

    def finished(self, scale: int, step: int, steps_in_scale: int) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(SamplingProgress(scale, step, steps_in_scale, self.done, self.total))


def report_steps(schedule: Sequence[Sequence[int]], callback: ProgressCallback | None) -> None:
    """Report every step of `schedule` as finished (a batch sampled in one go, see `hmar.cuda_graph`)."""
    steps = _Steps(schedule, callback)
    for k, entry in enumerate(schedule):
        for j in range(len(entry)):
            steps.finished(k, j, len(entry))


@torch.no_grad()
def sample(
    tokenizer: MultiScaleVQVAE,
    transformer: ScaleTransformer,
    labels: torch.Tensor,
    schedule: Sequence[Sequence[int]],
    *,
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    generator: torch.Generator | None = None,
    mask_refinement: bool = True,
    edit: EditTarget | None = None,
    progress: ProgressCallback | None = None,
    amp_dtype: torch.dtype | None = None,
) -> SampleResult:
    """Sample images for `labels` (B,); the null class index (num_classes) samples unconditionally.
    `schedule` must already be validated against the model (see `hmar.schedule.resolve_schedule`).
    `amp_dtype`: autocast for the transformer (the decoder decodes in its own dtype, see
    `MultiScaleVQVAE.cast_decoder`). Guidance, filtering, drawing and f̂ are float32 always."""
    device = labels.device
    B, K = labels.shape[0], transformer.num_scales
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    null = torch.full_like(labels, transformer.num_classes)
    cond_BD, cond = transformer.condition(torch.cat((labels, null)))
    f_hat = cond_BD.new_zeros(B, tokenizer.config.z_channels, transformer.patch_nums[-1], transformer.patch_nums[-1])
    steps = _Steps(schedule, progress)
    cache = kv_cache(len(transformer.blocks)) if isinstance(transformer, VAR) else None
    all_tokens: list[torch.Tensor] = []

    for k in range(K):
        context = tokenizer.downsample(f_hat, k) if k > 0 else None
        with amp:
            x = transformer.start_tokens(cond_BD) if k == 0 else transformer.scale_tokens(k, context).repeat(2, 1, 1)
            if cache is not None:
                logits = transformer.next_scale(x, cond, cond_BD, cache)
            else:
                logits = transformer.next_scale(x, cond, cond_BD)
        guided = guide_(logits, cfg * k / max(K - 1, 1))
        del logits
        tokens, probs = draw_tokens(guided, top_k, top_p, generator)
        keep = edit.keep[k] if edit is not None else None
        if keep is not None:
            tokens = torch.where(keep, edit.tokens[k], tokens)
        steps.finished(k, 0, len(schedule[k]))

        if isinstance(transformer, HMAR) and mask_refinement and len(schedule[k]) > 1:
            tokens = _refine_scale(
                tokenizer, transformer, k, context, tokens, probs, schedule[k], keep,
                cond, cond_BD, cfg, top_k, top_p, generator, amp, steps,
            )
        all_tokens.append(tokens)
        f_hat = tokenizer.add_scale(f_hat, tokens, k)

    del cache, cond, cond_BD, guided, probs  # free the sampling state before the decoder's large activations
    # Decoding a whole batch at full resolution dominates peak memory; a few images at a time do not.
    images = torch.cat([tokenizer.decode(part).float() for part in f_hat.split(DECODE_CHUNK)])
    return SampleResult(images=images.add_(1).mul_(0.5), tokens=all_tokens, f_hat=f_hat)


def _refine_scale(
    tokenizer, transformer: HMAR, k, context, tokens, probs, entry, keep,
    cond, cond_BD, cfg, top_k, top_p, generator, amp, steps: _Steps,
) -> torch.Tensor:
    """HMAR's masked-prediction steps within scale k (see the module docstring)."""
    B, l = tokens.shape
    # still_masked[j]: how many tokens stay masked after step j of the entry
    still_masked = [sum(entry[j + 1:]) for j in range(len(entry))]
    # Forced (known) tokens are never re-masked; the schedule shrinks in proportion to the unknown ones.
    unknown = torch.full((B,), l, device=tokens.device) if keep is None else (~keep).sum(dim=1)

    def mask_count(j: int) -> torch.Tensor:
        if keep is None:
            return torch.full((B,), still_masked[j], device=tokens.device)
        return torch.div(unknown * still_masked[j] + l // 2, l, rounding_mode="floor")

    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if keep is not None:
        confidence = confidence.masked_fill(keep, torch.inf)
    # `order` ranks positions, least confident first; the first mask_count(j) are masked at step j+1.
    order = torch.argsort(confidence, dim=-1, stable=True)
    positions = torch.arange(l, device=tokens.device).expand(B, l)
    for j in range(1, len(entry)):
        n = mask_count(j - 1)
        ranked_in = positions < n.unsqueeze(1)  # rank r of `order` is masked
        masked = torch.zeros_like(ranked_in).scatter(1, order, ranked_in)
        with amp:
            x = transformer.masked_scale_tokens(k, context, tokenizer.scale_input(tokens, k), masked).repeat(2, 1, 1)
            logits = transformer.masked(x, cond, cond_BD)
        guided = guide_(logits, cfg * MASK_STEP_GUIDANCE)
        del logits
        drawn, probs = draw_tokens(guided, top_k, top_p, generator)
        tokens = torch.where(masked, drawn, tokens)
        steps.finished(k, j, len(entry))
        if j < len(entry) - 1:
            # keep the least confident of the masked set; ties keep their previous order
            confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            key = confidence.gather(1, order).masked_fill(~ranked_in, torch.inf)
            order = order.gather(1, torch.argsort(key, dim=-1, stable=True))
    return tokens


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on the model's device, as the reference samplers seed theirs."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))
