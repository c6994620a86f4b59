"""hmar.images, hmar.regions, hmar.colour_match and hmar.outputs: reading any image (and every way it
can be bad), masks and boxes, colour matching, outpaint canvases, atomic PNG writing (the model's view
of an edit: tests/test_edit_window.py)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hmar import colour_match, edit_window, images, outputs, regions
from hmar.errors import HmarError, InputError
from hmar.outputs import OutputError
from hmar.regions import Box, Margins


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- reading: modes ---------------------------------------------------------------------------
def test_rgba_is_composited_on_white_or_its_alpha_dropped(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    white = np.asarray(images.load_image(tmp_path / "a.png"))
    assert white.shape == (4, 4, 3) and white.dtype == np.uint8
    assert (white[:2] == (200, 0, 0)).all() and (white[2:] == 255).all()
    dropped = np.asarray(images.load_image(tmp_path / "a.png", alpha="drop"))
    assert (dropped == (200, 0, 0)).all()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "CMYK", "I;16"])
def test_every_mode_becomes_8bit_rgb(tmp_path, mode):
    source = random_rgb(16, 12)
    converted = source.convert("L").convert(mode) if mode == "I;16" else source.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257)
    converted.save(path)
    loaded = images.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (16, 12)


def test_sixteen_bit_grayscale_scales_to_eight_bits(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = np.asarray(images.load_image(tmp_path / "deep.png"))
    assert loaded[0, :, 0].tolist() == [0, 100, 255, 7]


def test_palette_transparency_is_composited(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png", transparency=1)
    loaded = np.asarray(images.load_image(tmp_path / "p.png"))
    assert loaded[0, 0].tolist() == [10, 20, 30] and loaded[0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    source = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    source.save(tmp_path / "phone.jpg", exif=exif)
    assert images.load_image(tmp_path / "phone.jpg").size == (20, 40)


# ---- reading: bad files -----------------------------------------------------------------------
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = png_bytes(random_rgb(64, 64))
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    start = good.index(b"IDAT") + 8
    corrupt[start:start + 64] = bytes(64)
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    (tmp_path / "folder.png").mkdir()
    return {name: tmp_path / name for name in ("notes.txt", "empty.png", "truncated.png", "corrupt.png", "folder.png")}


@pytest.mark.parametrize("name, message", [
    ("missing.png", "image not found"),
    ("folder.png", "is a folder, not an image file"),
    ("notes.txt", "is not an image"),
    ("empty.png", "is not an image"),
    ("truncated.png", "is corrupt or truncated"),
    ("corrupt.png", "is corrupt or truncated"),
])
def test_bad_image_files_are_one_line_input_errors(tmp_path, name, message):
    _bad_files(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        images.load_image(tmp_path / name)
    assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image(tmp_path):
    path = tmp_path / "secret.png"
    random_rgb(4, 4).save(path)
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied"):
        images.load_image(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny file that claims to be a huge RGB PNG (its pixel data is missing)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(InputError, match="decompression bomb"):
        images.load_image(tmp_path / "bomb.png")
    (tmp_path / "big.png").write_bytes(_png_header_only(12_000, 11_000))
    with pytest.raises(InputError, match=r"12000x11000 = 132,000,000 pixels, more than the limit"):
        images.load_image(tmp_path / "big.png")
    random_rgb(20, 20).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="more than the limit of 100"):
        images.load_image(tmp_path / "small.png", max_pixels=100)
    with pytest.raises(InputError, match="more than the limit of 100"):
        images.load_mask(tmp_path / "small.png", (20, 20), max_pixels=100)


# ---- masks and boxes --------------------------------------------------------------------------
def test_mask_threshold_transparency_and_resizing(tmp_path):
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "m.png")
    mask = images.load_mask(tmp_path / "m.png", (4, 1))
    assert mask.regenerate.tolist() == [[False, False, True, True]] and mask.notes == ()

    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3] = 255  # opaque white: regenerate; transparent white: keep
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert images.load_mask(tmp_path / "alpha.png", (2, 1)).regenerate.tolist() == [[True, False]]

    half = np.zeros((10, 10), dtype=np.uint8)
    half[:, 5:] = 255
    Image.fromarray(half, mode="L").save(tmp_path / "small.png")
    resized = images.load_mask(tmp_path / "small.png", (40, 20))
    assert resized.regenerate.shape == (20, 40)
    assert resized.regenerate[:, :18].sum() == 0 and resized.regenerate[:, 22:].all()
    assert "is 10x10 but the image is 40x20" in resized.notes[0]


def test_unreadable_mask_is_an_input_error(tmp_path):
    (tmp_path / "m.png").write_text("nope")
    with pytest.raises(InputError, match="mask .* is not an image"):
        images.load_mask(tmp_path / "m.png", (4, 4))


def test_empty_mask_refused_full_mask_noted():
    with pytest.raises(InputError, match="nothing to do"):
        regions.mask_notes(np.zeros((4, 4), dtype=bool))
    assert "same as generating" in regions.mask_notes(np.ones((4, 4), dtype=bool))[0]
    assert regions.mask_notes(np.eye(4, dtype=bool)) == ()


@pytest.mark.parametrize("text, message", [
    ("1,2,3", "four integers"), ("a,b,c,d", "four integers"), ("1.5,2,3,4", "four integers"),
    ("10,10,5,20", "is empty"), ("10,10,20,10", "is empty"),
])
def test_bad_boxes(text, message):
    with pytest.raises(InputError, match=message):
        regions.parse_box(text)


def test_box_mask_and_boxes_outside_the_image():
    assert regions.parse_box(" 1, 2,3 ,4") == Box(1, 2, 3, 4)
    mask = regions.box_mask(Box(1, 2, 3, 4), (5, 6))
    assert mask.shape == (6, 5) and mask.sum() == 4 and mask[2:4, 1:3].all()
    assert regions.box_mask(Box(0, 0, 5, 6), (5, 6)).all()
    for box in (Box(-1, 0, 3, 3), Box(0, 0, 6, 3), Box(0, 0, 3, 7)):
        with pytest.raises(InputError, match="reaches outside the 5x6 image"):
            regions.box_mask(box, (5, 6))


def test_dilate_and_feather():
    region = np.zeros((21, 21), dtype=bool)
    region[10, 10] = True
    grown = regions.dilate(region, 3)
    assert grown.sum() > 9 and grown[10, 7] and grown[7, 10] and not grown[10, 6] and not grown[7, 7]
    assert (regions.dilate(region, 0) == region).all()

    block = np.zeros((30, 30), dtype=bool)
    block[5:25, 5:25] = True
    alpha = regions.feather(block, 4)
    assert alpha.dtype == np.float32
    assert (alpha[~block] == 0).all() and (alpha[block] > 0).all()
    assert alpha[15, 15] == 1.0 and 0 < alpha[5, 15] < 1 and alpha[5, 15] < alpha[7, 15]
    assert (regions.feather(block, 0) == block).all()
    with pytest.raises(InputError, match="^dilate must be"):
        regions.dilate(block, -1)


# ---- colour matching ----------------------------------------------------------------------------
def _gradient(height: int, width: int) -> np.ndarray:
    ramp = np.linspace(40, 200, width, dtype=np.float32)
    return np.stack([ramp[None, :].repeat(height, 0), np.full((height, width), 120, np.float32), ramp[::-1][None, :].repeat(height, 0)], -1)


def test_match_colours_removes_a_cast_and_keeps_the_generated_content():
    original = _gradient(96, 128)
    region = np.zeros((96, 128), dtype=bool)
    region[24:72, 32:96] = True
    generated = original.copy()
    generated[region] += np.array([25, -15, 10], np.float32)  # the cast
    generated[40:56, 56:72] += 60  # content drawn inside
    matched = colour_match.match_colours(generated, original, region, ~region)
    error = np.abs(matched - original)
    assert np.array_equal(matched[~region], generated[~region])
    background = region.copy()
    background[40:56, 56:72] = False
    assert error[background].max() <= 6 and error[background].mean() <= 2  # the cast was 25 levels
    assert np.abs(error[40:56, 56:72] - 60).max() <= 6  # the content stays 60 above its surroundings


def test_match_colours_at_a_larger_scale_works_on_a_smaller_copy():
    """A photo larger than the model's view: the ring is wider, and the offset is found at the scale
    where it is MATCH_RING pixels, then resized back."""
    original = _gradient(384, 512)
    region = np.zeros((384, 512), dtype=bool)
    region[96:288, 128:384] = True
    generated = original.copy()
    generated[region] += np.array([25, -15, 10], np.float32)
    matched = colour_match.match_colours(generated, original, region, ~region, ring=4 * colour_match.MATCH_RING)
    assert np.array_equal(matched[~region], generated[~region])
    assert np.abs(matched - original)[region].mean() <= 1.5


def test_match_colours_where_the_region_meets_the_image_border():
    """Outpainting: the region runs to the image edge, where nothing is known."""
    original = _gradient(64, 96)
    region = np.zeros((64, 96), dtype=bool)
    region[:, 64:] = True
    generated = original.copy()
    generated[region] += np.array([-20, 20, 20], np.float32)
    matched = colour_match.match_colours(generated, original, region, ~region)
    assert np.abs(matched - original)[region].max() <= 6


def test_match_colours_ignores_content_cut_by_the_edge():
    """A dark bar of the input runs into the region, and the generation drew it differently: the bar
    sets no offset (it is far from the ring's median), so no dark stain spreads into the region."""
    original = _gradient(96, 96)
    original[44:52, :] = 10  # the bar, crossing the region's left and right edges
    region = np.zeros((96, 96), dtype=bool)
    region[24:72, 24:72] = True
    generated = _gradient(96, 96)
    generated[region] += 20  # a cast, and no bar inside
    matched = colour_match.match_colours(generated, original, region, ~region)
    expected = _gradient(96, 96)
    assert np.abs(matched - expected)[region].mean() <= 1.5 and np.abs(matched - expected)[region].max() <= 12


def test_match_colours_leaves_an_image_alone_without_known_pixels_or_region():
    generated = _gradient(16, 16)
    everything, nothing = np.ones((16, 16), bool), np.zeros((16, 16), bool)
    assert colour_match.match_colours(generated, generated + 5, everything, nothing) is generated
    assert colour_match.match_colours(generated, generated + 5, nothing, everything) is generated


# ---- outpainting ------------------------------------------------------------------------------
def test_outpaint_margins_three_ways():
    assert regions.outpaint_margins((100, 50), left=10, bottom=5) == Margins(10, 0, 0, 5)
    assert regions.outpaint_margins((100, 50), expand=1.5) == Margins(25, 12, 25, 13)
    assert regions.outpaint_margins((100, 50), to=(101, 80)) == Margins(0, 15, 1, 15)
    assert regions.parse_size("512x384") == (512, 384) and regions.parse_size("64×64") == (64, 64)


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one of"),
    ({"left": 10, "expand": 1.5}, "exactly one of"),
    ({"left": -5, "right": 10}, ">= 0"),
    ({"expand": 1.0}, "more than 1"),
    ({"to": (90, 60)}, "does not enlarge"),
    ({"to": (100, 50)}, "does not enlarge"),
    ({"expand": 2000.0}, "more than"),
])
def test_bad_outpaint_options(options, message):
    with pytest.raises(InputError, match=message):
        regions.outpaint_margins((100, 50), **options)


@pytest.mark.parametrize("text", ["512", "512x", "ax4", "0x10", "10x0"])
def test_bad_sizes(text):
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        regions.parse_size(text)


def test_outpaint_keeps_the_original_pixels_bit_for_bit():
    original = random_rgb(120, 90, seed=3)
    margins = regions.outpaint_margins(original.size, left=30, top=10, right=5)
    canvas, regenerate = regions.extend_canvas(original, margins)
    assert canvas.size == (155, 100) and regenerate.sum() == 155 * 100 - 120 * 90
    inside = (slice(10, 100), slice(30, 150))
    assert np.array_equal(np.asarray(canvas)[inside], np.asarray(original)) and not regenerate[inside].any()
    plan = edit_window.plan_edit(canvas, regenerate, 64, feather_pixels=8)
    result = np.asarray(plan.composite([np.zeros((64, 64, 3), dtype=np.uint8)] * len(plan.views)))
    assert np.array_equal(result[inside], np.asarray(original))
    assert (result[regenerate & (plan.alpha == 1)] == 0).all()


# ---- writing ----------------------------------------------------------------------------------
def test_image_from_array_rounds_like_the_tensor_path():
    pixels = torch.rand(3, 17, 9) * 1.2 - 0.1
    expected = pixels.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(images.image_from_array(pixels.permute(1, 2, 0).numpy())), expected)


def test_output_paths():
    assert outputs.output_paths("out.png", 1) == [Path("out.png")]
    assert outputs.output_paths("dir/out.png", 2) == [Path("dir/out-0.png"), Path("dir/out-1.png")]
    assert outputs.output_paths("s{i}.png", 2) == [Path("s0.png"), Path("s1.png")]
    assert outputs.output_paths("out.jpg", 2) == [Path("out-0.jpg"), Path("out-1.jpg")]
    with pytest.raises(InputError, match="must be a .png, .jpg, .jpeg or .webp file"):
        outputs.output_paths("out.gif", 1)


def test_save_png_writes_metadata_and_never_overwrites_silently(tmp_path):
    path = tmp_path / "x.png"
    first = random_rgb(8, 8, seed=1)
    outputs.save_image(first, path, {"hmar:seed": "3", "Software": "hmar 0.1.0"})
    with Image.open(path) as written:
        assert written.text == {"hmar:seed": "3", "Software": "hmar 0.1.0"}
        assert np.array_equal(np.asarray(written), np.asarray(first))
    before = path.read_bytes()
    with pytest.raises(OutputError, match="exists; pass overwrite=True to replace it$") as caught:
        outputs.save_image(random_rgb(8, 8, seed=2), path, {})
    assert caught.value.exit_code == 2 and path.read_bytes() == before
    outputs.save_image(random_rgb(8, 8, seed=2), path, {}, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    real_save = Image.Image.save

    def save_and_race(self, stream, *args, **kwargs):
        path.write_bytes(b"someone else's")
        return real_save(self, stream, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_and_race)
    with pytest.raises(OutputError, match="exists"):
        outputs.save_image(random_rgb(4, 4), path, {})
    assert path.read_bytes() == b"someone else's" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, stream, *args, **kwargs):
        stream.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(outputs.OutputError, match="cannot write .*x.png: disk full"):
        outputs.save_image(random_rgb(4, 4), tmp_path / "x.png", {})
    assert list(tmp_path.iterdir()) == []


def test_check_writable(tmp_path):
    (tmp_path / "taken.png").write_bytes(b"x")
    outputs.check_writable([tmp_path / "free.png"], overwrite=False)
    outputs.check_writable([tmp_path / "taken.png"], overwrite=True)
    with pytest.raises(OutputError, match="exists"):
        outputs.check_writable([tmp_path / "taken.png"], overwrite=False)
    outputs.check_writable([tmp_path / "no" / "x.png"], overwrite=False)  # made when written
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="is a file"):
        outputs.check_writable([tmp_path / "file" / "x.png"], overwrite=False)
    with pytest.raises(OutputError, match="cannot write"):
        outputs.save_image(random_rgb(2, 2), tmp_path / "file" / "x.png", {})
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(OutputError, match="folder.png is a folder"):
        outputs.check_writable([tmp_path / "folder.png"], overwrite=True)


def test_grid_layout():
    tiles = [random_rgb(10, 6, seed=i) for i in range(5)]
    sheet = outputs.grid(tiles, columns=2)
    assert sheet.size == (20, 18)
    assert np.array_equal(np.asarray(sheet)[6:12, 10:20], np.asarray(tiles[3]))
    assert (np.asarray(sheet)[12:, 10:] == 255).all()
    assert issubclass(OutputError, HmarError)


def test_written_pngs_get_an_ordinary_file_mode(tmp_path):
    # the temporary file is private to its owner; the finished output must not stay that way
    old = os.umask(0o022)
    try:
        outputs.save_image(Image.new("RGB", (4, 4)), tmp_path / "out.png", {})
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644
