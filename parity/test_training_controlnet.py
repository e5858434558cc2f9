"""ControlNet training parity: minidiff's ``method="controlnet"`` against diffusers' ``train_controlnet.py`` update
written as a plain loop on diffusers + transformers objects.

The reference: ``diffusers.ControlNetModel.from_unet(unet)`` (its randomly drawn condition encoder set to
minidiff's initial numbers), the UNet, VAE and text encoder frozen; each step the ControlNet sees x_t, t, the text
and the condition image in [0, 1] (ToTensor, not normalised), its residuals go into the UNet
(``down_block_additional_residuals``, ``mid_block_additional_residual``), the loss is the MSE to the noise, AdamW
over the ControlNet's weights with their gradient norm clipped. Both sides read the same image and condition files
and draw latents, timesteps and noise from the same per-sample generators (parity/test_training_adapters.py's
``Reference``). Per-step losses and the trained weights must agree, and the saved ControlNet folder must give the
same float64 image in diffusers' ControlNet pipeline as in minidiff's.
"""

from __future__ import annotations

import json
import os

import diffusers
import numpy as np
import PIL.Image
import torch

import minidiff
from parity.report import compare
from parity.test_training_adapters import (ADAM_WEIGHT_TOL, BATCH, CAPTIONS, IMAGES, LOSS_TOL, NP_TOL, RESOLUTION,
                                           SEED, STEPS, WHOLE_UNET_LR, Reference, diffusers_pipeline, flat_state,
                                           folder, minidiff_pipeline, minidiff_trainer, read_pixels)  # noqa: F401
from minidiff.training.data import global_batch_indices, sample_generators
from tests.training_fixtures import one_thread, write_image  # noqa: F401  (autouse: single-threaded tiny models)

COMPONENT = "ControlNet training"


def write_pairs(root) -> tuple[list[str], list[str]]:
    """``IMAGES`` seeded images, each with a condition image under conditions/ and a metadata.jsonl line naming
    both (train_controlnet.py's image, text and conditioning_image columns); (image paths, condition paths)."""
    images = [os.path.join(root, f"image_{i}.png") for i in range(IMAGES)]
    conditions = [os.path.join(root, "conditions", f"image_{i}.png") for i in range(IMAGES)]
    lines = []
    for i, (image, condition) in enumerate(zip(images, conditions)):
        write_image(image, size=(RESOLUTION, RESOLUTION), seed=100 + i)
        write_image(condition, size=(RESOLUTION, RESOLUTION), seed=300 + i)
        lines.append(json.dumps({"file_name": os.path.basename(image), "text": CAPTIONS[i],
                                 "conditioning_image": f"conditions/image_{i}.png"}))
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return images, conditions


def read_condition(path: str) -> torch.Tensor:
    """(3, H, W) in [0, 1]: ToTensor's uint8 / 255."""
    with PIL.Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


def controlnet_batches(paths: list[str], conditions: list[str]):
    """``batch_of_step`` of the reference loop: minidiff's seeded global-batch order, no flips (the script has
    none); each part is (pixels, captions, condition images)."""
    images = [read_pixels(path) for path in paths]
    condition_images = [read_condition(path) for path in conditions]

    def batch_of_step(step: int):
        indices = global_batch_indices(IMAGES, BATCH, step, SEED)
        part = (torch.stack([images[i] for i in indices]), [CAPTIONS[i] for i in indices],
                torch.stack([condition_images[i] for i in indices]))
        return [part], sample_generators(SEED, step, range(BATCH))

    return batch_of_step


def controlled_image(pipe, condition: torch.Tensor) -> np.ndarray:
    """A 2-step 32x32 image of the float64 ControlNet pipeline."""
    pipe.to(torch.float64)
    return pipe("a green disc at the top", image=condition[None], num_inference_steps=2, guidance_scale=5.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_controlnet_training(folder, tmp_path):
    """train_controlnet.py's update for 3 steps from ControlNetModel.from_unet; the saved folder loads in
    diffusers."""
    paths, conditions = write_pairs(tmp_path / "pairs")
    trainer = minidiff_trainer(tmp_path, folder, "run", method="controlnet", train_data_dir=str(tmp_path / "pairs"),
                               learning_rate=WHOLE_UNET_LR)
    initial = {k: v.clone() for k, v in trainer.task.controlnet.state_dict().items()}
    ours = trainer.run()

    reference = Reference(folder)
    channels = tuple(trainer.task.controlnet.config.conditioning_embedding_out_channels)
    assert channels == (16, 32), f"the new ControlNet's condition encoder is {channels}, not cut to the VAE's 2x"
    controlnet = diffusers.ControlNetModel.from_unet(reference.unet, conditioning_embedding_out_channels=channels)
    assert sorted(controlnet.state_dict()) == sorted(initial), "the two ControlNets name different weights"
    copied = {k: v for k, v in controlnet.state_dict().items() if not k.startswith("controlnet_cond_embedding")}
    compare(COMPONENT, "from_unet: the UNet's copied weights and the zero convolutions (bit-identical)",
            flat_state({k: initial[k] for k in copied}), flat_state(copied), 0.0, "abs")
    controlnet.load_state_dict(initial)  # the condition encoder's random draw: minidiff's
    controlnet.train()

    def predict(noisy, timesteps, text, parts):
        down, mid = controlnet(noisy, timesteps, text, controlnet_cond=parts[0][2], return_dict=False)
        return reference.unet(noisy, timesteps, text, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample

    theirs = reference.loop(list(controlnet.parameters()), controlnet_batches(paths, conditions),
                            learning_rate=WHOLE_UNET_LR, predict=predict)
    compare(COMPONENT, f"losses of {STEPS} steps", torch.tensor(ours), torch.tensor(theirs), LOSS_TOL)
    output = trainer.config.output_dir
    trained = diffusers.ControlNetModel.from_pretrained(output)
    theirs_state, saved_state = controlnet.state_dict(), trained.state_dict()
    compare(COMPONENT, f"ControlNet weights after {STEPS} steps (the saved folder, read by diffusers)",
            flat_state(saved_state), flat_state(theirs_state), ADAM_WEIGHT_TOL)
    assert not torch.equal(saved_state["controlnet_mid_block.weight"], initial["controlnet_mid_block.weight"]), \
        "the zero convolutions did not train"

    condition = read_condition(conditions[0])
    base = diffusers_pipeline(folder)
    theirs_pipe = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=trained)
    theirs_pipe.set_progress_bar_config(disable=True)
    ours_pipe = minidiff.StableDiffusionControlNetPipeline(
        **minidiff_pipeline(folder).components, controlnet=minidiff.ControlNetModel.from_pretrained(output))
    ours_pipe.set_progress_bar_config(disable=True)
    expected = controlled_image(theirs_pipe, condition)
    compare(COMPONENT, "saved ControlNet, ControlNet txt2img np (float64)", controlled_image(ours_pipe, condition),
            expected, NP_TOL, "abs")
    zero_residuals = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels)
    untrained = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=zero_residuals)
    untrained.set_progress_bar_config(disable=True)
    assert np.abs(expected - controlled_image(untrained, condition)).max() > 10 * NP_TOL, \
        "the trained ControlNet draws what an untrained one (zero residuals) draws"
