"""Class-conditional sampling for HMAR and VAR, with guidance, top-k/top-p, mask schedules and forced
tokens for zero-shot editing.

The sampler owns the loop over scales and steps; the transformer knows nothing of schedules and the
tokenizer nothing of classes. For every scale k (K scales, l = pn² tokens):

1. next-scale step: the transformer sees the scale's input (f̂ of scales < k at scale k's size) for
   the batch doubled (labels, then the null class); guided logits = (1+t)·cond − t·uncond with
   t = cfg·k/(K−1); top-k then top-p filtering; one token per position drawn from the softmax.
2. HMAR only, for a scale whose schedule entry has several steps: the least confident tokens (the
   probability of the drawn token under the filtered guided distribution) are re-masked, as many as
   the rest of the entry sums to, and the mask branch re-predicts them (guidance practically off:
   t = cfg·1e-6, as the authors sample). Each further step keeps the least confident of the
   still-masked set. "Least confident" is what the authors' sampler takes, see `least_confident`:
   PyTorch's default (unstable) ascending argsort on the model's device, over the scale's whole row
   at the first re-mask and over the masked subset, in its current order, at each later step. Equal
   confidences (all of them with top_k = 1) come out in that sort's tie order, which depends on the
   row's length, the torch build and the device; so does the sample.
3. f̂ += φ_k(upsampled code embeddings of the scale); the image is the decoder's view of the final f̂.

Editing (forced tokens, `EditTarget`): a known token is never re-masked. Its confidence counts as
+inf, so it sorts after every unknown one, and a row re-masks its share of the schedule: at a step
that masks n of the l tokens, a row with u unknown tokens masks round(u·n / l) of them (never more
than u). The candidates are still the n least confident positions of the row (the sort's row lengths
stay those of plain sampling), and a row masks the first of them; at a later step the candidates that
this row did not mask count as +inf too. Without forced tokens every row masks exactly n: plain
sampling is the authors' computation.

Random numbers are drawn exactly as the reference implementations draw them (one `torch.multinomial`
per step on the filtered probabilities viewed as (B·l, V), from a generator on the model's device,
here computed as multinomial computes it, see `draw_one`), so a seed reproduces the authors' own
samples; the fused draw (`KernelPolicy.fused_draw`, `guided_draw`) divides by the same numbers. The
loop reads no tensor value on the host: nothing waits for the GPU until the images are used. Logits
that are not finite (weights that overflow) make the softmax NaN; the sampler records per scale
whether any drawn token's probability is NaN, and `check_finite` reports the first such scale once
the batch is done (the result also carries a NaN f̂, so that a caller which keeps only images, tokens
and f̂ still sees it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import math

import torch

from hmar.config import DEFAULT_SAMPLING
from hmar.errors import HmarError
from hmar.tokenizer import MultiScaleVQVAE
from hmar.transformer import ScaleTransformer

# Guidance strength of the mask-branch steps relative to cfg (the authors' setting: practically none).
MASK_STEP_GUIDANCE = 1e-6

# Images decoded per decoder call: bounds the decoder's activation memory, which at full resolution
# would otherwise set the peak of a large batch (results are identical; BENCHMARKS.md has the trade).
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
    # (K,) bool on the device: True where a scale's logits were not finite (see `check_finite`)
    nonfinite: torch.Tensor | None = None


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
    noise = exponential_noise(probs.shape, probs.dtype, probs.device, generator)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def exponential_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The Exp(1) numbers that `draw_one` divides probabilities of `shape` and `dtype` by, drawn as
    multinomial draws them (the same numbers for the same generator state)."""
    return torch.empty(shape, dtype=dtype, device=device).exponential_(1, generator=generator)


def least_confident(confidence: torch.Tensor, n: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (B, n) of the n least confident tokens, least confident first, chosen as the authors'
    sampler chooses them: PyTorch's default (not stable) ascending argsort of `confidence` (B, l) on
    its device, over the whole row when `candidates` is None, else over the confidences of the
    positions `candidates` (B, m) gathered in that order, keeping the first n. Ties come out in the
    sort's order for that row length, so a stable sort, or one over a padded full-length row, would
    pick other tokens."""
    if candidates is None:
        return torch.argsort(confidence, dim=-1)[:, :n]
    return candidates.gather(1, torch.argsort(confidence.gather(1, candidates), dim=-1)[:, :n])


def drawn_probability(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The confidence of each drawn token (B, l): its probability under `probs` (B, l, V)."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def fused_draw_enabled(transformer: ScaleTransformer) -> bool:
    """Whether a batch draws its tokens with the fused kernel (`KernelPolicy.fused_draw` of the
    transformer's policy): decided once per batch; `guided_draw` still falls back per call where the
    kernel cannot take the logits (its `supports`)."""
    return transformer.policy.fused_draw


def _sampling_kernel(logits: torch.Tensor):
    """`hmar.kernels.sampling` if it takes these logits, else None; asked only where the policy turned
    the kernel on."""
    from hmar.kernels import sampling  # here, not at the top: Triton takes seconds to import

    return sampling if sampling.supports(logits) else None


def guided_draw(logits: torch.Tensor, t: float, top_k: int, top_p: float, generator: torch.Generator | None,
                replace: tuple[torch.Tensor, torch.Tensor] | None = None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's tokens from the transformer's logits of the doubled batch (2·B, l, V): guidance of
    strength t (`guide_`), top-k and top-p filtering and one draw per position (`draw_tokens`); where
    `replace` = (tokens, mask) has mask True, the position takes `tokens`' token instead of the drawn
    one. Returns the tokens (B, l) and their confidence (`drawn_probability`), NaN where the logits
    were not finite. `fused`: in one kernel (`hmar.kernels.sampling`, from the same random numbers;
    its docstring says where the rounding can differ) wherever it takes the logits; the reference path
    guides in float32 (logits in the head's dtype are converted: the fused policy leaves them so) and
    overwrites float32 logits' unconditional half."""
    kernel = _sampling_kernel(logits) if fused else None
    if kernel is not None:
        B2, l, V = logits.shape
        noise = exponential_noise((B2 // 2 * l, V), torch.float32, logits.device, generator)
        return kernel.guided_draw(logits, t, top_k, top_p, noise, replace)
    drawn, probs = draw_tokens(guide_(logits.float(), t), top_k, top_p, generator)  # (a no-op on float32 logits)
    tokens = drawn if replace is None else torch.where(replace[1], replace[0], drawn)
    return tokens, drawn_probability(probs, tokens)


def check_finite(result: SampleResult) -> None:
    """Raise the project's error, naming the scale, if sampling met logits that were not finite (the
    softmax of a NaN or +inf logit is NaN everywhere in its row, so the drawn tokens are noise). Reads
    the flags on the host: call it once the batch is done, not inside the sampling loop. Without the
    flags (a result rebuilt from images, tokens and f̂ only), the NaN f̂ that `sample` leaves says it."""
    if result.nonfinite is not None:
        bad = [k for k, flag in enumerate(result.nonfinite.tolist()) if flag]
        if bad:
            k, K = bad[0], len(result.tokens)
            side = math.isqrt(result.tokens[k].shape[1])
            raise HmarError(f"sampling stopped: the model's logits are not finite (NaN or inf) at scale {k + 1} of {K} "
                            f"({side}x{side} tokens); the weights overflow, so there is no image to keep")
    elif not bool(torch.isfinite(result.f_hat).all()):
        raise HmarError("sampling stopped: the model's logits are not finite (NaN or inf); the weights overflow, "
                        "so there is no image to keep")


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


@dataclass(frozen=True)
class _Batch:
    """What stays fixed while one batch is sampled: the models, the conditioning of the doubled
    batch (labels, then the null class), the drawing settings and the progress counter."""

    tokenizer: MultiScaleVQVAE
    transformer: ScaleTransformer
    cond: torch.Tensor
    cond_BD: torch.Tensor
    cfg: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    amp: contextlib.AbstractContextManager
    steps: _Steps
    fused_draw: bool = False  # `fused_draw_enabled`


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
    cfg: float = DEFAULT_SAMPLING["cfg"],
    top_k: int = DEFAULT_SAMPLING["top_k"],
    top_p: float = DEFAULT_SAMPLING["top_p"],
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
    batch = _Batch(tokenizer, transformer, cond, cond_BD, cfg, top_k, top_p, generator, amp, steps, fused_draw_enabled(transformer))
    cache = transformer.sampling_cache()
    all_tokens: list[torch.Tensor] = []
    nonfinite: list[torch.Tensor] = []  # per scale, on the device: read by `check_finite` only

    for k in range(K):
        context = tokenizer.downsample(f_hat, k) if k > 0 else None
        with amp:
            x = transformer.start_tokens(cond_BD) if k == 0 else transformer.scale_tokens(k, context).repeat(2, 1, 1)
            logits = transformer.next_scale(x, cond, cond_BD, cache)
        keep = edit.keep[k] if edit is not None else None
        tokens, confidence = guided_draw(logits, cfg * k / max(K - 1, 1), top_k, top_p, generator,
                                         None if keep is None else (edit.tokens[k], keep), batch.fused_draw)
        del logits
        bad = confidence.isnan().any()
        steps.finished(k, 0, len(schedule[k]))

        if transformer.has_mask_branch and mask_refinement and len(schedule[k]) > 1:
            tokens, bad = _refine_scale(batch, k, context, tokens, confidence, bad, schedule[k], keep)
        all_tokens.append(tokens)
        nonfinite.append(bad)
        f_hat = tokenizer.add_scale(f_hat, tokens, k)

    del batch, cache, cond, cond_BD, confidence  # free the sampling state before the decoder's large activations
    flags = torch.stack(nonfinite)
    f_hat.masked_fill_(flags.any(), torch.nan)  # no value changes unless a scale went bad
    # Decoding a whole batch at full resolution dominates peak memory; a few images at a time do not.
    images = torch.cat([tokenizer.decode(part).float() for part in f_hat.split(DECODE_CHUNK)])
    return SampleResult(images=images.add_(1).mul_(0.5), tokens=all_tokens, f_hat=f_hat, nonfinite=flags)


def _refine_scale(
    batch: _Batch, k: int, context: torch.Tensor | None, tokens: torch.Tensor, confidence: torch.Tensor,
    bad: torch.Tensor, entry: Sequence[int], keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HMAR's masked-prediction steps within scale k (see the module docstring). `context`: f̂ of the
    earlier scales at scale k's size; `confidence` (B, l): of the tokens drawn at the first step; `bad`:
    whether any was NaN; `entry`: the scale's schedule entry; `keep` (B, l): the known tokens when
    editing. Returns the tokens and `bad` updated over the steps."""
    transformer = batch.transformer
    B, l = tokens.shape
    candidates = None  # the whole row
    if keep is not None:
        unknown = (~keep).sum(dim=1, keepdim=True)
        confidence = confidence.masked_fill(keep, torch.inf)
    for j in range(1, len(entry)):
        n = sum(entry[j:])  # tokens masked during step j
        candidates = least_confident(confidence, n, candidates)
        if keep is None:
            masked = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, candidates, True)
        else:
            count = torch.div(unknown * n + l // 2, l, rounding_mode="floor")  # this row's share, at most `unknown`
            masked_rank = torch.arange(n, device=tokens.device) < count  # (B, n): rank r of `candidates` masked
            masked = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, candidates, masked_rank)
        with batch.amp:
            x = transformer.masked_scale_tokens(k, context, batch.tokenizer.scale_input(tokens, k), masked).repeat(2, 1, 1)
            logits = transformer.masked(x, batch.cond, batch.cond_BD)
        tokens, confidence = guided_draw(logits, batch.cfg * MASK_STEP_GUIDANCE, batch.top_k, batch.top_p, batch.generator,
                                         (tokens, ~masked), batch.fused_draw)
        del logits
        bad = bad | confidence.isnan().any()
        batch.steps.finished(k, j, len(entry))
        if keep is not None:
            confidence = confidence.masked_fill(~masked, torch.inf)  # candidates this row did not mask stay out
    return tokens, bad


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on the model's device, as the reference samplers seed theirs."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))
