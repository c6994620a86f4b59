"""Outputs as people expect them: the format the --out suffix names (PNG, JPEG, WebP) with the
settings as metadata in that format's own way, a missing output folder made, an existing output a
usage error, and edits that keep the input's nature (grayscale, transparency)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hmar import images, outputs, regions
from hmar.errors import InputError
from hmar_cli.app import app
from tests.test_images import random_rgb

runner = CliRunner()
BOX = "12,10,40,30"


def invoke(model, command: str, *args: str):
    return runner.invoke(app, [command, *args, "--model", str(model), "--device", "cpu"])


def succeeded(result) -> None:
    assert result.exit_code == 0, result.output + result.stderr


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    random_rgb(64, 48, seed=7).save(path)
    return path


# ---- the library ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, kind", [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP")])
def test_each_format_keeps_the_metadata_its_own_way(tmp_path, suffix, kind):
    path = tmp_path / f"x{suffix}"
    metadata = {"Software": "hmar 0.1.0", "hmar:seed": "3", "hmar:class_name": "tabby, tabby cat"}
    outputs.save_image(random_rgb(32, 24, seed=1), path, metadata)
    with Image.open(path) as written:
        assert written.format == kind and written.size == (32, 24)
        if kind == "PNG":
            assert written.text == metadata
        else:
            assert written.getexif()[0x0131] == "hmar 0.1.0"  # EXIF's own Software tag too
    assert outputs.read_metadata(path) == metadata
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_quality_trades_size_for_fidelity(tmp_path):
    picture = random_rgb(64, 64, seed=2)
    for quality in (30, 95):
        outputs.save_image(picture, tmp_path / f"q{quality}.jpg", {}, quality=quality)
    assert (tmp_path / "q30.jpg").stat().st_size < (tmp_path / "q95.jpg").stat().st_size
    with pytest.raises(InputError, match="^quality must be a whole number from 1 to 100, got 0$"):
        outputs.save_image(picture, tmp_path / "bad.jpg", {}, quality=0)
    assert not (tmp_path / "bad.jpg").exists()


def test_jpeg_of_a_transparent_image_is_written_on_white(tmp_path):
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    outputs.save_image(clear, tmp_path / "x.jpg", {})
    with Image.open(tmp_path / "x.jpg") as written:
        assert written.mode == "RGB" and np.asarray(written).min() >= 250


def test_a_missing_folder_is_made_when_the_image_is_written(tmp_path):
    path = tmp_path / "new" / "deeper" / "x.webp"
    outputs.check_writable([path], overwrite=False)
    assert not (tmp_path / "new").exists()  # nothing is made before the work is done
    outputs.save_image(random_rgb(4, 4), path, {"hmar:seed": "1"})
    assert outputs.read_metadata(path) == {"hmar:seed": "1"}


def test_unknown_suffixes_and_existing_outputs_are_usage_errors(tmp_path):
    for name in ("x.gif", "x.tiff", "x", "x.png.bak"):
        with pytest.raises(InputError, match=r"output must be a \.png, \.jpg, \.jpeg or \.webp file"):
            outputs.output_paths(str(tmp_path / name), 1)
    (tmp_path / "taken.jpg").write_bytes(b"mine")
    with pytest.raises(outputs.OutputError, match="exists; pass overwrite=True to replace it$") as caught:
        outputs.check_writable([tmp_path / "taken.jpg"], overwrite=False)
    assert caught.value.exit_code == 2 and (tmp_path / "taken.jpg").read_bytes() == b"mine"


# ---- the commands --------------------------------------------------------------------------------
def test_generate_writes_jpeg_and_webp_with_their_settings(tmp_path, conformance_models, conformance_config):
    label = str(conformance_config["labels"][0])
    for suffix in ("png", "jpg", "webp"):
        succeeded(runner.invoke(app, ["generate", "--model", str(conformance_models["hmar"]), "--device", "cpu", "--class", label,
                                      "--seed", "4", "--quality", "90", "--grid", "--out", str(tmp_path / "made" / f"x.{suffix}")]))
    for suffix in ("png", "jpg", "webp"):
        stored = outputs.read_metadata(tmp_path / "made" / f"x.{suffix}")
        assert stored["hmar:seed"] == "4" and stored["hmar:class"] == label and stored["Software"].startswith("hmar ")
        assert (tmp_path / "made" / f"x-grid.{suffix}").is_file()
    with Image.open(tmp_path / "made" / "x.png") as png, Image.open(tmp_path / "made" / "x.jpg") as jpeg:
        assert jpeg.format == "JPEG" and np.abs(np.asarray(png, dtype=float) - np.asarray(jpeg, dtype=float)).mean() < 20


def test_an_unknown_suffix_fails_before_the_model_loads(tmp_path, photo):
    for args in (["generate", "--class", "1"], ["inpaint", str(photo), "--box", BOX]):
        result = invoke(tmp_path / "no-such-model", *args, "--out", str(tmp_path / "x.gif"))
        assert result.exit_code == 2
        assert result.stderr.strip() == f"error: output must be a .png, .jpg, .jpeg or .webp file, got '{tmp_path / 'x.gif'}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_an_edit_into_a_new_folder_as_jpeg(tmp_path, conformance_models, photo):
    out = tmp_path / "edits" / "{name}.jpg"
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", BOX, "--seed", "1", "--out", str(out)))
    stored = outputs.read_metadata(tmp_path / "edits" / "photo.jpg")
    assert stored["hmar:command"] == "inpaint" and stored["hmar:box"] == BOX and stored["hmar:seed"] == "1"
    again = invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", BOX, "--out", str(out))
    assert again.exit_code == 2 and again.stderr.strip().endswith("exists; pass --overwrite to replace it")


# ---- the input's nature --------------------------------------------------------------------------
def _box(size):
    return regions.box_mask(regions.Box(*map(int, BOX.split(","))), size)


def test_a_grayscale_input_gives_a_grayscale_output(tmp_path, conformance_models):
    source = tmp_path / "gray.png"
    random_rgb(64, 48, seed=4).convert("L").save(source)
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(source), "--box", BOX, "--seed", "0", "--out", str(tmp_path / "x.png")))
    with Image.open(source) as before, Image.open(tmp_path / "x.png") as after:
        assert after.mode == "L"
        kept, got = np.asarray(before), np.asarray(after)
    region = _box((64, 48))
    assert np.array_equal(got[~region], kept[~region]) and (got[region] != kept[region]).any()
    succeeded(invoke(conformance_models["hmar"], "outpaint", str(source), "--right", "16", "--seed", "0", "--out", str(tmp_path / "o.png")))
    with Image.open(tmp_path / "o.png") as grown:
        assert grown.mode == "L" and grown.size == (80, 48) and np.array_equal(np.asarray(grown)[:, :64], kept)


def test_an_rgba_input_keeps_its_alpha_outside_the_region(tmp_path, conformance_models):
    rgba = np.asarray(random_rgb(64, 48, seed=1).convert("RGBA")).copy()
    rgba[:, :30, 3] = 90  # partly transparent, over part of the box too
    rgba[40:, :, 3] = 0
    source = tmp_path / "cutout.png"
    Image.fromarray(rgba, mode="RGBA").save(source)
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(source), "--box", BOX, "--seed", "0", "--out", str(tmp_path / "x.png")))
    with Image.open(tmp_path / "x.png") as after:
        assert after.mode == "RGBA"
        got = np.asarray(after)
    region = _box((64, 48))
    assert np.array_equal(got[~region], rgba[~region])  # colour under the alpha too, bit for bit
    assert (got[region][:, 3] == 255).all()  # what was generated is opaque
    result = invoke(conformance_models["hmar"], "outpaint", str(source), "--left", "8", "--seed", "0", "--out", str(tmp_path / "o.jpg"))
    succeeded(result)
    assert "JPEG has no transparency: o.jpg shows the image on white" in result.stderr
    with Image.open(tmp_path / "o.jpg") as flat:
        assert flat.mode == "RGB" and flat.size == (72, 48)


def test_restore_nature_in_the_library():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L")
    source = gray.convert("RGB")
    changed = np.zeros((3, 4), dtype=bool)
    changed[1, 1] = True
    edited = np.asarray(source).copy()
    edited[1, 1] = (255, 0, 0)
    out = images.restore_nature(Image.fromarray(edited), images.Nature(gray=True), changed)
    assert out.mode == "L" and np.array_equal(np.asarray(out)[~changed], np.asarray(gray)[~changed])
    rgb = images.restore_nature(Image.fromarray(edited), images.Nature(gray=False), changed)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), edited)


def test_an_unknown_class_on_a_model_of_few_classes_lists_them_all():
    from hmar.classes import resolve_class
    names = ["checkerboard", "circle", "crescent", "cross", "polka_dots", "ring", "square", "star", "stripes", "triangle"]
    with pytest.raises(InputError) as caught:
        resolve_class("tabby cat", 10, names)
    assert str(caught.value) == ("unknown class name 'tabby cat'; this model has 10 classes: 0 checkerboard, 1 circle, 2 crescent, "
                                 "3 cross, 4 polka_dots, 5 ring, 6 square, 7 star, 8 stripes, 9 triangle")
    with pytest.raises(InputError, match=r"did you mean 'circle', 'crescent'\? \(this model has 10 classes: 0 checkerboard, .*, 9 triangle\)$"):
        resolve_class("circel", 10, names)
    with pytest.raises(InputError) as imagenet:
        resolve_class("not a class at all", 1000)
    assert "classes:" not in str(imagenet.value)


# ---- soft edges by default -----------------------------------------------------------------------
def test_default_feather_is_a_share_of_the_narrowest_region():
    size = (64, 48)
    assert regions.default_feather(_box(size)) == 5  # 28x20: a quarter of 20
    assert regions.default_feather(_box(size), dilate_pixels=3) == 6  # 34x26 once grown
    big = regions.box_mask(regions.Box(100, 100, 1100, 900), (1600, 1200))
    assert regions.default_feather(big) == regions.FEATHER_LIMIT
    two = np.zeros((200, 200), dtype=bool)
    two[10:150, 10:150] = True
    two[180:188, 10:190] = True  # a stroke 8 px wide: its middle must still be wholly generated
    assert regions.default_feather(two) == 2
    assert regions.default_feather(np.ones((1, 1), dtype=bool)) == 1


def test_edits_have_soft_edges_unless_asked(tmp_path, conformance_models, photo):
    model = conformance_models["hmar"]
    succeeded(invoke(model, "inpaint", str(photo), "--box", BOX, "--seed", "0", "--out", str(tmp_path / "soft.png")))
    succeeded(invoke(model, "inpaint", str(photo), "--box", BOX, "--seed", "0", "--feather", "0", "--out", str(tmp_path / "hard.png")))
    assert outputs.read_metadata(tmp_path / "soft.png")["hmar:feather"] == "5"
    assert outputs.read_metadata(tmp_path / "hard.png")["hmar:feather"] == "0"
    region = _box((64, 48))
    soft, hard, before = (np.asarray(images.load_image(p)).astype(int) for p in (tmp_path / "soft.png", tmp_path / "hard.png", photo))
    assert np.array_equal(soft[~region], before[~region]) and np.array_equal(hard[~region], before[~region])
    ring = region & ~regions.dilate(~region, 1)  # the region's outermost pixels: blended, so nearer the input
    assert np.abs(soft[ring] - before[ring]).mean() < np.abs(hard[ring] - before[ring]).mean()
    shown = runner.invoke(app, ["inpaint", "--help"]).output.replace("│", " ")  # the help's words, out of rich's table
    assert regions.FEATHER_RULE in " ".join(shown.split())


# ---- hmar-tiny and photos ------------------------------------------------------------------------
def test_hmar_tiny_says_once_that_it_knows_shapes_not_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.jpg", "b.jpg"):
        random_rgb(40, 30, seed=3).save(name)
    args = ["--model", "hmar-tiny", "--device", "cpu", "--box", "4,4,20,20", "--steps", "10", "--seed", "0"]
    photos = runner.invoke(app, ["inpaint", "a.jpg", "b.jpg", *args, "--out", "{name}-new.png"])
    succeeded(photos)
    told = [line for line in photos.stderr.splitlines() if "demonstration model" in line]
    assert len(told) == 1 and "10 procedural shape classes" in told[0] and "hmar models download hmar-d16" in told[0]
    own = runner.invoke(app, ["inpaint", "a-new.png", *args, "--out", "again.png"])  # an image it made itself
    succeeded(own)
    assert "demonstration model" not in own.stderr


def test_a_sixteen_bit_input_is_said_to_become_eight_bit(tmp_path, conformance_models):
    source = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 65536, (48, 64), dtype=np.uint16)).save(source)
    result = invoke(conformance_models["hmar"], "inpaint", str(source), "--box", BOX, "--seed", "0", "--out", str(tmp_path / "x.png"))
    succeeded(result)
    assert "more than 8 bits a channel: the output has 8" in result.stderr
    with Image.open(tmp_path / "x.png") as written:
        assert written.mode == "L"
        got = np.asarray(written)
    region = _box((64, 48))
    assert np.array_equal(got[~region], np.asarray(images.load_image(source).convert("L"))[~region])
