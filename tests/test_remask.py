"""Which tokens HMAR re-masks: exactly what the authors' sampler takes (the conformance README's
"least confident"): PyTorch's default ascending argsort of the confidences on the model's device,
over the scale's whole row at the first re-mask, then over the masked subset, its confidences
gathered in the subset's current order, keeping the first n. Rows longer than 16 tokens of equal
confidences (every row with top_k = 1) are where a stable sort, or a sort over a padded full-length
row, picks other tokens; the fixtures' short rows cannot show it, so these tests build such rows."""
from __future__ import annotations

import contextlib

import pytest
import torch

from hmar.sampler import _Batch, _refine_scale, _Steps, least_confident

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]

# Schedule entries of one scale (tokens committed per step; the scale has sum(entry) tokens).
ENTRIES = [[1, 1, 2, 5], [16], [25], [5, 10, 10], [3, 7, 15], [64, 64, 128], [100, 100, 56], [1, 255]]


def _rows(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "tied":
        return torch.ones(shape)
    if kind == "mixed":  # long runs of ties between a few distinct values
        return torch.randint(0, 4, shape, generator=generator).float().div(4)
    return torch.rand(shape, generator=generator)


def _described(confidences: list[torch.Tensor], entry: list[int]) -> list[list[list[int]]]:
    """The description, row by row with lists: per step j >= 1, the masked positions of each row in
    their order. confidences[j - 1] (B, l): the confidences the step's choice sees."""
    chosen: list[list[int] | None] = [None] * confidences[0].shape[0]
    steps = []
    for j in range(1, len(entry)):
        n = sum(entry[j:])
        for row, previous in enumerate(chosen):
            confidence = confidences[j - 1][row]
            if previous is None:
                chosen[row] = torch.argsort(confidence).tolist()[:n]
            else:
                subset = confidence[torch.tensor(previous, device=confidence.device)]
                chosen[row] = [previous[i] for i in torch.argsort(subset).tolist()[:n]]
        steps.append([list(c) for c in chosen])
    return steps


def _chained(confidences: list[torch.Tensor], entry: list[int]) -> list[list[list[int]]]:
    candidates, steps = None, []
    for j in range(1, len(entry)):
        candidates = least_confident(confidences[j - 1], sum(entry[j:]), candidates)
        steps.append(candidates.tolist())
    return steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["tied", "mixed", "distinct"])
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: ",".join(map(str, e)))
def test_least_confident_follows_the_description(entry, kind, device):
    """On each device its own sort decides (CUDA orders ties otherwise than the CPU)."""
    l, B = sum(entry), 3
    confidences = [_rows(kind, (B, l), seed).to(device) for seed in range(max(len(entry) - 1, 1))]
    assert _chained(confidences, entry) == _described(confidences, entry)


def test_a_stable_or_padded_sort_would_be_caught():
    """On this torch build the tie cases above discriminate: a stable sort, or an unstable one over the
    full row with the unmasked positions padded by +inf, masks other sets of tokens."""
    if torch.equal(torch.argsort(torch.ones(1, 25)), torch.arange(25).unsqueeze(0)):
        pytest.skip("this torch build orders 25 ties by position: the tie cases cannot tell a stable sort apart")
    entry, ties = [64, 64, 128], torch.ones(2, 256)
    ours = [[set(row) for row in step] for step in _chained([ties, ties], entry)]
    stable = torch.argsort(ties, stable=True)
    assert ours[0] != [set(row) for row in stable[:, :192].tolist()]
    assert ours[1] != [set(row) for row in stable[:, :128].tolist()]
    first = torch.tensor([sorted(row) for row in ours[0]])
    padded = torch.full_like(ties, torch.inf).scatter(1, first, 1.0)
    assert ours[1] != [set(row) for row in torch.argsort(padded)[:, :128].tolist()]


class _ConstantMaskBranch:
    """A mask branch whose logits favour token 0 at every position: with top_k 1 every drawn token
    has probability exactly 1.0, so only the tie order decides what is re-masked. Records the
    masks it is given."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.masks = vocab_size, []

    def masked_scale_tokens(self, k, context, current, masked):
        self.masks.append(masked.clone())
        return masked.unsqueeze(-1).float()

    def masked(self, x, cond, cond_BD):
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab_size)
        logits[..., 0] = 1.0
        return logits


class _NoTokenizer:
    def scale_input(self, tokens, k):
        return None


def _refine(entry: list[int], B: int, keep: torch.Tensor | None = None):
    l, vocab = sum(entry), 8
    branch = _ConstantMaskBranch(vocab)
    tokens = torch.arange(B * l).view(B, l) % vocab
    confidence = torch.ones(B, l)  # the next-scale step's draws, top_k 1
    steps = _Steps([entry], None)
    batch = _Batch(_NoTokenizer(), branch, None, None, 1.5, 1, 0.0, None, contextlib.nullcontext(), steps)
    out, bad = _refine_scale(batch, 0, None, tokens, confidence, torch.tensor(False), entry, keep)
    return tokens, out, bad, branch.masks, steps


@pytest.mark.parametrize("entry", [e for e in ENTRIES if len(e) > 1], ids=lambda e: ",".join(map(str, e)))
def test_refine_scale_masks_what_the_description_masks(entry):
    B, l = 2, sum(entry)
    tokens, out, bad, masks, steps = _refine(entry, B)
    expected = _described([torch.ones(B, l)] * (len(entry) - 1), entry)
    assert len(masks) == len(entry) - 1 and steps.done == len(entry) - 1 and not bad
    for mask, rows in zip(masks, expected):
        assert [sorted(torch.nonzero(m).flatten().tolist()) for m in mask] == [sorted(r) for r in rows]
    assert torch.equal(out, torch.where(masks[0], 0, tokens))  # re-predicted tokens only, all token 0


@pytest.mark.parametrize("entry", [[5, 10, 10], [64, 64, 128]], ids=lambda e: ",".join(map(str, e)))
def test_editing_never_remasks_a_known_token_and_masks_its_share(entry):
    B, l = 3, sum(entry)
    keep = torch.zeros(B, l, dtype=torch.bool)
    keep[1, : l // 2] = True  # half known
    keep[2] = True  # all known
    keep[2, 7] = False  # but one
    tokens, out, bad, masks, _ = _refine(entry, B, keep)
    unknown = (~keep).sum(dim=1)
    for j, mask in enumerate(masks, start=1):
        n = sum(entry[j:])
        assert not (mask & keep).any(), f"step {j}: a known token was re-masked"
        assert mask.sum(dim=1).tolist() == [(u * n + l // 2) // l for u in unknown.tolist()]
        if j > 1:
            assert not (mask & ~masks[j - 2]).any(), f"step {j}: the masked set grew"
    assert torch.equal(out[keep], tokens[keep])
    # nothing known: exactly the plain computation
    _, plain_out, _, plain_masks, _ = _refine(entry, B)
    _, free_out, _, free_masks, _ = _refine(entry, B, torch.zeros(B, l, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(plain_masks, free_masks)) and torch.equal(plain_out, free_out)
