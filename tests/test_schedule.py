import pytest
from hypothesis import given, strategies as st

from hmar.config import PATCH_NUMS
from hmar.errors import ScheduleError
from hmar.schedule import (
    counts_for_steps, format_schedule, parse_schedule, resolve_schedule, schedule_for_steps, validate_schedule,
)

AUTHORS_DEFAULT = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]


def test_fourteen_steps_is_the_authors_default():
    assert schedule_for_steps(PATCH_NUMS[256], 14) == AUTHORS_DEFAULT
    assert resolve_schedule(PATCH_NUMS[256]) == AUTHORS_DEFAULT


def test_one_step_per_scale_at_the_minimum():
    assert schedule_for_steps(PATCH_NUMS[256], 10) == [[p * p] for p in PATCH_NUMS[256]]


def test_extra_steps_go_to_the_earliest_multi_token_scales_first():
    fifteen = schedule_for_steps(PATCH_NUMS[256], 15)
    assert fifteen[:3] == AUTHORS_DEFAULT[:3] and len(fifteen[3]) == 2 and fifteen[4:] == AUTHORS_DEFAULT[4:]
    eleven = schedule_for_steps(PATCH_NUMS[256], 11)
    assert eleven[1] == [1, 3] and eleven[2:] == [[p * p] for p in PATCH_NUMS[256][2:]]


@given(st.sampled_from(sorted(PATCH_NUMS)), st.data())
def test_any_valid_step_count_gives_a_valid_schedule(resolution, data):
    patch_nums = PATCH_NUMS[resolution]
    steps = data.draw(st.integers(len(patch_nums), min(sum(p * p for p in patch_nums), 400)))
    schedule = schedule_for_steps(patch_nums, steps)
    assert sum(len(e) for e in schedule) == steps
    assert validate_schedule(schedule, patch_nums) == schedule


@pytest.mark.parametrize("steps", [0, 9, 681])
def test_steps_out_of_range_is_an_error(steps):
    with pytest.raises(ScheduleError, match="between 10 .* and 680"):
        schedule_for_steps(PATCH_NUMS[256], steps)


@given(st.integers(1, 300), st.data())
def test_counts_cover_the_scale(tokens, data):
    steps = data.draw(st.integers(1, tokens))
    counts = counts_for_steps(tokens, steps)
    assert len(counts) == steps and sum(counts) == tokens and min(counts) >= 1


def test_parse_and_format_round_trip():
    text = "1;1,3;1,1,2,5;16;25;36;64;100;169;256"
    assert parse_schedule(text) == AUTHORS_DEFAULT
    assert format_schedule(parse_schedule(text)) == text
    assert resolve_schedule(PATCH_NUMS[256], schedule=text) == AUTHORS_DEFAULT


@pytest.mark.parametrize("text, message", [
    ("1;1,3;1,1,2,5", "has 3 scales but the model has 10"),
    ("1;1,2;1,1,2,5;16;25;36;64;100;169;256", r"entry 2 of 10 sums to 3, but that scale \(2x2\) has 4 tokens"),
    ("1;1,x;9;16;25;36;64;100;169;256", "not a comma-separated list of integers"),
    ("1;0,4;9;16;25;36;64;100;169;256", "must be positive"),
])
def test_bad_schedules_name_the_problem(text, message):
    with pytest.raises(ScheduleError, match=message):
        resolve_schedule(PATCH_NUMS[256], schedule=text)


def test_var_samples_one_step_per_scale():
    assert resolve_schedule(PATCH_NUMS[256], family="var") == [[p * p] for p in PATCH_NUMS[256]]
    assert resolve_schedule(PATCH_NUMS[256], steps=10, family="var") == [[p * p] for p in PATCH_NUMS[256]]
    with pytest.raises(ScheduleError, match="exactly one step per scale"):
        resolve_schedule(PATCH_NUMS[256], steps=14, family="var")
    with pytest.raises(ScheduleError, match="exactly one step per scale"):
        resolve_schedule(PATCH_NUMS[256], schedule=AUTHORS_DEFAULT, family="var")


def test_steps_and_schedule_together_is_an_error():
    with pytest.raises(ScheduleError, match="either steps or a schedule"):
        resolve_schedule(PATCH_NUMS[256], steps=14, schedule=AUTHORS_DEFAULT)
