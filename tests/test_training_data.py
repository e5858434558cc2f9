"""Training data: image folders (mixed sizes and modes, classes, captions, bad input), the synthetic shapes, and the
seeded batch order that makes runs resumable and independent of the number of processes."""

from __future__ import annotations

import json

import pytest
import torch
from tests.training_fixtures import one_thread, write_image  # noqa: F401

from minidiff.training.data import (
    ImageFolderDataset,
    SyntheticShapes,
    global_batch_indices,
    load_batch,
    micro_batch_positions,
    sample_generators,
)


def test_mixed_sizes_and_modes_become_uniform_rgb(tmp_path):
    for i, (mode, size) in enumerate([("RGB", (10, 12)), ("L", (30, 9)), ("RGBA", (8, 8)), ("LA", (16, 40))]):
        write_image(tmp_path / f"img{i}.png", size=size, mode=mode, seed=i)
    write_image(tmp_path / "nested" / "deeper.jpg", size=(20, 20))
    dataset = ImageFolderDataset(str(tmp_path), resolution=8)
    assert len(dataset) == 5
    for example in (dataset[i] for i in range(len(dataset))):
        pixels = example["pixel_values"]
        assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    gray = ImageFolderDataset(str(tmp_path), resolution=8, channels=1)[1]["pixel_values"]
    assert gray.shape == (1, 8, 8)


def test_transparent_pixels_become_white(tmp_path):
    import PIL.Image

    PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.allclose(ImageFolderDataset(str(tmp_path), 8)[0]["pixel_values"], torch.ones(3, 8, 8))


def test_classes_from_subfolders_and_captions(tmp_path):
    write_image(tmp_path / "cats" / "a.png")
    write_image(tmp_path / "dogs" / "b.png")
    write_image(tmp_path / "dogs" / "c.png")
    (tmp_path / "dogs" / "c.txt").write_text("a dog\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/a.png", "text": "a cat"}) + "\n"
                                             + json.dumps({"file_name": "dogs/b.png", "text": "a brown dog"}) + "\n")
    dataset = ImageFolderDataset(str(tmp_path), 8, with_labels=True, with_captions=True)
    assert dataset.classes == ["cats", "dogs"]
    assert [dataset[i]["class_label"] for i in range(3)] == [0, 1, 1]
    assert [dataset[i]["caption"] for i in range(3)] == ["a cat", "a brown dog", "a dog"]


@pytest.mark.parametrize("setup, error, match", [
    (lambda p: None, FileNotFoundError, "does not exist"),
    (lambda p: p.mkdir(), ValueError, "no images in"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("hi")), ValueError, "no images in"),
    (lambda p: (p.mkdir(), (p / "broken.png").write_bytes(b"not a png")), ValueError,
     "cannot read image file .*broken.png"),
    (lambda p: p.write_text("x"), ValueError, "is a file"),
], ids=["missing", "empty", "no-images", "unreadable", "file"])
def test_bad_folders(tmp_path, setup, error, match):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(error, match=match):
        ImageFolderDataset(str(folder), 8)


def test_truncated_image_is_named_before_training(tmp_path):
    write_image(tmp_path / "ok.png", size=(64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # the header is fine, the pixels end early
    with pytest.raises(ValueError, match="cannot read image file .*cut.png .*remove it from the folder or replace"):
        ImageFolderDataset(str(tmp_path), 8)


def test_labels_need_subfolders_and_captions_must_exist(tmp_path):
    write_image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="one subfolder per class.*loose.png"):
        ImageFolderDataset(str(tmp_path), 8, with_labels=True)
    with pytest.raises(ValueError, match="have no caption.*loose.png"):
        ImageFolderDataset(str(tmp_path), 8, with_captions=True)
    (tmp_path / "metadata.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="metadata.jsonl line 1"):
        ImageFolderDataset(str(tmp_path), 8, with_captions=True)


def test_synthetic_shapes_are_seeded_and_labelled():
    a, b = SyntheticShapes(12, 16, seed=5), SyntheticShapes(12, 16, seed=5)
    assert torch.equal(a.images, b.images) and a.labels == b.labels
    assert not torch.equal(a.images, SyntheticShapes(12, 16, seed=6).images)
    assert a.images.shape == (12, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    colours = {0: "red disc", 1: "green square", 2: "blue triangle"}
    for i in range(12):
        assert a[i]["caption"] == f"a {colours[a[i]['class_label']]}"
        brightest = a.images[i].flatten(1).max(dim=1).values.argmax().item()
        assert brightest == a[i]["class_label"]  # red, green, blue channel


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    n, batch = 10, 3  # 3 batches per epoch, one image skipped per epoch
    epoch0 = [i for step in range(3) for i in global_batch_indices(n, batch, step, seed=1)]
    assert len(set(epoch0)) == 9
    assert global_batch_indices(n, batch, 4, seed=1) == global_batch_indices(n, batch, 4, seed=1)
    assert global_batch_indices(n, batch, 3, seed=1) != global_batch_indices(n, batch, 3, seed=2)
    with pytest.raises(ValueError, match=r"global batch \(11 = .*larger than the dataset \(10 images\)"):
        global_batch_indices(n, 11, 0, seed=1)


def test_micro_batches_tile_the_global_batch():
    """2 processes x 3 micro-batches of 2 cover positions 0..11 exactly once, whatever the split."""
    positions = [p for rank in range(2) for micro in range(3) for p in micro_batch_positions(2, 3, rank, micro)]
    assert sorted(positions) == list(range(12))


def test_per_sample_randomness_does_not_depend_on_the_split():
    whole = sample_generators(7, 3, range(4))
    halves = sample_generators(7, 3, range(2)) + sample_generators(7, 3, range(2, 4))
    draws = lambda gens: torch.cat([torch.randn(5, generator=g) for g in gens])  # noqa: E731
    assert torch.equal(draws(whole), draws(halves))
    assert not torch.equal(draws(sample_generators(7, 4, range(4))), draws(sample_generators(7, 3, range(4))))


def test_load_batch_flips_with_the_sample_generator():
    dataset = SyntheticShapes(4, 8, seed=0)
    flipped = load_batch(dataset, [0, 1, 2, 3], sample_generators(0, 0, range(4)), random_flip=True)
    plain = load_batch(dataset, [0, 1, 2, 3], sample_generators(0, 0, range(4)), random_flip=False)
    assert flipped["pixel_values"].shape == (4, 3, 8, 8) and plain["class_labels"].tolist() == dataset.labels
    decisions = [torch.rand(1, generator=g).item() < 0.5 for g in sample_generators(0, 0, range(4))]
    for i, flip in enumerate(decisions):
        expected = dataset.images[i].flip(-1) if flip else dataset.images[i]
        assert torch.equal(flipped["pixel_values"][i], expected)
    assert torch.equal(plain["pixel_values"], dataset.images)
