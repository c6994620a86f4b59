"""hmar.edit_window: the windows the model sees (a context window per group of regions, or the whole
image's square), the plan of an edit and the way back (bit-exact outside every region)."""
from __future__ import annotations

import numpy as np
import pytest

from hmar import edit_window, regions
from hmar.edit_window import DEFAULT_CONTEXT, Context, Window, context_window, parse_context, plan_edit, region_windows
from hmar.errors import InputError, library_spelling, worded
from hmar_cli.flags import text
from hmar.regions import Box
from tests.test_images import random_rgb

RESOLUTION = 80


def boxes_mask(size: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    regenerate = np.zeros((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        regenerate[y0:y1, x0:x1] = True
    return regenerate


def inside_image(window: Window, size: tuple[int, int]) -> bool:
    x0, y0, x1, y1 = window.bounds
    return x0 >= 0 and y0 >= 0 and x1 <= size[0] and y1 <= size[1]


def contains(window: Window, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = window.bounds
    return x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]


# ---- --context ----------------------------------------------------------------------------------
def test_parse_context():
    assert parse_context("full").full and parse_context(" Full ").full
    assert parse_context("64") == Context(pixels=64) and str(parse_context("64")) == "64"
    assert parse_context("0.5") == DEFAULT_CONTEXT and str(DEFAULT_CONTEXT) == "0.5"
    assert parse_context("1.") == Context(fraction=1.0) and parse_context(".25") == Context(fraction=0.25)


@pytest.mark.parametrize("text", ["", "-3", "abc", "1e3", "nan", "inf", "0.5px", "200.0", "64,64"])
def test_bad_contexts_are_one_line_errors(text):
    with pytest.raises(InputError, match="^context must be whole pixels"):
        parse_context(text)


# ---- one region: the window's choice --------------------------------------------------------------
def test_small_region_in_a_large_photo_gets_a_window_around_it():
    """A 4000x3000 photo (nothing is allocated: the choice is arithmetic): the 1000-px region is
    seen in a 2000-px window centred on it, not the 3000-px centred square; a 40-px region in one of
    the model's resolution, so it is not enlarged at all."""
    size, region = (4000, 3000), (1500, 1000, 2500, 2000)
    window = context_window(size, region, 128, DEFAULT_CONTEXT)
    assert window == Window(1000, 500, 2000)
    assert context_window(size, region, 128, Context(pixels=200)) == Window(1300, 800, 1400)
    # a context below an eighth of the region is raised to it: the model always sees surroundings
    assert context_window(size, region, 128, Context(pixels=0)) == Window(1375, 875, 1250)
    small = context_window(size, (1500, 1000, 1540, 1040), 128, DEFAULT_CONTEXT)
    assert small.side == 128 and contains(small, (1500, 1000, 1540, 1040)) and inside_image(small, size)


def test_region_at_a_corner_shifts_the_window_inside_the_image():
    size = (4000, 3000)
    for box in ((0, 0, 200, 200), (3800, 2850, 4000, 3000)):
        window = context_window(size, box, 128, DEFAULT_CONTEXT)
        assert window.side == 400 and contains(window, box) and inside_image(window, size)


def test_region_larger_than_the_image_allows_is_capped_by_the_whole_square_and_noted():
    """A 600-px region of a 1200x900 photo: context would make 1200 px, more than the 900-px
    square; the window is that square (never past the edges), and the 11x enlargement is noted."""
    size = (1200, 900)
    regenerate = boxes_mask(size, (300, 150, 900, 750))
    plan = plan_edit(random_rgb(*size), regenerate, RESOLUTION)
    assert [view.window for view in plan.views] == [Window(150, 0, 900)]
    assert plan.views[0].enlargement == 900 / RESOLUTION
    [note] = map(text, plan.notes)  # as the CLI prints it (the library names the argument `context`)
    assert note == ("the 600x600 region is generated at 53x53 pixels by the 80 px model and enlarged 11.2x: a smaller region "
                    "or a smaller --context (now 0.5; at least 0.125 of the region is kept) would keep more detail")
    full = plan_edit(random_rgb(*size), regenerate, RESOLUTION, context=Context())
    assert "instead of --context full" in text(full.notes[0])
    assert "instead of context=full" in worded(full.notes[0], library_spelling)


def test_region_wider_than_the_short_side_reaches_past_the_edges():
    size = (320, 100)
    window = context_window(size, (0, 10, 300, 60), RESOLUTION, DEFAULT_CONTEXT)
    assert window == Window(0, -100, 300)


def test_full_context_is_the_whole_square():
    size = (300, 100)
    regenerate = boxes_mask(size, (250, 40, 290, 60))
    grouped = region_windows(regenerate, RESOLUTION, Context())
    assert grouped.windows == [edit_window.square_window(size, regenerate)] == [Window(200, 0, 100)]
    assert region_windows(regenerate, RESOLUTION).windows == [Window(220, 10, RESOLUTION)]


def test_square_window_contains_the_region_and_is_centred_otherwise():
    region = np.zeros((100, 300), dtype=bool)
    assert edit_window.square_window((300, 100), region) == Window(100, 0, 100)
    region[40:60, 250:290] = True
    window = edit_window.square_window((300, 100), region)
    assert window.side == 100 and window.x0 <= 250 and window.x0 + 100 >= 290 and window.x0 + 100 <= 300
    region[:, 10:290] = True
    wide = edit_window.square_window((300, 100), region)
    assert wide.side == 280 and wide.y0 < 0 and wide.x0 == 10


# ---- outpainting strips -----------------------------------------------------------------------------
def test_outpaint_strips_get_windows_with_the_nearest_known_pixels():
    original = random_rgb(256, 192)
    canvas, regenerate = regions.extend_canvas(original, regions.outpaint_margins(original.size, left=96, right=96))
    grouped = region_windows(regenerate, RESOLUTION)
    assert grouped.windows == [Window(0, 0, 192), Window(256, 0, 192)]  # one per strip, each half known pixels
    for g, window in enumerate(grouped.windows):
        known = ~regenerate[:, max(window.x0, 0):window.x0 + window.side]
        assert known.any() and (grouped.groups[regenerate] > 0).all()
    bottom = region_windows(regions.extend_canvas(original, regions.outpaint_margins(original.size, bottom=40))[1], RESOLUTION)
    assert bottom.windows == [Window(0, -12, 256)]  # the strip's width, centred on the canvas: 192 known rows of 256
    band = region_windows(regions.extend_canvas(original, regions.outpaint_margins(original.size, expand=1.5))[1], RESOLUTION)
    assert band.windows == [Window(0, -48, 384)]  # one band around the image: the whole canvas, as --context full


def test_a_thin_strip_beside_a_small_image_still_sees_some_of_it():
    """--left 100 on a 64x48 image: the strip alone would fill the whole-image square; the window
    grows past the top and bottom (edge pixels repeated) to hold a known margin."""
    window = context_window((164, 48), (0, 0, 100, 48), RESOLUTION, DEFAULT_CONTEXT)
    assert window.x0 == 0 and window.side == 126


def test_a_window_over_the_pixel_limit_is_refused_before_it_is_made():
    original = random_rgb(2000, 10)
    regenerate = boxes_mask(original.size, (0, 0, 2000, 10))
    with pytest.raises(InputError, match="model's view of this region would be 2000x2000 pixels"):
        plan_edit(original, regenerate, RESOLUTION, max_pixels=1_000_000)


# ---- several regions ------------------------------------------------------------------------------
def test_far_apart_regions_get_one_window_each_near_ones_share_one():
    size = (600, 400)
    far = region_windows(boxes_mask(size, (20, 20, 60, 60), (500, 300, 560, 360)), RESOLUTION)
    assert len(far.windows) == 2 and np.unique(far.groups).tolist() == [0, 1, 2]
    assert contains(far.windows[0], (20, 20, 60, 60)) and contains(far.windows[1], (500, 300, 560, 360))
    near = region_windows(boxes_mask(size, (100, 100, 140, 140), (150, 100, 190, 140)), RESOLUTION)
    assert len(near.windows) == 1 and contains(near.windows[0], (100, 100, 190, 140))
    assert np.unique(near.groups).tolist() == [0, 1]
    assert region_windows(np.zeros((8, 8), dtype=bool), RESOLUTION).windows == []


def test_grouping_repeats_when_a_merged_window_reaches_a_third_region():
    """A and B overlap; their joint window is larger and reaches C, whose own window reached
    neither: all three end up in one group."""
    size = (1000, 1000)
    a, b, c = (400, 400, 440, 440), (450, 400, 490, 440), (540, 380, 580, 420)
    alone = [context_window(size, box, RESOLUTION, DEFAULT_CONTEXT) for box in (a, b, c)]
    assert alone[1].bounds[2] <= alone[2].bounds[0]  # B's and C's windows do not overlap
    grouped = region_windows(boxes_mask(size, a, b, c), RESOLUTION)
    assert len(grouped.windows) == 1 and all(contains(grouped.windows[0], box) for box in (a, b, c))


def test_abutting_windows_stay_apart_and_windows_never_overlap():
    size = (640, 160)
    grouped = region_windows(boxes_mask(size, *[(x, 60, x + 40, 100) for x in range(20, 640, 160)]), RESOLUTION)
    assert len(grouped.windows) == 4
    spans = sorted((w.bounds[0], w.bounds[2]) for w in grouped.windows)
    assert all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))


def test_too_many_groups_become_one_window_with_a_note():
    size = (1800, 1800)
    dots = [(x, y, x + 4, y + 4) for x in range(40, 1800, 200) for y in range(40, 1800, 200)]
    grouped = region_windows(boxes_mask(size, *dots), RESOLUTION)
    assert len(grouped.windows) == 1 and "more than 16" in grouped.notes[0]


# ---- the plan and the way back --------------------------------------------------------------------
@pytest.mark.parametrize("colour_matching", [False, True])
@pytest.mark.parametrize("size, boxes, dilate, feather", [
    ((300, 200), [Box(20, 30, 90, 120)], 0, 0),     # landscape, region left of centre
    ((200, 300), [Box(150, 250, 200, 300)], 4, 6),   # portrait, region in a corner
    ((320, 100), [Box(0, 10, 300, 60)], 2, 3),      # region wider than the short side: window leaves the image
    ((64, 64), [Box(8, 8, 40, 40)], 0, 5),          # square, smaller than the model
    ((600, 300), [Box(10, 10, 50, 60), Box(500, 200, 590, 290), Box(60, 20, 80, 40)], 3, 4),  # two groups
])
def test_composite_keeps_every_pixel_outside_every_region_bit_for_bit(size, boxes, dilate, feather, colour_matching):
    original = random_rgb(*size, seed=1)
    regenerate = np.any([regions.box_mask(box, size) for box in boxes], axis=0)
    plan = plan_edit(original, regenerate, RESOLUTION, dilate_pixels=dilate, feather_pixels=feather, colour_matching=colour_matching)
    assert plan.model_images.shape == (len(plan.views), RESOLUTION, RESOLUTION, 3)
    assert plan.model_keeps.shape == (len(plan.views), RESOLUTION, RESOLUTION)
    for view in plan.views:
        assert 0 < (~view.keep).sum() < RESOLUTION * RESOLUTION

    generated = [np.full((RESOLUTION, RESOLUTION, 3), 7 + 20 * g, dtype=np.uint8) for g in range(len(plan.views))]
    result = np.asarray(plan.composite(generated))
    before = np.asarray(original)
    assert result.shape == before.shape
    untouched = plan.alpha == 0
    assert np.array_equal(result[untouched], before[untouched])
    assert (plan.alpha[regenerate] > 0).all() and (plan.alpha == 1).any()
    if not colour_matching:  # each group's pixels come from its own view
        for g in range(len(plan.views)):
            assert (result[(plan.alpha == 1) & (plan.groups == g + 1)] == 7 + 20 * g).all()


def test_each_group_is_generated_at_its_own_scale():
    size = (1200, 800)
    regenerate = boxes_mask(size, (40, 40, 80, 80), (600, 200, 1000, 600))
    plan = plan_edit(random_rgb(*size), regenerate, RESOLUTION)
    assert [view.window.side for view in plan.views] == [RESOLUTION, 800]
    assert [view.enlargement for view in plan.views] == [1.0, 10.0]
    assert len(plan.notes) == 1 and plan.notes[0].startswith("the 400x400 region is generated at 40x40 pixels")


def test_model_keep_matches_the_region_on_the_model_grid():
    original = random_rgb(160, 160)
    region = regions.box_mask(Box(0, 0, 80, 160), (160, 160))
    plan = plan_edit(original, region, 80)
    assert [view.window for view in plan.views] == [Window(0, 0, 160)]
    keep = plan.views[0].keep
    assert (~keep[:, :40]).all() and keep[:, 40:].all()


def test_plan_edit_refuses_an_empty_mask_and_notes_a_full_one():
    original = random_rgb(32, 32)
    with pytest.raises(InputError, match="nothing to do"):
        plan_edit(original, np.zeros((32, 32), dtype=bool), 16)
    assert "same as generating" in plan_edit(original, np.ones((32, 32), dtype=bool), 16).notes[0]
    corner = np.zeros((32, 32), dtype=bool)
    corner[0, 0] = True
    assert "same as generating" in plan_edit(original, corner, 16, dilate_pixels=60).notes[0]


def test_composite_wants_one_output_per_view():
    plan = plan_edit(random_rgb(64, 64), boxes_mask((64, 64), (8, 8, 24, 24)), 32)
    with pytest.raises(ValueError, match="one per view"):
        plan.composite([])
    with pytest.raises(ValueError, match="uint8"):
        plan.composite([np.zeros((16, 16, 3), dtype=np.uint8)])
