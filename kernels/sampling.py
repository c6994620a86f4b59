"""One sampling step's guidance, top-k, top-p, softmax and draw in one pass over the logits.

What it replaces (`hmar.sampler`: `guide_`, `filter_logits_`, `draw_tokens`, `draw_one`,
`drawn_probability`), on the doubled batch's logits (B2 = 2·B rows of l positions, the conditional
half first)::

    guided = cond.mul(1 + t).sub_(uncond.mul(t))                  # float32, rounded step by step
    guided[guided < k-th largest of its row] = -inf               # top-k, ties at the k-th all kept
    p = softmax(guided); drop the ascending prefix whose cumulative p <= 1 − top_p, keep the largest
    probs = softmax(filtered guided)
    drawn = argmax(probs / E)                                    # E: Exp(1) noise, as multinomial draws
    token = where(replace, tokens, drawn);  prob = probs[token]

Why: PyTorch runs that as a dozen passes over the (B·l, V) logits, the top-p filter as a full sort of
every row. Here one program owns one row with all V logits in registers: it reads each logit and its
noise once and writes a token and a probability. The k-th largest logit and the top-p cut are found by
bisection on the float's bit pattern (as an order-preserving integer), counting the row's elements, or
summing their probabilities, on either side of the midpoint: 32 halvings decide any float32.

Where it can differ from the reference, and only there:
- The softmax's sum is added in another order (ULPs of every probability), and top-p compares the
  probability mass at or below each logit, summed over the row in another order than `cumsum`'s, with
  1 − top_p: an element whose cumulative mass lies within rounding (~1e-6) of 1 − top_p may be kept
  where the reference drops it, or dropped where it keeps it.
- Equal logits straddling the top-p cut are kept or dropped together (kept unless the mass up to and
  including all of them is at most 1 − top_p); the reference's sort orders them arbitrarily and may
  drop some of them. Likewise every logit equal to the row's maximum is kept, where the reference
  keeps at least the one its sort puts last.
- The draw compares probs / E, as the reference does; probabilities that differ in their last bit can
  turn a near tie (within rounding) the other way.
A row whose guided logits hold a NaN or +inf, or are all -inf, has a NaN probability (as the
reference's softmax gives) and an arbitrary token in [0, V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import devices
from .launch import launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest vocabulary a program holds in registers (logits, keys, probabilities, noise of one row).
MAX_VOCAB = 16384


@triton.jit
def _order_key(x):
    """An int32 whose signed order is the float order of x (-0.0 counted as +0.0; x has no NaN)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _ceil_mid(lo, hi):
    """ceil((lo + hi) / 2) of int32 values without overflowing int32."""
    return (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)


@triton.jit
def _guided_draw(LOGITS, NOISE, OTHER, REPLACE, TOKENS, PROB, l, half, s0, s1, sn, V, t1, t, top_k, q,
                 BLOCK: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, REPLACING: tl.constexpr,
                 LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < V
    cond = LOGITS + (row // l) * s0 + (row % l) * s1
    c = tl.load(cond + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(cond + half + cols, mask=inside, other=0.0).to(tl.float32)
    g = c * t1 - u * t  # rounded as guide_ rounds it: the launch turns FMA contraction off
    nan = tl.sum(tl.where(inside & (g != g), 1, 0), axis=0) > 0
    x = tl.where(inside & (g == g), g, -float("inf"))
    m = tl.max(x, axis=0)
    bad = nan | (m == float("inf")) | (m == -float("inf"))
    key = _order_key(x)

    keep = inside
    if TOP_K:  # the largest key with at least top_k elements at or above it: the k-th largest logit
        lo = tl.min(tl.where(inside, key, 0x7FFFFFFF), axis=0)
        hi = tl.max(tl.where(inside, key, -0x7FFFFFFF), axis=0)
        for _ in range(32):
            mid = _ceil_mid(lo, hi)
            enough = tl.sum(tl.where(inside & (key >= mid), 1, 0), axis=0) >= top_k
            lo, hi = tl.where(enough, mid, lo), tl.where(enough, hi, mid - 1)
        keep = inside & (key >= lo)

    if LIBDEVICE:  # CUDA's expf, as PyTorch's softmax (tl.exp is an approximation)
        e = tl.where(keep, libdevice.exp(x - m), 0.0)
    else:  # the interpreter, whose tl.exp is NumPy's
        e = tl.where(keep, tl.exp(x - m), 0.0)
    if TOP_P:  # the largest key whose mass at or below it is at most 1 - top_p: that much is dropped
        p = e / tl.sum(e, axis=0)
        lo = tl.min(tl.where(keep, key, 0x7FFFFFFF), axis=0) - 1  # drops nothing
        hi = _order_key(m) - 1  # the maximum always stays
        for _ in range(32):
            mid = _ceil_mid(lo, hi)
            small = tl.sum(tl.where(key <= mid, p, 0.0), axis=0) <= q
            lo, hi = tl.where(small, mid, lo), tl.where(small, hi, mid - 1)
        keep = keep & (key > lo)
        e = tl.where(keep, e, 0.0)

    p = e / tl.sum(e, axis=0)
    noise = tl.load(NOISE + row * sn + cols, mask=inside, other=1.0)
    score = p / noise
    score = tl.where(inside, tl.where(score == score, score, -1.0), -float("inf"))
    token = tl.minimum(tl.argmax(score, axis=0), V - 1).to(tl.int64)
    if REPLACING:
        token = tl.where(tl.load(REPLACE + row) != 0, tl.load(OTHER + row), token)
    prob = tl.sum(tl.where(cols == token, p, 0.0), axis=0)
    tl.store(TOKENS + row, token)
    tl.store(PROB + row, tl.where(bad, float("nan"), prob))


def supports(logits: torch.Tensor) -> bool:
    """Whether `guided_draw` takes these logits: a doubled batch (2·B, l, V) of a supported dtype, its
    last dimension contiguous and V at most MAX_VOCAB, on CUDA (or on the CPU under TRITON_INTERPRET=1)."""
    return (devices.runs_on(logits.device) and logits.dim() == 3 and logits.shape[0] % 2 == 0 and logits.shape[0] > 0
            and logits.dtype in DTYPES and 0 < logits.shape[2] <= MAX_VOCAB and logits.stride(2) == 1)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def guided_draw(logits: torch.Tensor, t: float, top_k: int, top_p: float, noise: torch.Tensor,
                replace: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Guide, filter and draw one token per position, in one pass.

    logits: (2·B, l, V), the conditional rows first, then the unconditional (any dtype of DTYPES:
    computed in float32). t: the guidance strength. top_k, top_p: as `hmar.sampler.filter_logits_`
    (top_k outside 0 < top_k < V and top_p <= 0 filter nothing). noise: (B·l, V) float32, the Exp(1)
    numbers the draw divides by. replace: optional (tokens, mask), each (B, l): where mask is True the
    position's token is `tokens`' instead of the drawn one.
    Returns the tokens (B, l) int64 and the probability of each under the filtered guided softmax
    (B, l) float32, NaN where the row's logits are not finite.
    """
    B2, l, V = logits.shape
    B = B2 // 2
    if not supports(logits):
        raise ValueError(f"guided_draw: needs (2·B, l, V) logits of {', '.join(str(d)[6:] for d in DTYPES)} with V <= "
                         f"{MAX_VOCAB} and a contiguous last dimension, on CUDA; got {tuple(logits.shape)} {logits.dtype} "
                         f"on {logits.device}")
    if noise.shape != (B * l, V) or noise.dtype != torch.float32 or noise.device != logits.device or noise.stride(1) != 1:
        raise ValueError(f"guided_draw: needs ({B * l}, {V}) float32 noise on {logits.device} with a contiguous last "
                         f"dimension; got {tuple(noise.shape)} {noise.dtype} on {noise.device}")
    tokens = torch.empty((B, l), dtype=torch.int64, device=logits.device)
    prob = torch.empty((B, l), dtype=torch.float32, device=logits.device)
    if replace is None:
        other, mask = tokens, tokens  # not read
    else:
        other = replace[0].to(torch.int64).expand(B, l).contiguous()
        mask = replace[1].to(torch.bool).expand(B, l).contiguous().view(torch.uint8)
    block = triton.next_power_of_2(V)
    args = (logits, noise, other, mask, tokens, prob, l, B * logits.stride(0), logits.stride(0), logits.stride(1),
            noise.stride(0), V, float(1 + t), float(t), int(top_k), float(1 - top_p))
    launch(_guided_draw, (B * l,), args,
           dict(BLOCK=block, TOP_K=0 < top_k < V, TOP_P=top_p > 0, REPLACING=replace is not None,
                LIBDEVICE=not devices.INTERPRETING, num_warps=_warps(block), enable_fp_fusion=False))
    return tokens, prob
