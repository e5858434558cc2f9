"""Issue 11: fuzzed pipeline arguments (hypothesis). The only acceptable outcomes are finite images of the requested
shape, or a ValueError / TypeError whose message names one of the arguments passed."""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minidiff
from tests.tiny_components import tiny_pipeline

NAN, INF = float("nan"), float("inf")
DEFAULT_SIZE = 32  # the tiny UNet's sample_size 16 times the tiny VAE's scale factor 2

# Each draw starts from valid arguments and then spoils at most one of them.
VALID = dict(
    height=st.sampled_from([None, 16, 32]),
    width=st.sampled_from([None, 16, 32]),
    guidance_scale=st.one_of(st.sampled_from([0.0, 1.0, 7.5, 100.0]), st.floats(-5, 30)),
    num_inference_steps=st.integers(1, 3),
    num_images_per_prompt=st.integers(1, 2),
    clip_skip=st.sampled_from([None, 0, 1]),
    negative_prompt=st.sampled_from([None, "", "blurry"]),
    eta=st.floats(0, 1),
    output_type=st.sampled_from(["np", "pt", "latent", "pil"]),
)
INVALID = dict(
    height=[-8, 0, 30, 32.0, "32", True],
    width=[-8, 0, 36, 16.0, "16", False],
    guidance_scale=[1e30, -1e5, NAN, INF, "7", None],
    num_inference_steps=[0, -1, 1.5, True, "2"],
    num_images_per_prompt=[0, -1, 1.0, "1"],
    clip_skip=[-1, 2, 50, 1.0, True],
    negative_prompt=[5, [], ["a", "b"], [None]],
    eta=[-1.0, NAN, INF, "0"],
    output_type=["jpeg", None, "PIL", 3],
)
fuzz = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def draw_arguments(data, valid: dict, invalid: dict) -> tuple[dict, str | None]:
    """Valid arguments with at most one replaced by a bad value; returns (kwargs, name of the bad one or None)."""
    kwargs = {name: data.draw(strategy, label=name) for name, strategy in valid.items()}
    bad = data.draw(st.sampled_from([None] * 4 + list(invalid)), label="spoiled")  # about 1 in 3 all valid
    if bad is not None:
        kwargs[bad] = data.draw(st.sampled_from(invalid[bad]), label=f"bad {bad}")
    return kwargs, bad


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(minidiff.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def img2img():
    torch.set_num_threads(1)
    return tiny_pipeline(minidiff.StableDiffusionImg2ImgPipeline)


def call_and_check(pipeline, kwargs: dict, bad: str | None, height: int, width: int) -> None:
    """With one bad argument: a ValueError / TypeError naming it. Otherwise finite images of the requested shape
    (or, for img2img, the error saying that strength leaves no denoising step)."""
    try:
        images = pipeline(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    except (ValueError, TypeError) as error:
        if bad is None and "leaves no denoising step" in str(error):
            return
        assert bad is not None, f"valid arguments {kwargs} raised {type(error).__name__}: {error}"
        assert re.search(rf"\b{bad}\b", str(error)), f"{type(error).__name__} does not name {bad}: {error}"
        return
    assert bad is None, f"{bad}={kwargs[bad]!r} was accepted"
    count, output_type = kwargs["num_images_per_prompt"], kwargs["output_type"]
    if output_type == "pil":
        assert len(images) == count and all(im.size == (width, height) for im in images)
        return
    images = images.numpy() if isinstance(images, torch.Tensor) else images
    expected = {"np": (count, height, width, 3), "pt": (count, 3, height, width),
                "latent": (count, 4, height // 2, width // 2)}[output_type]
    assert images.shape == expected and np.isfinite(images).all()


@fuzz
@given(data=st.data())
def test_text_to_image_arguments(pipe, data):
    kwargs, bad = draw_arguments(data, VALID, INVALID)
    call_and_check(pipe, kwargs, bad, kwargs["height"] or DEFAULT_SIZE, kwargs["width"] or DEFAULT_SIZE)


IMAGE_VALID = {name: VALID[name] for name in VALID if name not in ("height", "width")}
IMAGE_VALID.update(
    image=st.sampled_from([
        PIL.Image.new("RGB", (32, 32), "red"),
        PIL.Image.fromarray(np.full((32, 32), 40000, np.uint16)),  # I;16
        np.full((32, 32, 3), 200, np.uint8),
        torch.rand(3, 32, 32),
    ]),
    strength=st.sampled_from([0.5, 0.9, 1.0]),
)
IMAGE_INVALID = {name: INVALID[name] for name in IMAGE_VALID if name in INVALID}
IMAGE_INVALID.update(
    image=[[], 5, np.full((32, 32, 3), 200.0), torch.rand(32, 32, 3), np.zeros((32, 32, 3), np.int64)],
    strength=[1.5, -0.1, NAN, "1"],
)


@fuzz
@given(data=st.data())
def test_image_to_image_arguments(img2img, data):
    kwargs, bad = draw_arguments(data, IMAGE_VALID, IMAGE_INVALID)
    call_and_check(img2img, kwargs, bad, DEFAULT_SIZE, DEFAULT_SIZE)
