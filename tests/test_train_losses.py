"""Per-scale loss weights, the stage-1 and stage-2 losses, stage 2's masks, and the chunked loss the
stages train with (same loss and gradients as scoring all logits at once, without keeping them)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hmar.attention import per_scale_sdpa
from hmar.checkpoints import build_models
from hmar.config import PATCH_NUMS as PATCH_NUMS_BY_RESOLUTION
from hmar.config import ModelConfig
from hmar.train.losses import masked_token_loss, next_scale_loss, scale_weights, score_features, score_logits
from hmar.train.options import LOSS_WEIGHTINGS
from hmar.train.stage1 import NextScaleObjective
from hmar.train.stage2 import MaskedObjective, draw_masks
from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

PATCH_NUMS = PATCH_NUMS_BY_RESOLUTION[256]


@pytest.mark.parametrize("scheme", LOSS_WEIGHTINGS)
def test_weights_are_normalised_and_positive(scheme):
    w = scale_weights(scheme, PATCH_NUMS)
    assert w.shape == (len(PATCH_NUMS),) and torch.all(w > 0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_weight_shapes():
    lognormal = scale_weights("lognormal", PATCH_NUMS)
    peak = int(lognormal.argmax())
    assert 0 < peak < len(PATCH_NUMS) // 2  # an early-intermediate scale weighs most
    assert torch.all(lognormal[peak:].diff() < 0) and torch.all(lognormal[: peak + 1].diff() > 0)
    assert torch.all(scale_weights("linear", PATCH_NUMS).diff() > 0)
    assert torch.all(scale_weights("sqrt", PATCH_NUMS).diff() > 0)
    assert torch.all(scale_weights("exp_decay", PATCH_NUMS).diff() < 0)
    assert torch.allclose(scale_weights("equal", PATCH_NUMS), torch.full((10,), 0.1))
    # moving the log-normal's centre moves its peak
    assert int(scale_weights("lognormal", PATCH_NUMS, mu=-0.1).argmax()) > peak


def _logits_and_targets(patch_nums=(1, 2, 3), batch=3, vocab=7):
    L = sum(p * p for p in patch_nums)
    return torch.randn(batch, L, vocab), torch.randint(0, vocab, (batch, L))


def test_unweighted_is_plain_cross_entropy_and_equal_averages_scales():
    logits, targets = _logits_and_targets()
    plain = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
    scores = score_logits(logits, targets)
    loss, stats = next_scale_loss(scores, scale_weights("unweighted", (1, 2, 3)), (1, 2, 3))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    equal, _ = next_scale_loss(scores, scale_weights("equal", (1, 2, 3)), (1, 2, 3))
    assert equal.item() == pytest.approx(stats.loss.mean().item(), rel=1e-5)
    per_scale_acc = [(logits[:, s:e].argmax(-1) == targets[:, s:e]).float().mean() for s, e in ((0, 1), (1, 5), (5, 14))]
    assert torch.allclose(stats.accuracy, torch.stack(per_scale_acc))


def test_masked_loss_counts_only_masked_tokens():
    logits, targets = _logits_and_targets()
    masked = draw_masks(3, (1, 2, 3), torch.device("cpu"))
    loss, stats = masked_token_loss(score_logits(logits[masked], targets[masked]), masked, (1, 2, 3))
    expected = F.cross_entropy(logits[masked], targets[masked])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats.counts.sum().item() == masked.sum().item()
    scale_2 = masked[:, 5:]
    assert stats.loss[2].item() == pytest.approx(F.cross_entropy(logits[:, 5:][scale_2], targets[:, 5:][scale_2]).item(), rel=1e-5)
    assert stats.accuracy[2] == (logits[:, 5:][scale_2].argmax(-1) == targets[:, 5:][scale_2]).float().mean()


def test_masks_hide_between_one_and_all_tokens_of_each_scale():
    torch.manual_seed(0)
    masked = draw_masks(256, (1, 2, 4), torch.device("cpu"))
    for s, e in ((0, 1), (1, 5), (5, 21)):
        counts = masked[:, s:e].sum(1)
        assert counts.min() >= 1 and counts.max() <= e - s
    counts = masked[:, 5:21].sum(1).float()
    assert 6 < counts.mean() < 11  # γ ~ U(0,1): about half of the scale on average
    assert len(set(counts.tolist())) > 8  # per-sample ratios, not one shared ratio


# ------------------------------------------------------------------ the chunked loss

def test_scoring_features_in_chunks_equals_scoring_all_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    features = torch.randn(3, 7, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    reference = score_logits(head(features), targets)
    weights = torch.rand(3, 7)
    expected = torch.autograd.grad((reference.ce * weights).sum(), [features, head.weight, head.bias])
    for rows in (1, 4, 21, 50):  # chunks of single tokens, chunks across the batch, one chunk, more than all
        scores = score_features(features, head, targets, logits_per_chunk=rows * 11)
        assert torch.equal(scores.correct, reference.correct)
        torch.testing.assert_close(scores.ce, reference.ce, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad((scores.ce * weights).sum(), [features, head.weight, head.bias])
        for grad, want in zip(grads, expected):
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    empty = score_features(features[:0], head, targets[:0])
    assert empty.ce.shape == (0, 7) and empty.correct.shape == (0, 7)


def _largest_saved(run) -> tuple[int, ...]:
    """Shape of the largest tensor autograd keeps for the backward while `run` executes."""
    shapes = []

    def keep(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        run()
    return max(shapes, key=lambda s: torch.Size(s).numel())


def test_the_chunked_loss_keeps_no_logits_for_the_backward():
    head, targets = torch.nn.Linear(8, 64), torch.randint(0, 64, (4, 30))
    features = torch.randn(4, 30, 8, requires_grad=True)
    whole = _largest_saved(lambda: score_logits(head(features), targets).ce.sum().backward())
    chunked = _largest_saved(lambda: score_features(features, head, targets, logits_per_chunk=16 * 64).ce.sum().backward())
    assert torch.Size(whole).numel() >= 4 * 30 * 64  # all logits (or their log-softmax) at once
    assert torch.Size(chunked).numel() < 16 * 64  # not even one chunk's logits: the backward recomputes them


def _tiny_model(family: str):
    torch.manual_seed(0)
    config = ModelConfig(tiny_tokenizer_config(), dataclasses.replace(tiny_transformer_config(), family=family, cond_drop_rate=0.5))
    return build_models(config)[1].train()


def _loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same label dropout (and stage-2 masks) in both paths
    loss, numbers = run()
    loss.backward()
    return loss.detach(), numbers, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(chunked, reference):
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-6, atol=1e-6)
    for name in reference[1]:
        torch.testing.assert_close(chunked[1][name], reference[1][name], rtol=1e-5, atol=1e-6)
    assert chunked[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_stage1_objective_equals_the_loss_over_all_logits(family):
    model = _tiny_model(family)
    B, L, first = 3, sum(model.block_sizes), model.block_sizes[0]
    labels, targets = torch.tensor([1, 4, 7]), torch.randint(0, model.vocab_size, (B, L))
    teacher = torch.randn(B, L - first, model.z_channels)
    weights = scale_weights("lognormal", model.patch_nums)

    def reference():
        logits = model.forward_next_scale(labels, teacher)
        loss, stats = next_scale_loss(score_logits(logits, targets), weights, model.patch_nums)
        return loss, {"loss_per_scale": stats.loss, "acc_per_scale": stats.accuracy}

    objective = NextScaleObjective(model, per_scale_sdpa, weights, logits_per_chunk=7 * model.vocab_size)
    _assert_same(_loss_and_grads(model, lambda: objective(labels, teacher, targets)), _loss_and_grads(model, reference))


def test_stage2_objective_equals_the_loss_over_all_logits():
    model = _tiny_model("hmar")
    B, L, first = 3, sum(model.block_sizes), model.block_sizes[0]
    labels, targets = torch.tensor([1, 4, 7]), torch.randint(0, model.vocab_size, (B, L - first))
    teacher, own = torch.randn(B, L - first, model.z_channels), torch.randn(B, L - first, model.z_channels)
    rest = model.patch_nums[1:]

    def reference():
        masked = draw_masks(B, rest, labels.device)
        logits = model.forward_masked(labels, teacher, own, masked)[:, first:]
        loss, stats = masked_token_loss(score_logits(logits[masked], targets[masked]), masked, rest)
        return loss, {f"loss_per_scale/scale_{k + 1}": v for k, v in enumerate(stats.loss)}

    objective = MaskedObjective(model, per_scale_sdpa, logits_per_chunk=5 * model.vocab_size)
    _assert_same(_loss_and_grads(model, lambda: objective(labels, teacher, own, targets)), _loss_and_grads(model, reference))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_under_bf16_the_chunked_loss_matches_all_logits_with_a_lower_peak():
    from hmar.benchmark import bench_config
    from hmar.config import tokenizer_preset
    from hmar.train.benchmark import stage1_objective

    config = bench_config("hmar", 2, 256, tokenizer_preset(256))  # V = 4096, L = 680: 43,520 tokens at batch 64
    transformer = build_models(config)[1].cuda().eval()
    B, L, first = 64, sum(p * p for p in config.patch_nums), config.patch_nums[0] ** 2
    inputs = (torch.randint(0, 1000, (B,), device="cuda"), torch.randn(B, L - first, config.tokenizer.z_channels, device="cuda"),
              torch.randint(0, config.tokenizer.vocab_size, (B, L), device="cuda"))
    weights = scale_weights("lognormal", config.patch_nums).cuda()
    results = {}
    for path in ("logits", "chunked") * 2:  # the first round warms up (cuBLAS workspaces, kernel caches)
        transformer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = stage1_objective(transformer, per_scale_sdpa, weights, path)(*inputs)[0]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None])
        results[path] = (loss.detach(), grads, torch.cuda.max_memory_allocated() - before)
    (loss, grads, peak), (want, want_grads, want_peak) = results["chunked"], results["logits"]
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    assert (grads - want_grads).norm() / want_grads.norm() < 1e-2
    all_logits_bytes = 4 * B * L * config.tokenizer.vocab_size  # float32
    assert want_peak - peak > all_logits_bytes / 2, (peak, want_peak)
