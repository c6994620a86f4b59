"""The HMAR and VAR transformers: AdaLN blocks with L2-normalised attention, over token maps of scales.

Both predict the tokens of scale k from an input sequence of that scale's size. VAR's input for scale
k is the up-to-date reconstruction f̂ downsampled to scale k, and a token sees every earlier scale
(block-causal; a KV cache at sampling time). HMAR's input is the same, but a token sees only its own
scale (block-diagonal): scale k depends on earlier scales only through f̂ (a Markov chain), so
sampling needs no cache. HMAR's blocks are split into a shared trunk (`base_blocks`) and two branches
with their own heads: `ns_blocks` (next-scale prediction) and `mask_blocks` (masked prediction inside a
scale, MaskGIT-style). Parameter names follow the published checkpoints so they load strictly.

Which kernels the blocks and heads run is the kernel policy's (`set_policy`, `hmar.policy`); a new
model runs the reference path, PyTorch's ops.

Shapes: B batch, L tokens of all scales, l tokens of one scale, C width, V vocabulary, Cvae code width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmar.attention import AttentionFn
from hmar.config import TransformerConfig
from hmar.policy import KernelPolicy

# The learnable per-head attention temperature is clamped at 100 (as published).
MAX_LOG_ATTENTION_SCALE = math.log(100.0)

# A function that runs attention on (B, H, l, D) tensors of the current tokens: (q, k, v, scale) -> out.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Every query sees every key: attention within one scale (or over a KV cache)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sequence_attend(attention: AttentionFn, block_sizes: Sequence[int], pattern: str) -> Attend:
    """Attention over all scales at once with the given pattern, via a pluggable implementation."""
    sizes = tuple(block_sizes)
    return lambda q, k, v, scale: attention(q, k, v, sizes, pattern, scale)


@dataclass
class LayerCache:
    """One layer's keys and values of the scales seen so far (VAR sampling). One object per layer,
    rather than a layer index into a shared cache, so that compiled blocks share one graph: Dynamo
    would specialise on the index and compile every layer apart."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            k = torch.cat((self.keys, k), dim=2)
            v = torch.cat((self.values, v), dim=2)
        self.keys, self.values = k, v
        return k, v


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a sample's whole residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


def _adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """`hmar.kernels.adaln` if it takes these tensors (its widths and dtypes), else None; asked only
    where the policy turned the kernels on."""
    from hmar.kernels import adaln  # here, not at the top: Triton takes seconds to import

    return adaln if adaln.supports(x, scale, shift) else None


def _cosine_qkv(qkv: torch.Tensor, log_scale: torch.Tensor):
    """`hmar.kernels.cosine_qkv.cosine_qkv` if it takes these tensors (its head dims and dtypes), else
    None; asked only where the policy turned the kernel on."""
    from hmar.kernels import cosine_qkv

    return cosine_qkv.cosine_qkv if cosine_qkv.supports(qkv, log_scale) else None


def _linear_input_dtype(x: torch.Tensor) -> torch.dtype:
    """What the next Linear would cast x to: the autocast dtype where autocast is on (the caller's
    context, not a kernel choice: the sampler runs only the transformer's Linears under it)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.l2_norm = num_heads, width // num_heads, l2_norm
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        # q and v have biases, k has none (a bias on k cancels in the softmax); the zero buffer is
        # kept because the published checkpoints store it.
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        if l2_norm:
            # cosine attention: q and k unit-normalised, a learnable per-head temperature (init 4)
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.softmax_scale = 1.0
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(width, width)
        self.fused_qkv = False  # KernelPolicy.fused_cosine_qkv, set by ScaleTransformer.set_policy

    def forward(self, x: torch.Tensor, attend: Attend, cache: LayerCache | None = None) -> torch.Tensor:
        B, l, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        fused = _cosine_qkv(qkv, self.scale_mul_1H11) if self.fused_qkv and self.l2_norm else None
        if fused is not None:
            q, k, v = fused(qkv, self.scale_mul_1H11, MAX_LOG_ATTENTION_SCALE)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, l, D)
            if self.l2_norm:
                temperature = self.scale_mul_1H11.clamp_max(MAX_LOG_ATTENTION_SCALE).exp()
                q = F.normalize(q, dim=-1).mul(temperature).to(v.dtype)
                k = F.normalize(k, dim=-1).to(v.dtype)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attend(q, k, v, self.softmax_scale)
        return self.proj(out.transpose(1, 2).reshape(B, l, C))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.gelu_epilogue = False  # KernelPolicy.gelu_epilogue, set by ScaleTransformer.set_policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cuBLASLt's epilogue takes x only in the weights' dtype (autocast would cast it; the fused
        # norms hand x over in the autocast dtype already)
        fc1 = self.fc1
        if self.gelu_epilogue and fc1.bias is not None and x.dtype == fc1.weight.dtype == fc1.bias.dtype:
            hidden = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden.view(*x.shape[:-1], -1))
        return self.fc2(F.gelu(fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorm scale/shift and residual gains come from the class."""

    def __init__(self, config: TransformerConfig, drop_path_rate: float = 0.0):
        super().__init__()
        C = self.width = config.width
        self.drop_path_rate = drop_path_rate
        self.attn = SelfAttention(C, config.num_heads, config.attn_l2_norm)
        self.ffn = FeedForward(C, round(C * config.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        self.shared_aln = config.shared_aln
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.fused_norms = False  # KernelPolicy.fused_adaln, set by ScaleTransformer.set_policy

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attend: Attend, cache: LayerCache | None = None) -> torch.Tensor:
        if self.shared_aln:  # cond: (B, 1, 6, C) from the transformer's shared projection
            mods = (self.ada_gss + cond).unbind(2)
        else:  # cond: (B, C) class embedding
            mods = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        fused = _adaln(x, scale1, shift1) if self.fused_norms else None
        if fused is not None:  # the same function in 2 passes over x instead of ~8
            # dropping a sample's branch (drop path) = zeroing (and rescaling) that sample's gain
            gamma1 = drop_path(gamma1, self.drop_path_rate, self.training)
            gamma2 = drop_path(gamma2, self.drop_path_rate, self.training)
            eps, dtype = self.ln_wo_grad.eps, _linear_input_dtype(x)
            h = self.attn(fused.modulated_layer_norm(x, scale1, shift1, eps, dtype), attend, cache)
            x, y = fused.residual_modulated_layer_norm(x, h, gamma1, scale2, shift2, eps, dtype)
            return torch.addcmul(x, self.ffn(y), gamma2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attend, cache)
        x = x + drop_path(h.mul(gamma1), self.drop_path_rate, self.training)  # not in place: under compile, h is a graph output autograd keeps
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + drop_path(h.mul(gamma2), self.drop_path_rate, self.training)


class AdaLNHead(nn.Module):
    """The class-modulated LayerNorm before a logits head."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.fused_norms = False  # KernelPolicy.fused_adaln, set by ScaleTransformer.set_policy

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        fused = _adaln(x, scale, shift) if self.fused_norms else None
        if fused is not None:
            return fused.modulated_layer_norm(x, scale, shift, self.ln_wo_grad.eps, _linear_input_dtype(x))
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """With shared AdaLN, one projection of the class embedding feeds every block."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


def _block_stack(config: TransformerConfig, indices: range) -> nn.ModuleList:
    # stochastic depth grows linearly with depth
    rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
    return nn.ModuleList(AdaLNBlock(config, rates[i]) for i in indices)


class ScaleTransformer(nn.Module):
    """What HMAR and VAR share: class, level and position embeddings over the scales, conditioning."""

    pattern = "block_diagonal"
    # Whether the model has a masked-prediction branch (`masked_scale_tokens`, `masked`) that re-predicts
    # a scale's least confident tokens.
    has_mask_branch = False

    def __init__(self, config: TransformerConfig, patch_nums: Sequence[int], vocab_size: int, z_channels: int):
        super().__init__()
        self.config = config
        self.patch_nums = tuple(patch_nums)
        self.block_sizes = tuple(p * p for p in self.patch_nums)
        self.num_classes, self.vocab_size, self.z_channels = config.num_classes, vocab_size, z_channels
        self.starts = [sum(self.block_sizes[:k]) for k in range(len(self.block_sizes) + 1)]
        C, L, first = config.width, self.starts[-1], self.block_sizes[0]
        init_std = math.sqrt(1 / C / 3)

        # The last class index is the null class used for guidance (and label dropout in training).
        self.class_emb = nn.Embedding(self.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, first, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, std=init_std)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if config.shared_aln else nn.Identity()

        # Buffers the published checkpoints carry: each token's scale index, and the additive attention
        # bias of the pattern. We build masks from block sizes instead, but keep them so files load strictly.
        levels = torch.tensor([k for k, size in enumerate(self.block_sizes) for _ in range(size)])
        self.register_buffer("lvl_1L", levels.view(1, L))
        allowed = levels[:, None] == levels[None, :] if self.pattern == "block_diagonal" else levels[:, None] >= levels[None, :]
        self.register_buffer("attn_bias_for_masking", torch.where(allowed, 0.0, -torch.inf).view(1, 1, L, L))
        self.set_policy(KernelPolicy.reference())

    def set_policy(self, policy: KernelPolicy) -> None:
        """Which kernels the blocks and heads run from now on (`hmar.policy`), and the attention that
        the all-scales forwards use unless given one."""
        self.policy, self.attention = policy, policy.attention_function()
        for module in self.modules():
            if isinstance(module, (AdaLNBlock, AdaLNHead)):
                module.fused_norms = policy.fused_adaln
            elif isinstance(module, SelfAttention):
                module.fused_qkv = policy.fused_cosine_qkv
            elif isinstance(module, FeedForward):
                module.gelu_epilogue = policy.gelu_epilogue

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ---- per-scale (sampling) -----------------------------------------------------------------
    def sampling_cache(self) -> list[LayerCache] | None:
        """What `next_scale` keeps from scale to scale of one batch: None where a scale attends only
        to itself."""
        return None

    def next_scale(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, cache: list[LayerCache] | None) -> torch.Tensor:
        """Logits (B, l, V) for one scale's tokens; `cache`: this batch's `sampling_cache()`."""
        raise NotImplementedError

    def _sampling_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A sampling head's logits as the draw reads them: the fused draw (`KernelPolicy.fused_draw`)
        takes the head's autocast dtype and guides in float32 itself, which spares a float32 copy of
        every scale's (2B, l, V) logits; the reference ops guide in float32."""
        return logits if self.policy.fused_draw else logits.float()

    # ---- inputs ------------------------------------------------------------------------------
    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embedding (for the heads) and the blocks' conditioning (shared AdaLN projects it)."""
        cond_BD = self.class_emb(labels)
        return cond_BD, self.shared_ada_lin(cond_BD)

    def level_position(self, k: int) -> torch.Tensor:
        """Level plus absolute position embedding of scale k's tokens, (1, l, C)."""
        s, e = self.starts[k], self.starts[k + 1]
        return self.lvl_embed(self.lvl_1L[:, s:e]) + self.pos_1LC[:, s:e]

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Scale 0's input: the class embedding at every position of the first scale."""
        B, first = cond_BD.shape[0], self.block_sizes[0]
        return cond_BD.unsqueeze(1).expand(B, first, -1) + self.pos_start.expand(B, first, -1) + self.level_position(0)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training-time label dropout: replace labels by the null class with prob. cond_drop_rate."""
        if not self.training or self.config.cond_drop_rate <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.config.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor, attend: Attend) -> torch.Tensor:
        for block in blocks:
            x = block(x, cond, attend)
        return x

    def _sequence_inputs(self, labels: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All scales in one sequence: start tokens then `rest` (B, L - first, C) plus level/positions."""
        cond_BD, cond = self.condition(self.drop_labels(labels))
        B = labels.shape[0]
        start = cond_BD.unsqueeze(1).expand(B, self.block_sizes[0], -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((start, rest), dim=1) + (self.lvl_embed(self.lvl_1L) + self.pos_1LC)
        return x, cond_BD, cond


class HMAR(ScaleTransformer):
    """Markovian next-scale prediction (block-diagonal) plus a masked-prediction branch."""

    pattern = "block_diagonal"
    has_mask_branch = True

    def __init__(self, config: TransformerConfig, patch_nums: Sequence[int], vocab_size: int, z_channels: int):
        super().__init__(config, patch_nums, vocab_size, z_channels)
        C = config.width
        self.base_blocks = _block_stack(config, range(config.base_depth))
        self.ns_blocks = _block_stack(config, range(config.branch_depth))
        self.mask_blocks = _block_stack(config, range(config.branch_depth))
        self.ns_head_nm = AdaLNHead(C, config.norm_eps)
        self.ns_head = nn.Linear(C, vocab_size)
        self.mask_head_nm = AdaLNHead(C, config.norm_eps)
        self.mask_head = nn.Linear(C, vocab_size)
        # HMAR keeps the word-embedding bias apart: the mask branch sums two word embeddings
        # (context f̂ and the scale's own tokens) and must add the bias once.
        self.word_embed = nn.Linear(z_channels, C, bias=False)
        self.word_embed_bias = nn.Parameter(torch.zeros(C))
        self.mask_embed = nn.Embedding(1, C)
        nn.init.trunc_normal_(self.mask_embed.weight.data, std=math.sqrt(1 / C / 3))

    # ---- per-scale (sampling) -----------------------------------------------------------------
    def scale_tokens(self, k: int, context: torch.Tensor) -> torch.Tensor:
        """Next-scale input of scale k>0 from f̂ of earlier scales at scale k's size (B, Cvae, pn, pn)."""
        x = self.word_embed(context.flatten(2).transpose(1, 2)) + self.word_embed_bias
        return x + self.level_position(k)

    def masked_scale_tokens(self, k: int, context: torch.Tensor, current: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mask-branch input of scale k: context f̂ plus the scale's current tokens (as `scale_input`
        embeddings, (B, Cvae, pn, pn)), where `masked` (B, l) positions show the mask embedding."""
        ctx = self.word_embed(context.flatten(2).transpose(1, 2))
        own = self.word_embed(current.flatten(2).transpose(1, 2))
        own = torch.where(masked.unsqueeze(-1), self.mask_embed.weight[0].to(own.dtype), own)
        return ctx + own + self.word_embed_bias + self.level_position(k)

    @property
    def next_scale_head(self) -> nn.Linear:
        return self.ns_head

    def next_scale(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """Logits (B, l, V) of the next-scale branch for one scale's tokens (a scale sees only itself,
        so there is no `cache`)."""
        return self._sampling_logits(self.ns_head(self._next_scale_features(x, cond, cond_BD, dense_attend)))

    def masked(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, attend: Attend = dense_attend) -> torch.Tensor:
        """Logits (B, l, V) of the mask branch for one scale's tokens."""
        return self._sampling_logits(self.mask_head(self._masked_features(x, cond, cond_BD, attend)))

    def _next_scale_features(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self._run(self.ns_blocks, self._run(self.base_blocks, x, cond, attend), cond, attend)
        return self.ns_head_nm(x.float(), cond_BD)

    def _masked_features(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self._run(self.mask_blocks, self._run(self.base_blocks, x, cond, attend), cond, attend)
        return self.mask_head_nm(x.float(), cond_BD)

    # ---- all scales at once (training) --------------------------------------------------------
    def forward_next_scale(self, labels: torch.Tensor, teacher_input: torch.Tensor, attention: AttentionFn | None = None) -> torch.Tensor:
        """Teacher-forced next-scale logits (B, L, V). `teacher_input` (B, L - first, Cvae): f̂ of
        earlier scales at each scale's size (`MultiScaleVQVAE.teacher_forcing_input`)."""
        return self.ns_head(self.forward_next_scale_features(labels, teacher_input, attention)).float()

    def forward_next_scale_features(self, labels: torch.Tensor, teacher_input: torch.Tensor, attention: AttentionFn | None = None) -> torch.Tensor:
        """What `forward_next_scale` feeds its logits head (`next_scale_head`): (B, L, C), so that a
        loss can apply the head a chunk at a time."""
        rest = self.word_embed(teacher_input.float()) + self.word_embed_bias
        x, cond_BD, cond = self._sequence_inputs(labels, rest)
        return self._next_scale_features(x, cond, cond_BD, sequence_attend(attention or self.attention, self.block_sizes, self.pattern))

    def forward_masked(
        self,
        labels: torch.Tensor,
        teacher_input: torch.Tensor,
        scale_input: torch.Tensor,
        masked: torch.Tensor,
        attention: AttentionFn | None = None,
    ) -> torch.Tensor:
        """Mask-branch logits (B, L, V) for all scales. `scale_input` (B, L - first, Cvae): each
        scale's own tokens (`MultiScaleVQVAE.scale_input`, flattened); `masked` (B, L - first) bool."""
        return self.mask_head(self.forward_masked_features(labels, teacher_input, scale_input, masked, attention)).float()

    def forward_masked_features(self, labels: torch.Tensor, teacher_input: torch.Tensor, scale_input: torch.Tensor, masked: torch.Tensor,
                                attention: AttentionFn | None = None) -> torch.Tensor:
        """What `forward_masked` feeds its logits head (`mask_head`): (B, L, C)."""
        own = self.word_embed(scale_input.float())
        own = torch.where(masked.unsqueeze(-1), self.mask_embed.weight[0].to(own.dtype), own)
        rest = self.word_embed(teacher_input.float()) + own + self.word_embed_bias
        x, cond_BD, cond = self._sequence_inputs(labels, rest)
        return self._masked_features(x, cond, cond_BD, sequence_attend(attention or self.attention, self.block_sizes, self.pattern))

    def init_mask_branch_from_next_scale(self) -> None:
        """Stage 2 starts the mask branch as a copy of the trained next-scale branch."""
        self.mask_blocks.load_state_dict(self.ns_blocks.state_dict())
        self.mask_head_nm.load_state_dict(self.ns_head_nm.state_dict())
        self.mask_head.load_state_dict(self.ns_head.state_dict())


class VAR(ScaleTransformer):
    """VAR: next-scale prediction where each scale attends to all earlier ones (block-causal)."""

    pattern = "block_causal"

    def __init__(self, config: TransformerConfig, patch_nums: Sequence[int], vocab_size: int, z_channels: int):
        super().__init__(config, patch_nums, vocab_size, z_channels)
        C = config.width
        self.word_embed = nn.Linear(z_channels, C)
        self.blocks = _block_stack(config, range(config.depth))
        self.head_nm = AdaLNHead(C, config.norm_eps)
        self.head = nn.Linear(C, vocab_size)

    def scale_tokens(self, k: int, context: torch.Tensor) -> torch.Tensor:
        return self.word_embed(context.flatten(2).transpose(1, 2)) + self.level_position(k)

    def sampling_cache(self) -> list[LayerCache]:
        """A KV cache per block: each scale attends to the earlier ones."""
        return [LayerCache() for _ in self.blocks]

    def next_scale(self, x: torch.Tensor, cond: torch.Tensor, cond_BD: torch.Tensor, cache: list[LayerCache] | None) -> torch.Tensor:
        """Logits (B, l, V) for one scale, attending to it and the earlier scales in `cache` (which it
        extends by this scale)."""
        for block, layer in zip(self.blocks, cache, strict=True):
            x = block(x, cond, dense_attend, layer)
        return self._sampling_logits(self.head(self.head_nm(x.float(), cond_BD)))

    @property
    def next_scale_head(self) -> nn.Linear:
        return self.head

    def forward_next_scale(self, labels: torch.Tensor, teacher_input: torch.Tensor, attention: AttentionFn | None = None) -> torch.Tensor:
        return self.head(self.forward_next_scale_features(labels, teacher_input, attention)).float()

    def forward_next_scale_features(self, labels: torch.Tensor, teacher_input: torch.Tensor, attention: AttentionFn | None = None) -> torch.Tensor:
        """What `forward_next_scale` feeds its logits head (`next_scale_head`): (B, L, C)."""
        x, cond_BD, cond = self._sequence_inputs(labels, self.word_embed(teacher_input.float()))
        x = self._run(self.blocks, x, cond, sequence_attend(attention or self.attention, self.block_sizes, self.pattern))
        return self.head_nm(x.float(), cond_BD)


def build_transformer(config: TransformerConfig, patch_nums: Sequence[int], vocab_size: int, z_channels: int) -> ScaleTransformer:
    kind = HMAR if config.family == "hmar" else VAR
    return kind(config, patch_nums, vocab_size, z_channels)
