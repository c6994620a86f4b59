"""Per-scale loss weights, the stage-1 and stage-2 losses, and stage 2's masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmar.train.losses import masked_token_loss, next_scale_loss, scale_weights
from hmar.train.options import LOSS_WEIGHTINGS
from hmar.train.stage2 import draw_masks

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


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
    loss, stats = next_scale_loss(logits, targets, scale_weights("unweighted", (1, 2, 3)), (1, 2, 3))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    equal, _ = next_scale_loss(logits, targets, scale_weights("equal", (1, 2, 3)), (1, 2, 3))
    assert equal.item() == pytest.approx(stats.loss.mean().item(), rel=1e-5)
    per_scale_acc = [(logits[:, s:e].argmax(-1) == targets[:, s:e]).float().mean() for s, e in ((0, 1), (1, 5), (5, 14))]
    assert torch.allclose(stats.accuracy, torch.stack(per_scale_acc))


def test_masked_loss_counts_only_masked_tokens():
    logits, targets = _logits_and_targets()
    masked = draw_masks(3, (1, 2, 3), torch.device("cpu"))
    loss, stats = masked_token_loss(logits, targets, masked, (1, 2, 3))
    expected = F.cross_entropy(logits[masked], targets[masked])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats.counts.sum().item() == masked.sum().item()


def test_masks_hide_between_one_and_all_tokens_of_each_scale():
    torch.manual_seed(0)
    masked = draw_masks(256, (1, 2, 4), torch.device("cpu"))
    for s, e in ((0, 1), (1, 5), (5, 21)):
        counts = masked[:, s:e].sum(1)
        assert counts.min() >= 1 and counts.max() <= e - s
    counts = masked[:, 5:21].sum(1).float()
    assert 6 < counts.mean() < 11  # γ ~ U(0,1): about half of the scale on average
    assert len(set(counts.tolist())) > 8  # per-sample ratios, not one shared ratio
