"""The editing commands on several images (folders, globs, mask folders, a bad file among good ones,
name collisions) and the window metadata (`hmar:window`, `hmar:enlargement`, `--json`), end to end
with Typer's CliRunner on the conformance model folder (random weights: mechanics, not pictures)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from hmar import images, regions
from hmar_cli import editing
from tests.test_cli_edit import invoke, pixels, succeeded
from tests.test_images import random_rgb

SIZE = (120, 90)
BOX = "10,10,40,40"


def region(size=SIZE, *boxes) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1 in boxes or [tuple(map(int, BOX.split(",")))]:
        mask[y0:y1, x0:x1] = True
    return mask


def save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def text_of(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


@pytest.fixture
def shots(tmp_path) -> Path:
    """A folder of three good images (one a JPEG), a corrupt PNG and a text file."""
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png"]):
        random_rgb(*SIZE, seed=i).save(folder / name)
    random_rgb(*SIZE, seed=5).save(folder / "c.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_folder_with_one_bad_image_edits_the_others_and_exits_1(tmp_path, conformance_models, shots):
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(conformance_models["hmar"], "inpaint", str(shots), "--box", BOX, "--seed", "3", "--out", str(out / "{name}.png"))
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"error: image {shots / 'broken.png'} is corrupt or truncated (Truncated File Read)"
    assert lines[-1] == "edited 3 of 4 images; 1 failed: broken.png"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]  # nothing for the bad one, no temp files
    for name in ("a.png", "b.png", "c.jpg"):
        before = np.asarray(images.load_image(shots / name))
        after = pixels(out / f"{Path(name).stem}.png")
        assert np.array_equal(after[~region()], before[~region()]) and (after[region()] != before[region()]).any()
        assert text_of(out / f"{Path(name).stem}.png")["hmar:source"] == name


def test_a_mask_folder_is_matched_by_name_and_several_regions_get_their_own_windows(tmp_path, conformance_models, shots):
    masks = tmp_path / "masks"
    masks.mkdir()
    two = region((240, 180), (10, 10, 40, 40), (190, 130, 230, 170))
    random_rgb(240, 180, seed=9).save(shots / "wide.png")
    save_mask(masks / "wide.png", two)
    save_mask(masks / "a.jpg", region())  # any image extension
    (shots / "broken.png").unlink()
    result = invoke(conformance_models["hmar"], "inpaint", str(shots / "a.png"), str(shots / "b.png"), str(shots / "wide.png"),
                    "--mask", str(masks), "--dilate", "2", "--feather", "3", "--seed", "0", "--out", str(tmp_path / "{name}-new.png"))
    assert result.exit_code == 1
    assert f"error: {shots / 'b.png'}: no mask for b.png in {masks} (looked for b.png, .jpg …)" in result.stderr.splitlines()
    assert not (tmp_path / "b-new.png").exists()
    text = text_of(tmp_path / "wide-new.png")
    assert text["hmar:mask"] == "wide.png" and text["hmar:context"] == "0.5"
    windows = [tuple(map(int, w.split(","))) for w in text["hmar:window"].split(";")]
    assert len(windows) == 2 and len(text["hmar:enlargement"].split(";")) == 2
    assert windows[0][0] <= 10 and windows[1][2] >= 230 and windows[0][2] <= windows[1][0]  # apart, each around its region
    grown = regions.dilate(two, 2)
    before, after = np.asarray(images.load_image(shots / "wide.png")), pixels(tmp_path / "wide-new.png")
    assert np.array_equal(after[~grown], before[~grown])
    assert (after[10:40, 10:40] != before[10:40, 10:40]).any() and (after[130:170, 190:230] != before[130:170, 190:230]).any()
    assert text_of(tmp_path / "a-new.png")["hmar:mask"] == "a.jpg"


def test_globs_and_repeated_paths_edit_each_image_once(tmp_path, conformance_models, shots, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(conformance_models["hmar"], "edit", "shots/*.png", str(shots / "a.png"), "--class", "1", "--box", BOX,
                    "--num", "2", "--seed", "1", "--json")
    assert result.exit_code == 1  # broken.png matches the glob
    summary = json.loads(result.stdout)
    assert [r["path"] for r in summary["images"]] == ["a-edited-0.png", "a-edited-1.png", "b-edited-0.png", "b-edited-1.png"]
    assert [r["source"] for r in summary["images"]] == ["shots/a.png", "shots/a.png", "shots/b.png", "shots/b.png"]
    assert summary["failed"] == [{"source": "shots/broken.png",
                                  "error": "image shots/broken.png is corrupt or truncated (Truncated File Read)"}]
    assert summary["command"] == "edit" and summary["classes"] == [1, 1] and summary["context"] == "0.5"
    record = summary["images"][0]
    assert record["size"] == list(SIZE) and len(record["window"]) == 1 and len(record["window"][0]) == 4
    assert isinstance(record["enlargement"][0], float)
    assert text_of(tmp_path / "b-edited-1.png")["hmar:index"] == "1"


def test_the_same_seed_repeats_a_batch(tmp_path, conformance_models, shots):
    (shots / "broken.png").unlink()
    (shots / "c.jpg").unlink()
    for run in ("one", "two"):  # four views in batches of three: the first batch holds both images
        (tmp_path / run).mkdir()
        succeeded(invoke(conformance_models["hmar"], "inpaint", str(shots), "--box", BOX, "--num", "2", "--seed", "8", "--batch-size", "3",
                         "--out", str(tmp_path / run / "{name}.png")))
    for name in ("a-0.png", "a-1.png", "b-0.png", "b-1.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--out", "{name}.png"], "would both be written to x.png"),
    ([], "would both be written to x-inpainted.png"),
    (["--out", "fixed.png"], "several images need {name} in --out"),
])
def test_clashing_output_names_are_refused_before_any_work(tmp_path, conformance_models, monkeypatch, args, message):
    for folder in ("day", "night"):
        (tmp_path / folder).mkdir()
        random_rgb(*SIZE).save(tmp_path / folder / "x.png")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(conformance_models["hmar"], "inpaint", "day/x.png", "night/x.png", "--box", BOX, *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_an_existing_output_stops_a_batch_before_the_model_loads(tmp_path, shots, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("b-inpainted.png").write_bytes(b"mine")
    result = invoke(tmp_path / "no-such-model", "inpaint", str(shots), "--box", BOX)
    assert result.exit_code == 2 and result.stderr.strip() == "error: b-inpainted.png exists; pass --overwrite to replace it"
    assert Path("b-inpainted.png").read_bytes() == b"mine" and not Path("a-inpainted.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--context", "wide"], "--context must be whole pixels"),
    (["--context", "-5"], "--context must be whole pixels"),
])
def test_bad_context_is_a_usage_error(tmp_path, conformance_models, shots, args, message):
    result = invoke(conformance_models["hmar"], "inpaint", str(shots / "a.png"), "--box", BOX, *args, "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: ") and message in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_an_empty_folder_or_pattern_is_an_error(tmp_path, conformance_models):
    (tmp_path / "empty").mkdir()
    for argument, message in ((tmp_path / "empty", "holds no images"), (tmp_path / "*.webp", "no files match")):
        result = invoke(conformance_models["hmar"], "inpaint", str(argument), "--box", BOX)
        assert result.exit_code == 2 and message in result.stderr


# ---- the window in the metadata -------------------------------------------------------------------
def test_single_image_json_and_png_record_the_window(tmp_path, conformance_models):
    photo = tmp_path / "big.png"
    random_rgb(400, 300, seed=2).save(photo)
    out = tmp_path / "out.png"
    result = invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", "300,200,340,240", "--seed", "0", "--json",
                    "--out", str(out))
    succeeded(result)
    summary = json.loads(result.stdout)
    assert summary["window"] == [[280, 180, 360, 260]] and summary["enlargement"] == [1.0] and summary["context"] == "0.5"
    text = text_of(out)
    assert text["hmar:window"] == "280,180,360,260" and text["hmar:enlargement"] == "1" and text["hmar:context"] == "0.5"
    full = invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", "300,200,340,240", "--context", "full", "--seed", "0",
                  "--json", "--out", str(tmp_path / "full.png"))
    succeeded(full)
    assert json.loads(full.stdout)["window"] == [[100, 0, 400, 300]] and json.loads(full.stdout)["enlargement"] == [3.75]
    assert "note: the 40x40 region is generated at 11x11 pixels by the 80 px model and enlarged 3.8x" in full.stderr


def test_outpaint_several_images_windows_in_input_pixels(tmp_path, conformance_models):
    for name, size in (("p.png", (90, 60)), ("q.png", (60, 90))):
        random_rgb(*size, seed=len(name)).save(tmp_path / name)
    result = invoke(conformance_models["hmar"], "outpaint", str(tmp_path / "p.png"), str(tmp_path / "q.png"), "--left", "30",
                    "--seed", "2", "--json", "--out", str(tmp_path / "{name}-wide.png"))
    succeeded(result)
    records = {Path(r["source"]).name: r for r in json.loads(result.stdout)["images"]}
    assert records["p.png"]["size"] == [120, 60] and records["q.png"]["size"] == [90, 90]
    for name, record in records.items():
        x0, y0, x1, y1 = record["window"][0]
        assert x0 == -30 and x1 > 0  # the strip left of the image and some of the image itself
        after, before = pixels(tmp_path / f"{Path(name).stem}-wide.png"), pixels(tmp_path / name)
        assert np.array_equal(after[:, 30:], before)


def test_the_progress_bar_counts_images(tmp_path, conformance_models, shots, monkeypatch):
    """On a terminal, stderr shows a bar of images done out of all (here drawn into a buffer)."""
    screen = io.StringIO()
    monkeypatch.setattr(editing, "err_console", Console(file=screen, force_terminal=True, width=120))
    (shots / "broken.png").unlink()
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(shots), "--box", BOX, "--seed", "0",
                     "--out", str(tmp_path / "{name}.png")))
    assert "images" in screen.getvalue() and "3/3" in screen.getvalue()
