"""Data for training: image folders and their errors, unreadable images, batch order, the synthetic set."""
from __future__ import annotations

import os
import numpy as np
import pytest
import torch
from PIL import Image

from hmar.errors import InputError
from hmar.train.data import BatchOrder, ImageFolder, image_batches, load_training_image, with_readable
from hmar.train.errors import TrainingError
from hmar.train.synthetic import CLASSES, render, write_dataset
from tests.train_helpers import make_data


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ImageFolder.scan(tmp_path / "nowhere")


def test_folder_without_class_folders_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(InputError, match="no class sub-folders"):
        ImageFolder.scan(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="dogs"):
        ImageFolder.scan(tmp_path)


def test_classes_come_from_sorted_folder_names(tmp_path):
    for name in ("zebra", "ant"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.jpg")
    folder = ImageFolder.scan(tmp_path)
    assert folder.class_names == ("ant", "zebra")
    assert folder.labels == (0, 1)


def test_load_training_image_centre_crops_resizes_and_flips(tmp_path):
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, :20] = 255  # white left quarter: cropped away by the centre crop
    array[:, 20:40] = (255, 0, 0)  # red: the left half of the centre square
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_training_image(tmp_path / "wide.png", 16, flip=False)
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    assert image[0, :, 2].mean() > 0.9 and image[1, :, 2].mean() < -0.9  # red on the left
    flipped = load_training_image(tmp_path / "wide.png", 16, flip=True)
    assert torch.equal(flipped, image.flip(-1))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = make_data(tmp_path / "data", images_per_class=2)
    (data / "circle" / "broken.png").write_bytes(b"not a png at all")
    folder = ImageFolder.scan(data)
    order = BatchOrder(len(folder), batch_size=7, seed=0)
    batches = list(image_batches(folder, 64, order, 0, 3, num_workers=2))  # one epoch: every image once
    assert sum(b.skipped for b in batches) == 1
    assert sum(b.images.shape[0] for b in batches) == len(folder) - 1


def test_batch_order_is_a_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    assert [a.batch(s) for s in range(6)] == [b.batch(s) for s in reversed(range(6))][::-1]
    assert BatchOrder(10, 4, seed=4).batch(0) != a.batch(0)
    first_epoch = [i for s in range(5) for i, _ in a.batch(s)][:10]  # 2.5 epochs laid end to end
    assert sorted(first_epoch) == list(range(10))


def test_processes_share_the_global_batch():
    whole = BatchOrder(20, 4, seed=0, rank=0, world_size=1)
    halves = [BatchOrder(20, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for step in range(7):
        assert halves[0].batch(step) + halves[1].batch(step) == whole.batch(step)


def test_data_set_smaller_than_a_batch_is_refused():
    with pytest.raises(InputError, match="fewer than one global batch"):
        BatchOrder(3, 2, seed=0, world_size=2)


def test_synthetic_images_are_deterministic_and_distinct():
    assert len(CLASSES) >= 10
    first = np.asarray(render("star", 5, seed=1, size=64))
    assert np.array_equal(first, np.asarray(render("star", 5, seed=1, size=64)))
    assert not np.array_equal(first, np.asarray(render("star", 6, seed=1, size=64)))
    assert not np.array_equal(first, np.asarray(render("star", 5, seed=2, size=64)))
    assert render("ring", 0, size=96).size == (96, 96)


def test_synthetic_dataset_layout_and_refusal_to_overwrite(tmp_path):
    root = write_dataset(tmp_path / "shapes", images_per_class=2, size=64, seed=0)
    folder = ImageFolder.scan(root)
    assert folder.class_names == tuple(sorted(CLASSES)) and len(folder) == 2 * len(CLASSES)
    with pytest.raises(InputError, match="not empty"):
        write_dataset(root, images_per_class=2)


def test_weight_files_are_stored_in_the_export_dtype_with_an_ordinary_mode(tmp_path):
    from safetensors.torch import load_file

    from hmar.train.model_folders import save_weights

    old = os.umask(0o022)
    try:
        save_weights({"weight": torch.randn(3, 2), "index": torch.arange(3)}, tmp_path / "w.safetensors", "float16")
    finally:
        os.umask(old)
    stored = load_file(tmp_path / "w.safetensors")
    assert stored["weight"].dtype == torch.float16 and stored["index"].dtype == torch.int64  # integers keep their dtype
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_parallel_writing_gives_the_same_files(tmp_path):
    serial = write_dataset(tmp_path / "serial", images_per_class=2, size=64, seed=3, classes=["star", "ring"])
    parallel = write_dataset(tmp_path / "parallel", images_per_class=2, size=64, seed=3, classes=["star", "ring"], workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.png")) and len(files) == 4
    for name in files:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes()


def test_a_batch_with_no_readable_image_stands_in_the_last_readable_one_and_a_first_one_is_an_error(tmp_path):
    empty = lambda b: len(b) == 0  # noqa: E731
    pairs = list(with_readable([[1], [], [], [2]], 5, tmp_path, empty))
    assert pairs == [([1], [1]), ([], [1]), ([], [1]), ([2], [2])]
    with pytest.raises(TrainingError, match=f"no image of the batch of step 5 could be read; check the data folder {tmp_path}"):
        list(with_readable([[], [1]], 5, tmp_path, empty))
