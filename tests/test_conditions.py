"""Condition images that need no model (minidiff.pipelines.conditions): Canny edges and outlines, checked by their
properties."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from minidiff.pipelines.conditions import canny, outline, reachable


def edges_of(image: np.ndarray, **kwargs) -> np.ndarray:
    out = np.asarray(canny(image, **kwargs))  # (H, W, 3) uint8
    assert out.dtype == np.uint8 and out.shape == image.shape[:2] + (3,)
    assert set(np.unique(out)) <= {0, 255} and (out == out[..., :1]).all()
    return out[..., 0] > 0


def test_a_step_edge_gives_one_thin_line_where_the_step_is():
    image = np.zeros((16, 16), dtype=np.uint8)
    image[:, 8:] = 200
    edges = edges_of(image)
    assert edges[:, 7].all() and edges.sum() == 16  # the tie goes to the pixel before the step: one column


def test_a_square_outline_and_nothing_inside_or_outside():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[8:24, 8:24] = (255, 255, 255)
    edges = edges_of(image)
    inside = np.zeros_like(edges)
    inside[9:23, 9:23] = True
    near_outline = np.zeros_like(edges)
    near_outline[6:26, 6:26] = True
    assert edges.any() and not (edges & inside).any() and not (edges & ~near_outline).any()
    for side in (edges[7:25, 7], edges[7:25, 23], edges[7, 7:25], edges[23, 7:25]):  # each side of the square
        assert side[2:-2].all()
    assert not edges_of(np.full((32, 32, 3), 90, dtype=np.uint8)).any()  # a flat image has no edge


def test_hysteresis_keeps_weak_edges_joined_to_strong_ones_and_drops_lone_weak_ones():
    image = np.zeros((24, 24), dtype=np.uint8)
    image[:12, 8:16] = 200  # a strong step at column 7/8 in the top half (Sobel magnitude 800)
    image[12:, 8:16] = 30  # continued by a weak one below (magnitude 120: between the thresholds)
    image[4:20, 20:] = 30  # a rectangle whose edges are all weak (at most 180), joined to nothing strong
    edges = edges_of(image, low_threshold=100, high_threshold=200)
    assert edges[2:9, 7].all() and edges[14:22, 7].all()  # the weak half survives through the strong half
    assert not edges[:, 18:].any()  # the lone weak rectangle is dropped
    assert edges_of(image, low_threshold=100, high_threshold=100)[:, 18:].any()  # it is there with a lower bar


def test_the_l2_magnitude_is_smaller_on_a_diagonal_edge():
    image = np.where(np.add.outer(np.arange(24), np.arange(24)) < 24, 0, 60).astype(np.uint8)  # a 45 degree step
    assert edges_of(image, low_threshold=300, high_threshold=300).any()  # |gx| + |gy| reaches 360 at the step
    assert not edges_of(image, low_threshold=300, high_threshold=300, l2_gradient=True).any()  # hypot only 268


def test_canny_reads_pil_images_and_paths(tmp_path):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[:, 8:] = (0, 200, 0)
    PIL.Image.fromarray(image).save(tmp_path / "step.png")
    expected = np.asarray(canny(image))
    assert np.array_equal(np.asarray(canny(PIL.Image.fromarray(image))), expected)
    assert np.array_equal(np.asarray(canny(tmp_path / "step.png")), expected)
    assert np.array_equal(np.asarray(canny(str(tmp_path / "step.png"))), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(low_threshold=200, high_threshold=100), "low_threshold <= high_threshold"),
    (dict(low_threshold=-1), "0 <= low_threshold"),
])
def test_bad_thresholds_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        canny(np.zeros((8, 8), dtype=np.uint8), **kwargs)


@pytest.mark.parametrize("image", [np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8, 4), dtype=np.uint8)])
def test_images_canny_cannot_read_are_refused(image):
    with pytest.raises(ValueError, match=r"uint8 array of shape \(H, W\) or \(H, W, 3\)"):
        canny(image)


def test_reachable_follows_diagonals_only_when_asked():
    allowed = np.eye(4, dtype=bool)
    seeds = np.zeros((4, 4), dtype=bool)
    seeds[0, 0] = True
    assert reachable(seeds, allowed).sum() == 1
    assert np.array_equal(reachable(seeds, allowed, diagonal=True), allowed)


def test_outline_is_the_masks_inner_boundary():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 1:5] = True
    image = outline(mask)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and (image == image[..., :1]).all()
    edge = image[..., 0] == 255
    expected = mask.copy()
    expected[3:5, 2:4] = False  # the interior: all four neighbours inside
    assert np.array_equal(edge, expected) and set(np.unique(image)) == {0, 255}
    assert outline(np.ones((4, 4)))[..., 0].tolist() == [[255] * 4, [255, 0, 0, 255], [255, 0, 0, 255], [255] * 4]
    with pytest.raises(ValueError, match=r"2-D mask \(H, W\), got shape \(8, 8, 3\)"):
        outline(image)
