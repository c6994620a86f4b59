"""The library edits as the CLI does: `Pipeline.inpaint`, `outpaint` and `edit_region` on images of
any size and mode give the same pixels, metadata and notes as `hmar inpaint|outpaint|edit` with the
same seed (the bundled hmar-tiny on the CPU, at a size that is not the model's); bad input is an
`InputError` of one line; `from_pretrained` takes a registry name or a folder; generations and the
README's Python example give PIL images."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hmar import hub
from hmar.edit_api import EditResult
from hmar.errors import InputError
from hmar.hub import ModelNotFoundError
from hmar.images import image_from_array
from hmar.outputs import read_metadata
from hmar.pipeline import Pipeline
from hmar_cli import sampling
from hmar_cli.app import app
from tests.test_images import random_rgb

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SIZE = (200, 150)  # W, H: neither the model's 128 px nor square
STEPS = "10"  # one step per scale: the fewest hmar-tiny takes


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("hmar-tiny", device="cpu")


@pytest.fixture
def cli_pipe(pipe, monkeypatch):
    """The CLI loads the same pipeline as the library's (loading is what this does not test)."""
    monkeypatch.setattr(sampling.SamplingOptions, "load_pipeline", lambda self: pipe)
    return pipe


def photo(mode: str = "RGB") -> Image.Image:
    """A 200x150 picture with smooth areas and edges, in `mode`."""
    base = np.asarray(random_rgb(20, 15, seed=3).resize(SIZE, Image.Resampling.BICUBIC))
    image = Image.fromarray(base, mode="RGB")
    if mode == "L":
        return image.convert("L")
    if mode == "RGBA":
        alpha = np.full(base.shape[:2], 255, dtype=np.uint8)
        alpha[:, :60] = 80  # a translucent band the edit does not touch
        return Image.fromarray(np.dstack([base, alpha]), mode="RGBA")
    return image


def cli(tmp_path: Path, command: str, image: Image.Image, *args: str) -> tuple[list[Image.Image], list[dict], list[str]]:
    """Run `hmar COMMAND` on `image` (saved as PNG), return its outputs, their metadata and its notes."""
    source = tmp_path / "in.png"
    image.save(source)
    out = tmp_path / "out-{i}.png"
    result = runner.invoke(app, [command, str(source), *args, "--model", "hmar-tiny", "--device", "cpu", "--steps", STEPS,
                                 "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output + result.stderr
    paths = sorted(tmp_path.glob("out-*.png"))
    images = []
    for path in paths:
        with Image.open(path) as opened:
            opened.load()
            images.append(opened.copy())
    notes = [line.removeprefix("note: ") for line in result.stderr.splitlines() if line.startswith("note: ")]
    return images, [read_metadata(path) for path in paths], notes


def assert_same(result: EditResult, images: list[Image.Image], metadata: list[dict], notes: list[str], source: bool) -> None:
    assert len(result.images) == len(images)
    for i, (ours, theirs) in enumerate(zip(result.images, images)):
        assert ours.mode == theirs.mode and ours.size == theirs.size
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), f"variant {i}: the library's pixels differ from the CLI's"
        expected = dict(metadata[i])
        if not source:  # an image given in memory has no file name
            del expected["hmar:source"]
        assert result.metadata_of(i) == expected
    # the same notes, arguments named as the library spells them (`model=hmar-d16`) and as the CLI does (`--model hmar-d16`)
    from hmar_cli.flags import cli_spelling

    assert [re.sub(r"\b([a-z_]+)=([^\s,;)]+)", lambda m: cli_spelling(m[1], m[2]), line) for line in result.notes] == notes
    assert not any("--" in line for line in result.notes)


def test_inpaint_box_like_the_cli(pipe, cli_pipe, tmp_path):
    image = photo()
    images, metadata, notes = cli(tmp_path, "inpaint", image, "--box", "60,40,150,120", "--seed", "5", "--num", "2")
    result = pipe.inpaint(image, box=(60, 40, 150, 120), seed=5, num=2, steps=10)
    assert_same(result, images, metadata, notes, source=False)
    assert result.images[0].size == SIZE and not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))
    outside = np.ones(SIZE[::-1], dtype=bool)
    outside[40 - 1:120 + 1, 60 - 1:150 + 1] = False
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(image)[outside])  # bit for bit outside the box
    assert result.metadata["hmar:feather"] == metadata[0]["hmar:feather"] != "0"  # the one default feather


def test_inpaint_mask_file_like_the_cli(pipe, cli_pipe, tmp_path):
    mask = Image.new("L", (100, 75))  # another size than the image: resized, with a note, by both
    mask.paste(255, (10, 10, 45, 40))
    mask.paste(255, (70, 50, 95, 70))
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    image = photo()
    images, metadata, notes = cli(tmp_path, "inpaint", image, "--mask", str(mask_path), "--seed", "1", "--context", "24")
    source = tmp_path / "in.png"  # the file the CLI read: given as a path, the metadata names it too
    assert_same(pipe.inpaint(source, mask_path, seed=1, context=24, steps=10), images, metadata, notes, source=True)
    with Image.open(mask_path) as opened:  # a mask image read from that file: the same, named by its file
        assert_same(pipe.inpaint(image, opened, seed=1, context="24", steps=10), images, metadata, notes, source=False)
    assert any("resized" in line for line in notes)


def test_outpaint_like_the_cli(pipe, cli_pipe, tmp_path):
    image = photo()
    images, metadata, notes = cli(tmp_path, "outpaint", image, "--right", "40", "--top", "20", "--class", "star", "--seed", "2")
    result = pipe.outpaint(image, right=40, top=20, label="star", seed=2, steps=10)
    assert_same(result, images, metadata, notes, source=False)
    assert result.images[0].size == (240, 170)
    assert np.array_equal(np.asarray(result.images[0])[20:, :200], np.asarray(image))  # the input, at its offset, bit for bit


def test_edit_region_like_the_cli(pipe, cli_pipe, tmp_path):
    image = photo()
    images, metadata, notes = cli(tmp_path, "edit", image, "--box", "20,30,90,110", "--class", "circle", "--seed", "3",
                                  "--feather", "4", "--dilate", "2", "--no-match-colours", "--context", "full")
    result = pipe.edit_region(image, (20, 30, 90, 110), "circle", seed=3, feather=4, dilate=2, match_colours=False,
                              context="full", steps=10)
    assert_same(result, images, metadata, notes, source=False)
    assert result.labels == [1] and result.metadata["hmar:command"] == "edit"


def test_grayscale_and_alpha_kept_like_the_cli(pipe, cli_pipe, tmp_path):
    gray = photo("L")
    images, metadata, notes = cli(tmp_path, "inpaint", gray, "--box", "80,20,180,100", "--seed", "4")
    result = pipe.inpaint(gray, box=(80, 20, 180, 100), seed=4, steps=10)
    assert_same(result, images, metadata, notes, source=False)
    assert result.images[0].mode == "L"

    rgba = photo("RGBA")
    images, metadata, notes = cli(tmp_path, "outpaint", rgba, "--left", "30", "--seed", "4")
    result = pipe.outpaint(rgba, left=30, seed=4, steps=10)
    assert_same(result, images, metadata, notes, source=False)
    out = np.asarray(result.images[0])
    assert result.images[0].mode == "RGBA" and out.shape == (150, 230, 4)
    assert np.array_equal(out[:, 30:], np.asarray(rgba))  # its alpha and the colours under it, outside the new strip
    assert (out[:, :30, 3] == 255).all()  # the generated strip is opaque


def test_arrays_and_tensors_are_images_too(pipe):
    image = photo()
    pixels = np.array(image)
    reference = pipe.inpaint(image, box="60,40,150,120", seed=0, steps=10).images[0]
    as_floats = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    mask = np.zeros(SIZE[::-1], dtype=bool)
    mask[40:120, 60:150] = True
    for given, region in ((pixels, {"mask": mask.astype(np.uint8) * 255}), (as_floats[None], {"mask": torch.from_numpy(mask)[None, None]})):
        result = pipe.inpaint(given, **region, seed=0, steps=10)
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(reference))


def one_line_input_error(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("call, expected", [
    (lambda p: p.inpaint(photo(), np.zeros((10, 10), dtype=bool)), r"mask is 10x10 but the image is 200x150"),
    (lambda p: p.inpaint(photo(), torch.ones(2, 1, 150, 200, dtype=torch.bool)), r"2 masks: one image takes one"),
    (lambda p: p.inpaint(photo(), np.zeros((150, 200), dtype=bool)), r"selects nothing"),
    (lambda p: p.inpaint(photo(), Image.new("L", (200, 150))), r"selects nothing"),
    (lambda p: p.inpaint(photo(), np.full((150, 200), 0.5, dtype=np.float64) * 3), r"floats must be in \[0, 1\]"),
    (lambda p: p.inpaint(photo(), np.ones((150, 200), dtype=np.int32)), r"uint8 .* or float"),
    (lambda p: p.inpaint(photo(), box=(300, 200, 400, 300)), r"wholly outside the 200x150 image"),
    (lambda p: p.inpaint(photo(), box=(10, 10, 5, 50)), r"is empty"),
    (lambda p: p.inpaint(photo(), box=(1.5, 2, 3, 4)), r"four whole numbers"),
    (lambda p: p.inpaint(photo()), r"^give the region to regenerate as either a mask \(mask\) or a box \(box\), one of them$"),
    (lambda p: p.inpaint(photo(), np.ones((150, 200), dtype=bool), box=(0, 0, 5, 5)), r"^give the region to regenerate as either a mask \(mask\) or a box \(box\), one of them$"),
    (lambda p: p.edit_region(photo(), (0, 0, 50, 50)), r"needs a label"),
    (lambda p: p.edit_region(photo(), (0, 0, 50, 50), "tabby cat"), r"tabby cat"),
    (lambda p: p.inpaint(photo(), box=(0, 0, 50, 50), num=0), r"num must be"),
    (lambda p: p.inpaint(photo(), box=(0, 0, 50, 50), strength=0.5), r"unknown sampling option strength"),
    (lambda p: p.inpaint(photo(), box=(0, 0, 50, 50), context="wide"), r"context must be"),
    (lambda p: p.inpaint(photo(), box=(0, 0, 50, 50), feather=-1), r"feather must be"),
    (lambda p: p.inpaint(photo(), box=(0, 0, 50, 50), steps=0), r"steps"),
    (lambda p: p.inpaint(torch.rand(2, 3, 150, 200), box=(0, 0, 50, 50)), r"a batch of 2"),
    (lambda p: p.inpaint(np.full((150, 200, 3), 2.0), box=(0, 0, 50, 50)), r"divide by 255"),
    (lambda p: p.inpaint(np.zeros((150, 200, 2), dtype=np.uint8), box=(0, 0, 50, 50)), r"got shape \(150, 200, 2\)"),
    (lambda p: p.inpaint([[0, 1]], box=(0, 0, 50, 50)), r"got list"),
    (lambda p: p.inpaint("missing.png", box=(0, 0, 50, 50)), r"image not found: missing.png"),
    (lambda p: p.outpaint(photo()), r"exactly one of"),
    (lambda p: p.outpaint(photo(), to=(100, 100)), r"does not enlarge"),
    (lambda p: p.outpaint(photo(), right=10**6), r"more than"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_input_is_a_one_line_input_error(pipe, call, expected):
    assert re.search(expected, one_line_input_error(lambda: call(pipe)))



# The same refusal through the library and the command line: the library's message names the
# argument (`feather=100`), the CLI's the flag (`--feather 100`); the rest of the line is the same.
@pytest.mark.parametrize("command, call, flags, library, command_line", [
    ("inpaint", lambda p, image: p.inpaint(image, box=(0, 0, 20, 20), feather=100), ["--box", "0,0,20,20", "--feather", "100"],
     "feather=100 is wider than the region to regenerate (20x20 pixels)", "--feather 100 is wider than the region to regenerate (20x20 pixels)"),
    ("inpaint", lambda p, image: p.inpaint(image, box=(0, 0, 20, 20), dilate=4, feather=100),
     ["--box", "0,0,20,20", "--dilate", "4", "--feather", "100"], "feather=100 is wider than the region to regenerate (24x24 pixels after dilate)",
     "--feather 100 is wider than the region to regenerate (24x24 pixels after --dilate)"),
    ("inpaint", lambda p, image: p.inpaint(image, box=(0, 0, 20, 20), context="wide"), ["--box", "0,0,20,20", "--context", "wide"],
     "context must be whole pixels", "--context must be whole pixels"),
    ("outpaint", lambda p, image: p.outpaint(image), [],
     "give exactly one of left/right/top/bottom, expand or to", "give exactly one of --left/--right/--top/--bottom, --expand or --to"),
    ("outpaint", lambda p, image: p.outpaint(image, expand=0.5), ["--expand", "0.5"],
     "expand must be more than 1", "--expand must be more than 1"),
    ("outpaint", lambda p, image: p.outpaint(image, right=10**6), ["--right", str(10**6)],
     "right=1000000 is more than 10,954 pixels", "--right 1000000 is more than 10,954 pixels"),
    ("outpaint", lambda p, image: p.outpaint(image, to=(150, 100)), ["--to", "150x100"],
     "to=150x100 does not enlarge the 200x150 image", "--to 150x100 does not enlarge the 200x150 image"),
], ids=["feather", "feather-after-dilate", "context", "no-way-to-grow", "expand", "margin", "to"])
def test_library_errors_name_arguments_and_the_cli_names_flags(pipe, cli_pipe, tmp_path, command, call, flags, library,
                                                                command_line):
    image = photo()
    message = one_line_input_error(lambda: call(pipe, image))
    assert library in message and "--" not in message
    source = tmp_path / "in.png"
    image.save(source)
    result = runner.invoke(app, [command, str(source), *flags, "--model", "hmar-tiny", "--out", str(tmp_path / "out.png")])
    assert result.exit_code == 2 and result.stderr.strip() == "error: " + message.replace(library, command_line)
    assert not (tmp_path / "out.png").exists()


def test_a_batch_reports_each_image_with_the_flags(cli_pipe, tmp_path):
    """Several images: each failure is its own line (and JSON record), worded as the command line's."""
    for name in ("a", "b"):
        photo().save(tmp_path / f"{name}.png")
    result = runner.invoke(app, ["inpaint", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--box", "0,0,20,20", "--feather", "100",
                                 "--model", "hmar-tiny", "--out", str(tmp_path / "{name}-out.png"), "--json"])
    assert result.exit_code == 1
    wanted = "--feather 100 is wider than the region to regenerate (20x20 pixels)"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all(wanted in line for line in lines)
    assert [record["error"] for record in json.loads(result.stdout)["failed"]] == [lines[0].split(": ", 2)[2]] * 2


def test_an_error_keeps_the_arguments_it_names():
    """`params` lists them, the CLI's table spells them as flags (`label` is `--class`), and a pickled
    error (from another process) words itself the same."""
    from hmar.errors import arg
    from hmar_cli.flags import message

    error = InputError(f"{arg('label', 3)} does not fit with {arg('match_colours')}; pass {arg('overwrite', True)}")
    assert error.params == ("label", "match_colours", "overwrite")
    assert str(error) == "label=3 does not fit with match_colours; pass overwrite=True"
    assert message(error) == "--class 3 does not fit with --match-colours; pass --overwrite"
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and message(again) == message(error) and again.params == error.params
    assert message(ValueError("plain")) == "plain" and message(InputError("no argument")) == "no argument"


def test_every_argument_the_engine_names_is_a_flag_of_the_cli():
    """The arguments that `hmar.errors.arg` names in the engine's messages, as the CLI spells them,
    are options of its commands (the table in `hmar_cli.flags` has not drifted from them)."""
    import typer.main

    from hmar_cli.flags import flag

    engine = ROOT / "hmar"
    named = set()
    for source in engine.glob("*.py"):
        text = source.read_text()
        named |= set(re.findall(r"\barg\(['\"](\w+)['\"]", text))
        named |= set(re.findall(r"check_pixels_option\(\"(\w+)\"", text))
    named |= {"left", "right", "top", "bottom"}  # named in a loop over the margins
    assert {"feather", "dilate", "context", "expand", "to", "mask", "box", "quality", "overwrite", "device"} <= named

    def options(command) -> set[str]:
        found = {opt for param in command.params for opt in param.opts}
        for sub in getattr(command, "commands", {}).values():
            found |= options(sub)
        return found

    assert {flag(name) for name in named} <= options(typer.main.get_command(app))


def test_edit_takes_masks_with_a_channel_axis(pipe):
    """`Pipeline.edit` at the model's size: (N, 1, H, W) keep masks are (N, H, W) ones."""
    size = pipe.resolution
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(1, size, size, dtype=torch.bool)
    keep[:, 32:96, 32:96] = False
    flat = pipe.edit(images, keep, seed=0, steps=10).images
    assert torch.equal(pipe.edit(images, keep[:, None], seed=0, steps=10).images, flat)
    message = one_line_input_error(lambda: pipe.edit(images, keep[:, None].expand(1, 3, size, size), seed=0))
    assert "(N, 1, 128, 128)" in message
    message = one_line_input_error(lambda: pipe.edit(images[:, :, :100], keep[:, :100], seed=0))
    assert "Pipeline.inpaint" in message


def test_from_pretrained_takes_a_name_or_a_folder(pipe):
    folder = hub.resolve_model("hmar-tiny")
    by_folder = Pipeline.from_pretrained(str(folder), device="cpu")
    assert by_folder.config == pipe.config and pipe.name == "hmar-tiny" and by_folder.name == str(folder)
    theirs = by_folder.transformer.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in pipe.transformer.state_dict().items())
    with pytest.raises(ModelNotFoundError, match=r"registry name, not a folder: use Pipeline.from_pretrained\('hmar-tiny'\)"):
        Pipeline.from_folder("hmar-tiny")
    with pytest.raises(ModelNotFoundError, match=r"no model folder at nowhere/model \(no such folder\)"):
        Pipeline.from_folder("nowhere/model")


def test_generation_to_pil(pipe):
    generation = pipe.generate(["star"], seed=0, steps=10)
    pictures = generation.to_pil()
    assert len(pictures) == 1 and pictures[0].size == (128, 128) and pictures[0].mode == "RGB"
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(image_from_array(generation.images[0].permute(1, 2, 0).numpy())))


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """README's Python example (the block that uses hmar-tiny) runs as printed."""
    blocks = [block for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if 'from_pretrained("hmar-tiny")' in block]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert read_metadata(tmp_path / "inpainted.png")["hmar:command"] == "inpaint"


def test_notes_name_arguments_as_errors_do():
    """An edit's notes name arguments as its errors do: the library's wording in `EditResult.notes`,
    the flags where the CLI prints them."""
    from hmar.errors import arg, library_spelling, worded
    from hmar_cli.flags import text

    line = f"a smaller region, or the default context window instead of {arg('context', 'full')} would keep more detail"
    assert worded(line, library_spelling).endswith("instead of context=full would keep more detail")
    assert text(line).endswith("instead of --context full would keep more detail")
    assert text(f"then {arg('model', 'hmar-d16')}") == "then --model hmar-d16"
