"""`hmar inpaint`, `hmar outpaint` and `hmar edit` end to end (Typer's CliRunner, and real `hmar`
processes) on the model folders assembled from the conformance fixtures (random weights: these tests
check the mechanics — untouched pixels, sizes, metadata, determinism, errors — not the pictures)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hmar import images, regions
from hmar.schedule import format_schedule, one_step_per_scale
from hmar_cli.app import app
from tests.test_images import _bad_files, _png_header_only, random_rgb

runner = CliRunner()
BOX = (12, 10, 40, 30)  # x0, y0, x1, y1 in the 64x48 test photo


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    random_rgb(64, 48, seed=7).save(path)
    return path


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def invoke(model: Path, command: str, *args: str):
    return runner.invoke(app, [command, *args, "--model", str(model), "--device", "cpu"])


def succeeded(result) -> None:
    assert result.exit_code == 0, result.output + result.stderr


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def box_region(size: tuple[int, int], box=BOX) -> np.ndarray:
    return regions.box_mask(regions.Box(*box), size)


# ---- the input's pixels survive -------------------------------------------------------------------
def _save_rgba(path: Path) -> None:
    rgba = np.asarray(random_rgb(64, 48, seed=1).convert("RGBA")).copy()
    rgba[:, :20, 3] = 90  # partly transparent: composited on white when read
    Image.fromarray(rgba, mode="RGBA").save(path)


def _save_sixteen_bit(path: Path) -> None:
    Image.fromarray(np.random.default_rng(2).integers(0, 65536, (48, 64), dtype=np.uint16)).save(path)


def _save_exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: stored 48x64, displayed 64x48
    random_rgb(48, 64, seed=3).save(path, exif=exif, quality=95)


INPUTS = {
    "rgb.png": lambda path: random_rgb(64, 48, seed=0).save(path),
    "rgba.png": _save_rgba,
    "gray.png": lambda path: random_rgb(64, 48, seed=4).convert("L").save(path),
    "deep.png": _save_sixteen_bit,
    "phone.jpg": _save_exif_rotated,
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_inpaint_keeps_every_pixel_outside_the_region_bit_for_bit(tmp_path, conformance_models, name):
    source = tmp_path / name
    INPUTS[name](source)
    before = np.asarray(images.load_image(source))  # the upright 8-bit RGB the command reads
    assert before.shape == (48, 64, 3)
    out = tmp_path / "out.png"
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(source), "--box", ",".join(map(str, BOX)), "--seed", "0", "--out", str(out)))
    after = np.asarray(images.load_image(out))  # read as the input is: kept alpha and grey levels give the same RGB
    region = box_region((64, 48))
    assert after.shape == before.shape
    assert np.array_equal(after[~region], before[~region])
    assert (after[region] != before[region]).any()


def test_dilate_and_feather_leave_everything_beyond_the_grown_region(tmp_path, conformance_models, photo):
    out = tmp_path / "out.png"
    succeeded(invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", "20,15,30,25", "--dilate", "3", "--feather", "4",
                     "--seed", "0", "--out", str(out)))
    grown = regions.dilate(box_region((64, 48), (20, 15, 30, 25)), 3)
    before, after = pixels(photo), pixels(out)
    assert np.array_equal(after[~grown], before[~grown]) and (after[grown] != before[grown]).any()
    with Image.open(out) as written:
        assert written.text["hmar:dilate"] == "3" and written.text["hmar:feather"] == "4"
        assert written.text["hmar:match_colours"] == "true"  # the default


def test_colour_matching_can_be_turned_off(tmp_path, conformance_models, photo, monkeypatch):
    """Matching shifts the generated region's colours only, and only when asked: without it the
    matching step never runs; outside the region both outputs are the input's. (Whether a model's
    region needs any shift depends on its weights, so the shift itself is read off the step.)"""
    import hmar.edit_window

    calls = []

    def recorded(generated, *args, **kwargs):
        matched = match_colours(generated, *args, **kwargs)
        calls.append(not np.array_equal(matched, generated))
        return matched

    match_colours = hmar.edit_window.match_colours
    monkeypatch.setattr(hmar.edit_window, "match_colours", recorded)
    outs, shifted = {}, {}
    for flag in ("--match-colours", "--no-match-colours"):
        outs[flag] = tmp_path / f"{flag}.png"
        calls.clear()
        succeeded(invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", "20,15,40,35", "--seed", "0", flag,
                         "--out", str(outs[flag])))
        shifted[flag] = list(calls)
    assert shifted["--match-colours"] and not shifted["--no-match-colours"]
    region = box_region((64, 48), (20, 15, 40, 35))
    matched, raw = pixels(outs["--match-colours"]), pixels(outs["--no-match-colours"])
    assert np.array_equal(matched[~region], raw[~region])
    if any(shifted["--match-colours"]):  # the step moved colours: the written region shows it
        assert (matched[region] != raw[region]).any()
    with Image.open(outs["--no-match-colours"]) as written:
        assert written.text["hmar:match_colours"] == "false"


@pytest.mark.parametrize("args, size, offset", [
    (["--left", "8", "--top", "4", "--right", "20"], (92, 52), (8, 4)),
    (["--expand", "1.5"], (96, 72), (16, 12)),
    (["--to", "100x50"], (100, 50), (18, 1)),
])
def test_outpaint_keeps_the_original_at_its_offset(tmp_path, conformance_models, photo, args, size, offset):
    out = tmp_path / "wide.png"
    succeeded(invoke(conformance_models["hmar"], "outpaint", str(photo), *args, "--seed", "1", "--out", str(out)))
    after = pixels(out)
    assert after.shape == (size[1], size[0], 3)
    x, y = offset
    assert np.array_equal(after[y:y + 48, x:x + 64], pixels(photo))
    with Image.open(out) as written:
        assert written.text["hmar:command"] == "outpaint" and written.text["hmar:source_size"] == "64x48"


def test_a_var_model_folder_edits_too(tmp_path, conformance_models, conformance_config, photo):
    out = tmp_path / "var.png"
    succeeded(invoke(conformance_models["var"], "edit", str(photo), "--class", "2", "--box", ",".join(map(str, BOX)), "--out", str(out)))
    region = box_region((64, 48))
    assert np.array_equal(pixels(out)[~region], pixels(photo)[~region])
    steps = invoke(conformance_models["var"], "inpaint", str(photo), "--box", "0,0,8,8", "--steps", _sizes(conformance_config)["steps"],
                   "--out", str(tmp_path / "x.png"))
    assert steps.exit_code == 2 and "VAR models sample exactly one step per scale" in steps.stderr
    assert not (tmp_path / "x.png").exists()


# ---- metadata, notes, determinism, outputs --------------------------------------------------------
def test_metadata_notes_and_json_summary(tmp_path, conformance_models, conformance_config, photo):
    small_mask = np.zeros((24, 32), dtype=np.uint8)
    small_mask[5:15, 6:20] = 255
    Image.fromarray(small_mask).save(tmp_path / "mask.png")
    out = tmp_path / "cat.png"
    result = invoke(conformance_models["hmar"], "edit", str(photo), "--class", "class 3", "--mask", str(tmp_path / "mask.png"),
                    "--seed", "9", "--top-k", "5", "--top-p", "0.8", "--cfg", "2", "--steps", _sizes(conformance_config)["steps"], "--json", "--out", str(out))
    succeeded(result)
    note = "note: mask mask.png is 32x24 but the image is 64x48: the mask was resized to the image"
    assert result.stderr.strip() == note
    summary = json.loads(result.stdout)
    assert summary["notes"] == [note.removeprefix("note: ")] and summary["size"] == [64, 48]
    assert summary["images"] == [{"path": str(out), "class": 3, "class_name": "class 3"}]
    with Image.open(out) as written:
        text = written.text
    assert text["Software"].startswith("hmar ") and text["hmar:model"] == str(conformance_models["hmar"])
    assert {k: text[f"hmar:{k}"] for k in ("command", "source", "mask", "class", "seed", "cfg", "top_k", "top_p")} == {
        "command": "edit", "source": "photo.png", "mask": "mask.png", "class": "3", "seed": "9", "cfg": "2.0", "top_k": "5", "top_p": "0.8"}
    assert len(text["hmar:schedule"].split(";")) == len(conformance_config["tokenizer"]["patch_nums"]) and summary["schedule"] == text["hmar:schedule"]


def test_full_mask_is_noted_and_default_output_names(tmp_path, conformance_models, photo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole = invoke(conformance_models["hmar"], "inpaint", str(photo), "--box", "0,0,64,48", "--num", "2")
    succeeded(whole)
    assert "note: the mask covers the whole image: this is the same as generating a new image" in whole.stderr.splitlines()
    assert (tmp_path / "photo-inpainted-0.png").is_file() and (tmp_path / "photo-inpainted-1.png").is_file()
    succeeded(invoke(conformance_models["hmar"], "outpaint", str(photo), "--bottom", "10"))
    with Image.open(tmp_path / "photo-outpainted.png") as written:
        assert written.size == (64, 58) and written.text["hmar:class"] == "none"


def test_same_seed_same_pixels_and_variants_differ(tmp_path, conformance_models, photo):
    args = ["inpaint", str(photo), "--box", ",".join(map(str, BOX)), "--num", "2"]
    succeeded(invoke(conformance_models["hmar"], *args, "--out", str(tmp_path / "a.png")))
    with Image.open(tmp_path / "a-0.png") as first:
        seed = first.text["hmar:seed"]  # a fresh seed, recorded
    succeeded(invoke(conformance_models["hmar"], *args, "--seed", seed, "--out", str(tmp_path / "b.png")))
    assert (tmp_path / "a-0.png").read_bytes() == (tmp_path / "b-0.png").read_bytes()
    assert (tmp_path / "a-1.png").read_bytes() == (tmp_path / "b-1.png").read_bytes()
    assert not np.array_equal(pixels(tmp_path / "a-0.png"), pixels(tmp_path / "a-1.png"))


def test_an_existing_output_is_refused_before_the_model_loads(tmp_path, photo, out_dir):
    taken = out_dir / "taken.png"
    taken.write_bytes(b"mine")
    result = invoke(tmp_path / "no-such-model", "inpaint", str(photo), "--box", "0,0,8,8", "--out", str(taken))
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {taken} exists; pass --overwrite to replace it"
    assert taken.read_bytes() == b"mine"


# ---- bad input: one line, the right exit code, no output ----------------------------------------
def _sizes(config: dict) -> dict[str, str]:
    """Values for the {placeholders} of the cases here, from the fixture folder's config.json."""
    patch_nums, classes, P = config["tokenizer"]["patch_nums"], config["hmar"]["num_classes"], config["tokenizer"]["patch_nums"][-1]
    per_scale = one_step_per_scale(patch_nums)
    other_count = per_scale[:-1] if len(per_scale) > 1 else per_scale * 2
    return {"num_classes": str(classes), "last_class": str(classes - 1), "steps": str(len(patch_nums) + 1),
            "other_count": format_schedule(other_count), "scales": str(len(other_count)),
            "short_last": format_schedule(per_scale[:-1] + [[P * P - 1]]), "short_sum": str(P * P - 1),
            "per_scale": format_schedule(per_scale), "too_many_steps": str(sum(p * p for p in patch_nums) + 1)}


def _bad_inputs(folder: Path) -> None:
    _bad_files(folder)  # notes.txt, empty.png, truncated.png, corrupt.png, folder.png
    (folder / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    Image.new("L", (64, 48), 0).save(folder / "black.png")
    Image.new("L", (64, 48), 255).save(folder / "white.png")
    random_rgb(64, 48).save(folder / "photo.png")


@pytest.mark.parametrize("command, args, code, message", [
    ("inpaint", ["missing.png", "--box", "0,0,8,8"], 2, "image not found"),
    ("inpaint", ["folder.png", "--box", "0,0,8,8"], 2, "is a folder, not an image file"),
    ("inpaint", ["notes.txt", "--box", "0,0,8,8"], 2, "is not an image"),
    ("inpaint", ["empty.png", "--box", "0,0,8,8"], 2, "is not an image"),
    ("inpaint", ["truncated.png", "--box", "0,0,8,8"], 2, "is corrupt or truncated"),
    ("outpaint", ["corrupt.png", "--left", "8"], 2, "is corrupt or truncated"),
    ("edit", ["bomb.png", "--class", "1", "--box", "0,0,8,8"], 2, "decompression bomb"),
    ("inpaint", ["photo.png", "--mask", "notes.txt"], 2, "error: mask "),
    ("inpaint", ["photo.png", "--mask", "nowhere.png"], 2, "mask not found"),
    ("inpaint", ["photo.png", "--mask", "black.png"], 2, "selects nothing to regenerate"),
    ("inpaint", ["photo.png", "--mask", "white.png", "--box", "0,0,8,8"], 2, "either a mask (--mask) or a box (--box), one of them"),
    ("edit", ["photo.png", "--class", "1"], 2, "either a mask (--mask) or a box (--box), one of them"),
    ("inpaint", ["photo.png", "--box", "64,40,70,48"], 2, "lies wholly outside the 64x48 image"),
    ("inpaint", ["photo.png", "--box", "1,2,3"], 2, "four integers"),
    ("inpaint", ["photo.png", "--box", "0,0,8,8", "--dilate", "-1"], 2, "--dilate"),
    ("edit", ["photo.png", "--box", "0,0,8,8"], 2, "Missing option '--class'"),
    ("edit", ["photo.png", "--class", "{num_classes}", "--box", "0,0,8,8"], 2, "class {num_classes} is out of range: this model has classes 0..{last_class}"),
    ("edit", ["photo.png", "--class", "clas 3", "--box", "0,0,8,8"], 2, "unknown class name 'clas 3'; did you mean 'class 3'"),
    ("inpaint", ["photo.png", "--box", "0,0,8,8", "--schedule", "{other_count}"], 2, "schedule has {scales} scales"),
    ("inpaint", ["photo.png", "--box", "0,0,8,8", "--schedule", "{short_last}"], 2, "sums to {short_sum}"),
    ("inpaint", ["photo.png", "--box", "0,0,8,8", "--steps", "{too_many_steps}"], 2, "steps must be between"),
    ("inpaint", ["photo.png", "--box", "0,0,8,8", "--steps", "{steps}", "--schedule", "{per_scale}"], 2, "either --steps or --schedule"),
    ("outpaint", ["photo.png"], 2, "give exactly one of --left/--right/--top/--bottom, --expand or --to"),
    ("outpaint", ["photo.png", "--left", "4", "--expand", "2"], 2, "give exactly one of"),
    ("outpaint", ["photo.png", "--expand", "0.5"], 2, "--expand must be more than 1"),
    ("outpaint", ["photo.png", "--to", "60x60"], 2, "does not enlarge the 64x48 image"),
    ("outpaint", ["photo.png", "--to", "wide"], 2, "WIDTHxHEIGHT"),
    ("outpaint", ["photo.png", "--to", "100x100", "--out", "x.gif"], 2, "output must be a .png, .jpg, .jpeg or .webp file"),
])
def test_bad_input_is_one_line_with_its_exit_code_and_no_output(tmp_path, conformance_models, conformance_config, monkeypatch,
                                                                command, args, code, message):
    sizes = _sizes(conformance_config)
    args, message = [a.format(**sizes) for a in args], message.format(**sizes)
    _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    result = invoke(conformance_models["hmar"], command, *args)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert set(tmp_path.iterdir()) == before


def test_model_device_and_output_problems(tmp_path, conformance_models, conformance_config, photo, out_dir):
    classes = str(conformance_config["hmar"]["num_classes"])
    broken = shutil.copytree(conformance_models["hmar"], tmp_path / "broken")
    (broken / json.loads((broken / "config.json").read_text())["files"]["hmar"]).unlink()
    foreign = shutil.copytree(conformance_models["hmar"], tmp_path / "foreign")  # the VAR weights as the HMAR file
    var_weights = json.loads((conformance_models["var"] / "config.json").read_text())["files"]["var"]
    shutil.copy(conformance_models["var"] / var_weights, foreign / json.loads((foreign / "config.json").read_text())["files"]["hmar"])
    cases = [
        (tmp_path / "no-such-model", ["--out", str(out_dir / "a.png")], 2, "no model folder"),
        (broken, ["--out", str(out_dir / "a.png")], 1, "weight file not found"),
        (broken, ["--out", str(out_dir / "a.png"), "--class", classes], 2, f"class {classes} is out of range"),  # before the weights
        (foreign, ["--out", str(out_dir / "a.png")], 1, "hmar weights"),
        (conformance_models["hmar"], ["--out", str(photo / "dir" / "a.png")], 2, "is a file"),
    ]
    if not torch.cuda.is_available():
        cases.append((conformance_models["hmar"], ["--out", str(out_dir / "a.png"), "--device", "cuda"], 1, "CUDA was requested"))
    for model, extra, code, message in cases:
        result = runner.invoke(app, ["inpaint", str(photo), "--box", "0,0,8,8", "--model", str(model), *extra])
        assert result.exit_code == code and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(out_dir.iterdir()) == []


def test_unreadable_image_and_mask(tmp_path, conformance_models, photo, out_dir, monkeypatch):
    """Files the user may not read (simulated: the tests may run as root, who reads anything)."""
    secret = tmp_path / "secret.png"
    random_rgb(64, 48).save(secret)
    opened = Image.open

    def open_unless_secret(path, *args, **kwargs):
        if Path(path) == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_unless_secret)
    for args, message in (([str(secret), "--box", "0,0,8,8"], f"cannot read image {secret}: permission denied"),
                          ([str(photo), "--mask", str(secret)], f"cannot read mask {secret}: permission denied")):
        result = invoke(conformance_models["hmar"], "inpaint", *args, "--out", str(out_dir / "a.png"))
        assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command, args", [
    ("inpaint", ["--box", "8,8,24,24", "--dilate", "2"]),
    ("outpaint", ["--right", "16"]),
    ("edit", ["--class", "class 2", "--box", "8,8,24,24"]),
])
def test_json_summary_of_every_editing_command(tmp_path, conformance_models, photo, command, args):
    out = tmp_path / "out.png"
    result = invoke(conformance_models["hmar"], command, str(photo), *args, "--num", "2", "--seed", "4", "--json", "--out", str(out))
    succeeded(result)
    summary = json.loads(result.stdout)  # stdout holds the summary alone: notes and bars go to stderr
    assert summary["command"] == command and summary["source"] == "photo.png" and summary["seed"] == 4
    assert summary["model"] == str(conformance_models["hmar"]) and summary["device"] == "cpu"
    assert [r["path"] for r in summary["images"]] == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]
    assert summary["classes"] == ([2, 2] if command == "edit" else [None, None])
    assert isinstance(summary["cfg"], float) and isinstance(summary["top_k"], int) and isinstance(summary["batch_size"], int)
    assert summary.get("dilate") == (2 if command == "inpaint" else 0 if command == "edit" else None)
    with Image.open(tmp_path / "out-1.png") as written:
        assert written.text["hmar:classes"] == ",".join(["2" if command == "edit" else "none"] * 2)
        assert written.size == tuple(summary["size"])


# ---- a real process ---------------------------------------------------------------------------
def hmar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmar_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_real_processes_write_notes_and_fail_in_one_line(tmp_path, conformance_models, photo):
    model = ["--model", str(conformance_models["hmar"]), "--device", "cpu"]
    done = hmar("inpaint", str(photo), "--box", "0,0,64,48", "--seed", "2", "--out", str(tmp_path / "a.png"), *model)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["note: the mask covers the whole image: this is the same as generating a new image",
                                        f"wrote 1 image(s): {tmp_path / 'a.png'}"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    failed = hmar("outpaint", str(tmp_path / "bad.png"), "--left", "5", "--out", str(tmp_path / "b.png"), *model)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.splitlines() == [f"error: image {tmp_path / 'bad.png'} is corrupt or truncated (Truncated File Read)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "bad.png", "photo.png"]
