"""AdaLN's modulated LayerNorm, alone or after the block's gated residual, in one Triton pass each way.

What it replaces (each line of `hmar.transformer.AdaLNBlock.forward`; x the float32 residual stream
(B, L, C), scale/shift/gamma per-sample modulations (B, 1, C), h a branch's output (B, L, C))::

    y1 = layer_norm(x, eps) * (1 + scale1) + shift1          # modulated_layer_norm
    x1 = x + h1 * gamma1                                      # } residual_modulated_layer_norm
    y2 = layer_norm(x1, eps) * (1 + scale2) + shift2          # }

Why: eagerly each line is 3 to 6 kernels over the (B, L, C) tensor (the norm, the multiply, the add,
the gated residual's multiply and add, and as many again backward, plus the reductions over L that
the modulations' gradients need). Here one program owns a tile of rows of one sample with the whole
row (C ≤ 4096 channels, padded to a power of two and masked) in registers, so the row statistics are
local: the forward reads x (and h) once and writes y (and x1) once; the backward reads the saved
input, dy (and x1's own upstream gradient, and h) once and writes dx (and dh) once, with the
modulations' gradients as per-program partial sums over that program's rows (float32, no atomics:
deterministic), added up per sample by torch.

Maths, per row (C channels; s, sh, g the row's sample's scale, shift, gamma):
    forward   x1 = x + h·g  (rounded to x's dtype, then used as rounded: the statistics are those
              of the tensor that is returned and saved, as PyTorch's unfused code computes them)
              mean = Σ x1 / C,  rstd = 1 / sqrt(Σ (x1 − mean)² / C + eps),  xhat = (x1 − mean)·rstd
              y = xhat·(1 + s) + sh
    backward  d sh = Σ_rows dy,  d s = Σ_rows dy·xhat,  dxhat = dy·(1 + s)
              dx1 = rstd·(dxhat − mean_c(dxhat) − xhat·mean_c(dxhat·xhat)) + dx1_upstream
              dx = dx1,  dh = dx1·g,  d g = Σ_rows dx1·h
Arithmetic in float32 (also 1 + s and h·g, which PyTorch rounds to the modulations' dtype under
autocast), each output rounded once to its dtype. Saved for the backward: the LayerNorm's input (x,
or the output x1), h, the modulations, and the float32 per-row mean and rstd; xhat is recomputed.

torch.compile: custom operators ``torch.ops.hmar.modulated_layer_norm_fwd`` / ``_bwd`` and
``torch.ops.hmar.residual_modulated_layer_norm_fwd`` / ``_bwd`` with fake implementations and
registered autograd, as `cosine_qkv`'s are; the backward operators return the float32 partial sums
and the sums per sample (and over the batch of a (1, 1, C) modulation) are left to torch (Inductor).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 4096
TILE_ELEMENTS = 4096  # rows × padded channels of one tile: 32 float32 values per tensor per thread with 4 warps
BACKWARD_ROWS = 32  # rows one backward program sums the modulations' gradients over (≥ one tile)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(C: int) -> tuple[int, int, int, int]:
    """(padded channels, rows of a tile, tiles of a backward program, warps) for C channels."""
    block = max(16, triton.next_power_of_2(C))
    rows = max(1, TILE_ELEMENTS // block)
    return block, rows, max(1, BACKWARD_ROWS // rows), 4 if block <= 1024 else 8


def _backward_programs(L: int, C: int) -> int:
    """Backward programs per sample (the partial sums' second dimension)."""
    _, rows, tiles, _ = _config(C)
    return triton.cdiv(L, rows * tiles)


# ------------------------------------------------------------------ kernels

@triton.jit
def _tile(L, C, tile, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile's row indices (int64: (ROWS,) and (ROWS, 1)), column indices ((1, BLOCK_C)) and masks."""
    row = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    rows, cols = row[:, None], tl.arange(0, BLOCK_C)[None, :]
    row_ok, col_ok = rows < L, cols < C
    return row, rows, cols, row_ok, col_ok, row_ok & col_ok


@triton.jit
def _per_sample(PTR, b, sb, sc, cols, col_ok):
    """A sample's modulation vector as a float32 (1, BLOCK_C) row (sb = 0 for a shared one)."""
    return tl.load(PTR + b * sb + cols * sc, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _adaln_fwd(X, H, GAMMA, SCALE, SHIFT, X1, Y, MEAN, RSTD, L, C, eps,
               sxb, sxl, sxc, shb, shl, shc, sgb, sgc, ssb, ssc, stb, stc,
               BLOCK_C: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr):
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row, rows, cols, row_ok, col_ok, inside = _tile(L, C, tile, ROWS, BLOCK_C)
    out = (b * L + rows) * C + cols  # x1 and y: contiguous (B, L, C)

    x = tl.load(X + b * sxb + rows * sxl + cols * sxc, mask=inside, other=0.0).to(tl.float32)
    if RESIDUAL:
        h = tl.load(H + b * shb + rows * shl + cols * shc, mask=inside, other=0.0).to(tl.float32)
        x1 = (x + h * _per_sample(GAMMA, b, sgb, sgc, cols, col_ok)).to(X1.dtype.element_ty)
        tl.store(X1 + out, x1, mask=inside)
        x = x1.to(tl.float32)

    mean = tl.sum(x, axis=1) / C
    centred = tl.where(col_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = centred * rstd[:, None] * (1.0 + _per_sample(SCALE, b, ssb, ssc, cols, col_ok)) \
        + _per_sample(SHIFT, b, stb, stc, cols, col_ok)
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + b * L + row, mean, mask=row < L)  # mean, rstd: contiguous (B, L) float32
    tl.store(RSTD + b * L + row, rstd, mask=row < L)


# ------------------------------------------------------------------ host side

def _problem(x: torch.Tensor, mods: dict[str, torch.Tensor], h: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> str | None:
    """Why these inputs are not supported, or None."""
    device_ok = x.device.type == "cuda" or (x.device.type == "cpu" and _INTERPRET)
    if not device_ok:
        return f"x is on {x.device}: needs CUDA (or the CPU under TRITON_INTERPRET=1)"
    if x.dim() != 3 or not 1 <= x.shape[-1] <= MAX_CHANNELS:
        return f"x must be (B, L, C) with C ≤ {MAX_CHANNELS}; got {tuple(x.shape)}"
    names = ", ".join(str(d)[6:] for d in DTYPES)
    tensors = {"x": x, **({} if h is None else {"h": h}), **mods}
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            return f"{name} is {t.dtype}; supported: {names}"
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    if out_dtype is not None and out_dtype not in DTYPES:
        return f"out_dtype {out_dtype}; supported: {names}"
    if h is not None and h.shape != x.shape:
        return f"h has shape {tuple(h.shape)}, x {tuple(x.shape)}"
    B, _, C = x.shape
    for name, t in mods.items():
        shape = (1,) * (3 - t.dim()) + tuple(t.shape)
        if t.dim() > 3 or shape[0] not in (1, B) or shape[1:] != (1, C):
            return f"{name} has shape {tuple(t.shape)}: needs ({B}, 1, {C}) or (1, 1, {C}) for x of {tuple(x.shape)}"
    return None


def _strides(mod: torch.Tensor, B: int) -> tuple[int, int]:
    """(batch stride, channel stride) of a (B | 1, 1, C) modulation; batch stride 0 where it is shared."""
    shared = mod.dim() < 3 or mod.shape[0] == 1
    return (0 if shared else mod.stride(0)), mod.stride(-1)


def _forward(x, h, gamma, scale, shift, eps, out_dtype):
    B, L, C = x.shape
    residual = h is not None
    y = x.new_empty((B, L, C), dtype=out_dtype)
    x1 = x.new_empty((B, L, C)) if residual else y
    mean = x.new_empty((B, L), dtype=torch.float32)
    rstd = x.new_empty((B, L), dtype=torch.float32)
    if B * L:
        block, rows, _, warps = _config(C)
        h_args = (h, gamma, *h.stride(), *_strides(gamma, B)) if residual else (x, x, 0, 0, 0, 0, 0)
        _adaln_fwd[(triton.cdiv(L, rows), B)](
            x, h_args[0], h_args[1], scale, shift, x1, y, mean, rstd, L, C, eps, *x.stride(), *h_args[2:],
            *_strides(scale, B), *_strides(shift, B), BLOCK_C=block, ROWS=rows, RESIDUAL=residual, num_warps=warps)
    return x1, y, mean, rstd


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.float32)


# hmar::modulated_layer_norm_fwd(x, scale, shift, eps, out_dtype) -> (y, mean, rstd)
# hmar::residual_modulated_layer_norm_fwd(x, h, gamma, scale, shift, eps, out_dtype) -> (x1, y, mean, rstd)

@torch.library.custom_op("hmar::modulated_layer_norm_fwd", mutates_args=())
def _mln_fwd_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _forward(x, None, None, scale, shift, eps, out_dtype)
    return y, mean, rstd


@_mln_fwd_op.register_fake
def _mln_fwd_fake(x, scale, shift, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


@torch.library.custom_op("hmar::residual_modulated_layer_norm_fwd", mutates_args=())
def _rmln_fwd_op(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, h, gamma, scale, shift, eps, out_dtype)


@_rmln_fwd_op.register_fake
def _rmln_fwd_fake(x, h, gamma, scale, shift, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


# ------------------------------------------------------------------ public

def supports(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, h: torch.Tensor | None = None,
             gamma: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> bool:
    """Whether `modulated_layer_norm` (h and gamma None) or `residual_modulated_layer_norm` takes these
    inputs: x (B, L, C) with C ≤ 4096, h like x, modulations (B, 1, C) or (1, 1, C), all float16,
    bfloat16 or float32 (any mix), on CUDA (or on the CPU under TRITON_INTERPRET=1)."""
    if (h is None) != (gamma is None):
        return False
    mods = {"scale": scale, "shift": shift, **({} if gamma is None else {"gamma": gamma})}
    return _problem(x, mods, h, out_dtype) is None


def _check(function: str, x, mods, h=None, out_dtype=None):
    problem = _problem(x, mods, h, out_dtype)
    if problem is not None:
        raise ValueError(f"{function}: {problem}")


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = layer_norm(x, eps, no affine) · (1 + scale) + shift, statistics and arithmetic in float32.

    x: (B, L, C), any strides. scale, shift: (B, 1, C) or (1, 1, C) (any strides, e.g. views of one
    (B, 1, 6, C) tensor). Returns a contiguous (B, L, C) tensor of `out_dtype` (x's dtype if None).
    Differentiable in x, scale and shift."""
    _check("modulated_layer_norm", x, {"scale": scale, "shift": shift}, out_dtype=out_dtype)
    y, _, _ = _mln_fwd_op(x, scale, shift, float(eps), out_dtype or x.dtype)
    return y


def residual_modulated_layer_norm(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor,
                                  shift: torch.Tensor, eps: float,
                                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, y): x1 = x + h · gamma in x's dtype, y = layer_norm(x1, eps) · (1 + scale) + shift in
    `out_dtype` (x's dtype if None), float32 arithmetic, one pass.

    x, h: (B, L, C), any strides. gamma, scale, shift: (B, 1, C) or (1, 1, C). Returns contiguous
    (B, L, C) tensors. Differentiable in x, h, gamma, scale and shift (x1 may take a gradient too)."""
    _check("residual_modulated_layer_norm", x, {"gamma": gamma, "scale": scale, "shift": shift}, h, out_dtype)
    x1, y, _, _ = _rmln_fwd_op(x, h, gamma, scale, shift, float(eps), out_dtype or x.dtype)
    return x1, y
