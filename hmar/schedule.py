"""Mask schedules: how many tokens of each scale are committed at each sampling step.

A schedule has one entry per scale; an entry lists the tokens committed at each step and sums to
the scale's token count pn². Step 1 of a scale is the next-scale prediction (all tokens drawn);
each further step re-masks the least confident of them and the mask branch re-predicts those.
Written as text, scales are separated by `;` and steps by `,`: "1;1,3;1,1,2,5;16;25;…".

`schedule_for_steps(patch_nums, N)` turns a step budget into a schedule. Extra steps beyond one per
scale go to the earliest multi-token scales first (the paper found early-scale steps matter most),
each filled up to ⌈log2 pn²⌉ steps with counts 1, 1, 2, 4, … and the rest in the last step; past
that, scales are filled again, earliest first, up to one token a step. At 256 px, 14 steps give the
authors' default [[1],[1,3],[1,1,2,5],[16],[25],[36],[64],[100],[169],[256]].
"""
from __future__ import annotations

import math
from typing import Sequence

from hmar.errors import ScheduleError

Schedule = list[list[int]]

DEFAULT_STEPS = 14


def counts_for_steps(tokens: int, steps: int) -> list[int]:
    """Split a scale's tokens over `steps` steps: doubling counts while they fit, else near-even."""
    if not 1 <= steps <= tokens:
        raise ScheduleError(f"a scale of {tokens} tokens takes 1 to {tokens} steps, not {steps}")
    if steps <= _doubling_cap(tokens):
        head = [1] + [2**i for i in range(steps - 2)] if steps > 1 else []
        return head + [tokens - sum(head)]
    base, extra = divmod(tokens, steps)
    return [base] * (steps - extra) + [base + 1] * extra


def _doubling_cap(tokens: int) -> int:
    return max(1, math.ceil(math.log2(tokens))) if tokens > 1 else 1


def schedule_for_steps(patch_nums: Sequence[int], steps: int) -> Schedule:
    sizes = [p * p for p in patch_nums]
    if not len(sizes) <= steps <= sum(sizes):
        raise ScheduleError(f"steps must be between {len(sizes)} (one per scale) and {sum(sizes)} (one per token), got {steps}")
    per_scale = [1] * len(sizes)
    extra = steps - len(sizes)
    for cap in (_doubling_cap, lambda n: n):  # first the doubling fill, then up to one token a step
        for k, n in enumerate(sizes):
            grant = min(extra, max(0, cap(n) - per_scale[k]))
            per_scale[k] += grant
            extra -= grant
    return [counts_for_steps(n, s) for n, s in zip(sizes, per_scale)]


def parse_schedule(text: str) -> Schedule:
    """Parse "1;1,3;1,1,2,5;…" (whitespace allowed)."""
    schedule: Schedule = []
    entries = text.strip().split(";")
    for k, entry in enumerate(entries):
        try:
            counts = [int(c) for c in entry.split(",")]
        except ValueError:
            raise ScheduleError(f"schedule entry {k + 1} of {len(entries)} ({entry.strip()!r}) is not a comma-separated "
                                f"list of integers") from None
        schedule.append(counts)
    return schedule


def format_schedule(schedule: Schedule) -> str:
    return ";".join(",".join(str(c) for c in entry) for entry in schedule)


def validate_schedule(schedule: Sequence[Sequence[int]], patch_nums: Sequence[int]) -> Schedule:
    """Check a schedule against the model's scales and return it as plain lists."""
    if len(schedule) != len(patch_nums):
        raise ScheduleError(f"schedule has {len(schedule)} scales but the model has {len(patch_nums)} (patch_nums {list(patch_nums)})")
    out: Schedule = []
    for k, (entry, pn) in enumerate(zip(schedule, patch_nums)):
        counts = [int(c) for c in entry]
        if not counts or any(c <= 0 for c in counts):
            raise ScheduleError(f"schedule entry {k + 1} of {len(patch_nums)} must be positive counts, got {counts}")
        if sum(counts) != pn * pn:
            raise ScheduleError(f"schedule entry {k + 1} of {len(patch_nums)} sums to {sum(counts)}, but that scale "
                                f"({pn}x{pn}) has {pn * pn} tokens")
        out.append(counts)
    return out


def one_step_per_scale(patch_nums: Sequence[int]) -> Schedule:
    return [[p * p] for p in patch_nums]


def resolve_schedule(patch_nums: Sequence[int], steps: int | None = None, schedule=None, family: str = "hmar") -> Schedule:
    """The schedule a sampler runs: explicit (text or lists) or from a step count; VAR has one step per scale."""
    if steps is not None and schedule is not None:
        raise ScheduleError("give either steps or a schedule, not both")
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule)
    if family == "var":
        if schedule is not None:
            schedule = validate_schedule(schedule, patch_nums)
            if any(len(entry) != 1 for entry in schedule):
                raise ScheduleError("VAR models sample exactly one step per scale; the schedule has multi-step scales")
            return schedule
        if steps is not None and steps != len(patch_nums):
            raise ScheduleError(f"VAR models sample exactly one step per scale: steps must be {len(patch_nums)}, got {steps}")
        return one_step_per_scale(patch_nums)
    if schedule is not None:
        return validate_schedule(schedule, patch_nums)
    return schedule_for_steps(patch_nums, DEFAULT_STEPS if steps is None else steps)
