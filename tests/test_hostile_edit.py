"""Hostile input to `hmar inpaint`, `hmar outpaint` and `hmar edit`: bad and strange images, masks,
boxes, region options and outpaint sizes. Every refusal is one line naming the problem with its exit
code, leaves no output or temporary file and changes no file (an existing output passed with
--overwrite included); sizes that would scale memory are refused before anything of that size is
allocated. Inputs that are odd but usable are edited, with a note that says what the tool saw."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hmar_cli.app import app
from tests.test_images import _bad_files, _png_header_only, random_rgb

runner = CliRunner()
TAKEN = b"an earlier result the user keeps"
MIB = 1 << 20


def _rgba(height: int, width: int, rgb: int, alpha: int) -> np.ndarray:
    pixels = np.full((height, width, 4), rgb, dtype=np.uint8)
    pixels[..., 3] = alpha
    return pixels


def _make_inputs(folder: Path) -> None:
    """The image `photo.png` (64x48) and every hostile file the cases below name."""
    _bad_files(folder)  # notes.txt, empty.png, truncated.png, corrupt.png, folder.png
    random_rgb(64, 48).save(folder / "photo.png")
    (folder / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (folder / "big.png").write_bytes(_png_header_only(12_000, 11_000))  # 132 MP: just over the limit
    jpeg = folder / "whole.jpg"
    random_rgb(64, 48).save(jpeg, quality=90)
    (folder / "cut.jpg").write_bytes(jpeg.read_bytes()[:400])
    jpeg.unlink()
    frames = [random_rgb(16, 12, seed=i) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    random_rgb(20_000, 1).save(folder / "long.png")  # a thin image whose full-width region needs a 20000 px window
    random_rgb(1, 1).save(folder / "dot.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 65536, (48, 64), dtype=np.uint16)).save(folder / "deep.png")
    random_rgb(64, 48).convert("CMYK").save(folder / "cmyk.jpg")
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.png")  # reading it would block forever

    Image.new("L", (64, 48), 0).save(folder / "black.png")
    Image.new("L", (64, 48), 127).save(folder / "grey127.png")
    Image.fromarray(_rgba(48, 64, 255, 0), mode="RGBA").save(folder / "clear.png")  # white, fully transparent
    Image.fromarray(_rgba(48, 64, 255, 100), mode="RGBA").save(folder / "faint.png")  # white, 39 % opaque
    thin = np.zeros((480, 640), dtype=np.uint8)
    thin[200, :] = 255  # one line: gone when shrunk to 64x48
    Image.fromarray(thin).save(folder / "thin.png")
    alpha_only = _rgba(48, 64, 0, 0)
    alpha_only[10:30, 20:40, 3] = 255  # black paint on an empty layer: the colour carries nothing
    Image.fromarray(alpha_only, mode="RGBA").save(folder / "painted.png")
    hole = _rgba(48, 64, 255, 255)
    hole[10:30, 20:40, 3] = 0  # a white layer with a hole erased in it
    Image.fromarray(hole, mode="RGBA").save(folder / "hole.png")
    tall = np.zeros((48, 32), dtype=np.uint8)
    tall[10:30, 10:20] = 255
    Image.fromarray(tall).save(folder / "tall.png")
    (folder / "taken.png").write_bytes(TAKEN)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden temporary files included) with a hash of its content."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            seen[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[str(path.relative_to(folder))] = "folder" if path.is_dir() else "other"
    return seen


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    _make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(model: Path, command: str, *args: str):
    return runner.invoke(app, [command, *args, "--model", str(model), "--device", "cpu"])


@contextlib.contextmanager
def bounded_memory(extra: int = 1024 * MIB):
    """Fails a test that allocates much: Python and numpy allocations are traced (the peak is
    asserted by the caller), and on Linux the address space may grow by at most `extra`, so that an
    unchecked size ends in a MemoryError instead of exhausting the machine."""
    guard = None
    if sys.platform.startswith("linux"):
        import resource

        status = Path("/proc/self/status").read_text()
        used = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
        guard = resource.getrlimit(resource.RLIMIT_AS)
        soft = used + extra if guard[1] == resource.RLIM_INFINITY else min(used + extra, guard[1])
        resource.setrlimit(resource.RLIMIT_AS, (soft, guard[1]))
    tracemalloc.start()
    peak = {}
    try:
        yield peak
    finally:
        peak["bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if guard is not None:
            resource.setrlimit(resource.RLIMIT_AS, guard)


BOX = ["--box", "8,8,24,24"]
TOO_WIDE = "square window over it would be"

# (command, arguments, exit code, text the one line must contain, refused on a size that scales memory)
REFUSED = [
    # images
    ("inpaint", ["missing.png", *BOX], 2, "image not found: missing.png", False),
    ("inpaint", ["folder.png", *BOX], 2, "folder.png is a folder, not an image file", False),
    ("inpaint", ["notes.txt", *BOX], 2, "image notes.txt is not an image", False),
    ("inpaint", ["empty.png", *BOX], 2, "image empty.png is not an image", False),
    ("edit", ["truncated.png", "--class", "1", *BOX], 2, "image truncated.png is corrupt or truncated", False),
    ("outpaint", ["corrupt.png", "--left", "8"], 2, "image corrupt.png is corrupt or truncated", False),
    ("inpaint", ["cut.jpg", *BOX], 2, "image cut.jpg is corrupt or truncated", False),
    ("inpaint", ["anim.gif", *BOX], 2, "image anim.gif has 3 frames (an animation or a multi-page file)", False),
    ("inpaint", ["pipe.png", *BOX], 2, "image pipe.png is not a regular file", False),
    ("edit", ["bomb.png", "--class", "1", *BOX], 2, "image bomb.png has 10,000,000,000 pixels, more than Pillow's safety limit allows (a decompression bomb?)", True),
    ("outpaint", ["big.png", "--left", "8"], 2, "big.png is 12000x11000 = 132,000,000 pixels, more than the limit", True),
    # masks
    ("inpaint", ["photo.png", "--mask", "black.png"], 2, "mask black.png selects nothing to regenerate: no pixel is brighter than 50 % (it is all black", False),
    ("inpaint", ["photo.png", "--mask", "grey127.png"], 2, "no pixel is brighter than 50 % (the brightest is 127/255", False),
    ("edit", ["photo.png", "--class", "2", "--mask", "clear.png"], 2, "mask clear.png selects nothing to regenerate: no pixel is more than 50 % opaque (it is fully transparent", False),
    ("inpaint", ["photo.png", "--mask", "faint.png"], 2, "no pixel is more than 50 % opaque (the most opaque is 100/255", False),
    ("inpaint", ["photo.png", "--mask", "thin.png"], 2, "mask thin.png selects nothing to regenerate once resized from 640x480 to the image's 64x48", False),
    ("inpaint", ["photo.png", "--mask", "notes.txt"], 2, "mask notes.txt is not an image", False),
    ("inpaint", ["photo.png", "--mask", "nowhere.png"], 2, "mask not found: nowhere.png", False),
    ("inpaint", ["photo.png", "--mask", "anim.gif"], 2, "mask anim.gif has 3 frames", False),
    ("inpaint", ["photo.png", "--mask", "bomb.png"], 2, "mask bomb.png has 10,000,000,000 pixels, more than", True),
    ("inpaint", ["photo.png", "--mask", "black.png", *BOX], 2, "either a mask (--mask) or a box (--box), one of them", False),
    ("edit", ["photo.png", "--class", "1"], 2, "either a mask (--mask) or a box (--box), one of them", False),
    # boxes
    ("inpaint", ["photo.png", "--box", "1,2,3"], 2, "box must be four integers x0,y0,x1,y1, got 3 values: '1,2,3'", False),
    ("inpaint", ["photo.png", "--box", "1,2,3,4,5"], 2, "got 5 values: '1,2,3,4,5'", False),
    ("inpaint", ["photo.png", "--box", ""], 2, "got 1 value: ''", False),
    ("inpaint", ["photo.png", "--box", "a,b,c,d"], 2, "'a' is not a whole number of pixels", False),
    ("inpaint", ["photo.png", "--box", "nan,0,8,8"], 2, "'nan' is not a whole number of pixels", False),
    ("inpaint", ["photo.png", "--box", "0,0,inf,8"], 2, "'inf' is not a whole number of pixels", False),
    ("inpaint", ["photo.png", "--box", "1.5,2,30,40"], 2, "'1.5' is not a whole number of pixels", False),
    ("inpaint", ["photo.png", "--box", f"0,0,{'9' * 31},8"], 2, "is not a whole number of pixels", False),
    ("inpaint", ["photo.png", "--box", "10,10,5,20"], 2, "box 10,10,5,20 is empty: x1 5 is not past x0 10", False),
    ("edit", ["photo.png", "--class", "1", "--box", "10,10,20,10"], 2, "box 10,10,20,10 is empty: y1 10 is not past y0 10", False),
    ("inpaint", ["photo.png", "--box", "100,100,200,200"], 2, "box 100,100,200,200 lies wholly outside the 64x48 image", False),
    ("inpaint", ["photo.png", "--box", "-50,-40,-10,-5"], 2, "box -50,-40,-10,-5 lies wholly outside the 64x48 image", False),
    ("inpaint", ["photo.png", "--box", f"{2**63},0,{2**63 + 1},8"], 2, f"box {2**63},0,{2**63 + 1},8 lies wholly outside", False),
    ("inpaint", ["long.png", "--box", "0,0,20000,1"], 2, f"spans 20000x1 pixels: the model's {TOO_WIDE} 20000x20000", True),
    ("inpaint", ["long.png", "--box", "5000,0,5010,1", "--dilate", "6000"], 2, f"spans 11010x1 pixels: the model's {TOO_WIDE}", True),
    # region options
    ("inpaint", ["photo.png", *BOX, "--dilate", "-1"], 2, "Invalid value for '--dilate'", False),
    ("inpaint", ["photo.png", *BOX, "--dilate", "wide"], 2, "Invalid value for '--dilate'", False),
    ("inpaint", ["photo.png", *BOX, "--dilate", str(2**63)], 2, f"--dilate {2**63} is more than 120,000,000 pixels", True),
    ("inpaint", ["photo.png", *BOX, "--feather", "-3"], 2, "Invalid value for '--feather'", False),
    ("edit", ["photo.png", "--class", "1", *BOX, "--feather", "100000"], 2, "--feather 100000 is wider than the region to regenerate (16x16 pixels)", False),
    # outpaint sizes
    ("outpaint", ["photo.png"], 2, "give exactly one of --left/--right/--top/--bottom, --expand or --to", False),
    ("outpaint", ["photo.png", "--left", "8", "--expand", "2"], 2, "give exactly one of", False),
    ("outpaint", ["photo.png", "--left", "-5"], 2, "margins must be >= 0 pixels, got --left -5, --top 0, --right 0, --bottom 0", False),
    ("outpaint", ["photo.png", "--right", "100000"], 2, "--right 100000 is more than 10,954 pixels: the model's square window", True),
    ("outpaint", ["photo.png", "--bottom", str(2**70)], 2, f"--bottom {2**70} is more than 10,954 pixels", True),
    ("outpaint", ["photo.png", "--top", "10000", "--bottom", "1000"], 2, f"spans 64x11048 pixels: the model's {TOO_WIDE} 11048x11048", True),
    ("outpaint", ["photo.png", "--expand", "inf"], 2, "'--expand': inf is not a finite number", False),
    ("outpaint", ["photo.png", "--expand", "nan"], 2, "'--expand': nan is not a finite number", False),
    ("outpaint", ["photo.png", "--expand", "0"], 2, "--expand must be more than 1", False),
    ("outpaint", ["photo.png", "--expand", "-2"], 2, "--expand must be more than 1", False),
    ("outpaint", ["photo.png", "--expand", "1"], 2, "--expand must be more than 1", False),
    ("outpaint", ["photo.png", "--expand", "1.001"], 2, "--expand 1.001 (64x48, rounded) does not enlarge the 64x48 image", False),
    ("outpaint", ["photo.png", "--expand", "1e9"], 2, "--expand 1e+09 makes any image more than 10,954 pixels wide", True),
    ("outpaint", ["photo.png", "--expand", "200"], 2, "the extended canvas 12800x9600 has 122,880,000 pixels, more than the limit", True),
    ("outpaint", ["photo.png", "--to", "0x0"], 2, "size 0x0 has a side of 0 pixels", False),
    ("outpaint", ["photo.png", "--to", "1e6x1e6"], 2, "size must look like WIDTHxHEIGHT in whole pixels, e.g. 512x384, got '1e6x1e6'", False),
    ("outpaint", ["photo.png", "--to", "garbage"], 2, "got 'garbage'", False),
    ("outpaint", ["photo.png", "--to", "60x60"], 2, "--to 60x60 does not enlarge the 64x48 image", False),
    ("outpaint", ["photo.png", "--to", "1000000x1000000"], 2, "the extended canvas 1000000x1000000 has 1,000,000,000,000 pixels", True),
    ("outpaint", ["photo.png", "--to", "12000x100"], 2, f"spans 12000x100 pixels: the model's {TOO_WIDE} 12000x12000", True),
]


@pytest.mark.parametrize("command, args, code, message, sized", REFUSED, ids=[f"{c[0]} {' '.join(c[1])[:60]}" for c in REFUSED])
def test_hostile_input_is_refused_in_one_line_and_touches_nothing(conformance_models, workspace, command, args, code, message, sized):
    if "pipe.png" in args and not (workspace / "pipe.png").exists():
        pytest.skip("no named pipes on this system")
    before = _snapshot(workspace)
    with bounded_memory() if sized else contextlib.nullcontext({}) as peak:
        result = invoke(conformance_models["hmar"], command, *args, "--out", "taken.png", "--overwrite")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "bug in hmar" not in lines[0] and result.stdout == ""
    assert _snapshot(workspace) == before  # no output, no temporary file, nothing changed
    assert (workspace / "taken.png").read_bytes() == TAKEN
    if sized:  # refused from the numbers alone: nothing near the size asked for was allocated
        assert peak["bytes"] < 64 * MIB


def test_sized_refusals_come_before_the_model_loads(tmp_path, workspace):
    """The memory-scaling refusals need no model: with one that does not exist, they are still the error."""
    for command, args, code, message, sized in REFUSED:
        if sized:
            result = invoke(tmp_path / "no-such-model", command, *args, "--out", "fresh.png")
            assert result.exit_code == code and message in result.stderr, (args, result.stderr)
    assert not (workspace / "fresh.png").exists()


# ---- odd but usable: edited, and a note says what the tool saw --------------------------------------
def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _region(x0: int, y0: int, x1: int, y1: int, size=(64, 48)) -> np.ndarray:
    region = np.zeros((size[1], size[0]), dtype=bool)
    region[y0:y1, x0:x1] = True
    return region


@pytest.mark.parametrize("args, notes, changed", [
    # black paint on an empty layer: the painted square is regenerated, the rest kept
    (["--mask", "painted.png"], ["note: mask painted.png has transparency, so its alpha decides: its opaque pixels (13 % of the image) "
                                 "are regenerated, its transparent ones kept"], _region(20, 10, 40, 30)),
    # a white layer with a hole: the opaque white is regenerated (the note says so), the hole kept
    (["--mask", "hole.png"], ["note: mask hole.png has transparency, so its alpha decides: its opaque pixels (87 % of the image) "
                              "are regenerated, its transparent ones kept"], ~_region(20, 10, 40, 30)),
    (["--mask", "tall.png"], ["note: mask tall.png is 32x48 but the image is 64x48: another aspect ratio (0.67 against 1.33), so the "
                              "mask was stretched 2x wide and 1x tall to fit, which moves what it marks"], _region(20, 10, 40, 30)),
    (["--box", "-5,-5,10,10"], ["note: box -5,-5,10,10 reaches past the edge of the 64x48 image: clipped to 0,0,10,10"], _region(0, 0, 10, 10)),
    (["--box", f"40,30,{2**63},{2**63}"], [f"note: box 40,30,{2**63},{2**63} reaches past the edge of the 64x48 image: clipped to 40,30,64,48"],
     _region(40, 30, 64, 48)),
])
def test_odd_masks_and_boxes_are_used_as_the_note_says(conformance_models, workspace, args, notes, changed):
    before = _snapshot(workspace)
    result = invoke(conformance_models["hmar"], "inpaint", "photo.png", *args, "--seed", "0", "--no-match-colours", "--out", "new.png")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().splitlines()[:-1] == notes
    original, edited = pixels(workspace / "photo.png"), pixels(workspace / "new.png")
    assert np.array_equal(edited[~changed], original[~changed]) and (edited[changed] != original[changed]).any()
    after = _snapshot(workspace)
    assert set(after) - set(before) == {"new.png"} and all(after[name] == digest for name, digest in before.items())
    if args[0] == "--box":  # the metadata records the box that was used
        with Image.open(workspace / "new.png") as written:
            assert written.text["hmar:box"] == notes[0].rsplit("clipped to ", 1)[1]


@pytest.mark.parametrize("command, image, args, size", [
    ("inpaint", "dot.png", ["--box", "0,0,1,1"], (1, 1)),
    ("outpaint", "dot.png", ["--right", "3"], (4, 1)),
    ("inpaint", "deep.png", BOX, (64, 48)),
    ("edit", "cmyk.jpg", ["--class", "1", *BOX], (64, 48)),
])
def test_tiny_deep_and_cmyk_images_are_edited(conformance_models, workspace, command, image, args, size):
    result = invoke(conformance_models["hmar"], command, image, *args, "--seed", "0", "--out", "new.png")
    assert result.exit_code == 0, result.stderr
    with Image.open(workspace / "new.png") as written:
        assert written.size == size and written.mode == ("L" if image == "deep.png" else "RGB")  # grayscale stays grayscale


def test_a_mask_selecting_nothing_says_so_in_the_library_too(workspace):
    """`load_mask` itself reports what it saw; the error is the CLI's line without its prefix."""
    from hmar.errors import InputError
    from hmar.images import load_mask

    with pytest.raises(InputError, match=r"the brightest is 127/255; white = regenerate, black = keep\)$"):
        load_mask(workspace / "grey127.png", (64, 48))
    assert load_mask(workspace / "painted.png", (64, 48)).regenerate.sum() == 20 * 20


# ---- the same rules in the library ----------------------------------------------------------------
def test_boxes_are_clipped_or_refused():
    from hmar.errors import InputError
    from hmar.regions import Box, clip_box

    assert clip_box(Box(2, 3, 10, 12), (64, 48)) == (Box(2, 3, 10, 12), ())
    clipped, notes = clip_box(Box(-5, 40, 70, 2**63), (64, 48))
    assert clipped == Box(0, 40, 64, 48) and notes == (f"box -5,40,70,{2**63} reaches past the edge of the 64x48 image: clipped to 0,40,64,48",)
    for box in (Box(64, 0, 70, 8), Box(0, -8, 8, 0), Box(-(2**63), 0, -1, 8)):
        with pytest.raises(InputError, match="lies wholly outside the 64x48 image"):
            clip_box(box, (64, 48))


@pytest.mark.parametrize("margins, extent", [
    ({"right": 100}, (100, 48)),                  # one strip: as wide as itself, as tall as the image
    ({"left": 10, "right": 20}, (94, 48)),        # both sides: the canvas' width
    ({"top": 5}, (64, 5)),
    ({"top": 5, "bottom": 7}, (64, 60)),
    ({"left": 3, "bottom": 4}, (67, 52)),         # an L: the whole canvas
])
def test_the_window_over_new_strips_is_checked_at_their_extent(margins, extent):
    from hmar.errors import InputError
    from hmar.regions import outpaint_margins

    side = max(extent)
    outpaint_margins((64, 48), **margins, max_pixels=side * side)  # exactly fits
    # a single strip is refused from its margin alone (`check_outpaint_options`), before the image is read
    single = f"{next(iter(margins))}={side} is more than {side - 1} pixels: the model's square window over the new strip"
    whole = f"spans {extent[0]}x{extent[1]} pixels: the model's square window over it would be {side}x{side}"
    with pytest.raises(InputError, match=single if len(margins) == 1 and side in margins.values() else whole):
        outpaint_margins((64, 48), **margins, max_pixels=side * side - 1)


def test_dilation_is_a_round_brush_of_any_radius_at_fixed_cost():
    from hmar.regions import dilate

    region = np.zeros((41, 61), dtype=bool)
    region[20, 30] = True
    ys, xs = np.mgrid[:41, :61]
    for radius in (1, 3, 10):
        assert np.array_equal(dilate(region, radius), (ys - 20) ** 2 + (xs - 30) ** 2 <= radius ** 2)
    assert dilate(region, 10**8).all()  # reaches everything; no brush of that size is made
