"""What only a CUDA machine can check: the adapters, prompt weighting and personalisation training give on the GPU
what they give on the CPU.

    python scripts/gpu_check.py            # on a machine with a CUDA GPU; prints a table, exit 0 when all agree

The built-in model draws the same seeded image on the CPU and on CUDA (TF32 off, float32) for each case: plain,
a LoRA unfused with a per-call scale, the same LoRA fused, a two-vector textual-inversion token, compel weighting
and an A1111 prompt past 75 tokens. Noise is drawn on the CPU in both runs (as in diffusers), so the images differ
only by kernel rounding; a device mix-up (a tensor left on the CPU) raises instead. Then three short training runs
on each device from the same seed: LoRA on the UNet and text encoder, the same with gradient checkpointing, and a
textual-inversion token; the trained weights must agree. Where CUDA is absent the script says so and exits 2
without checking anything.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import PIL.Image
import torch

from minidiff.builtin import load_builtin_pipeline
from minidiff.training import TrainConfig, Trainer
from minidiff.training.distributed import Distributed
from minidiff.training.shapes import Scene, render

TOLERANCE = 1e-3  # absolute, np images in [0, 1]: CPU vs CUDA kernels in float32
TRAIN_TOLERANCE = 1e-3  # relative, trained weights after a few AdamW steps (Adam amplifies rounding a little)
LORA_TARGET = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
TOKEN = "<gpu-style>"


def lora_state_dict(pipe) -> dict[str, torch.Tensor]:
    """A seeded rank-4 diffusers-format LoRA on one cross-attention projection and one text-encoder projection."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for prefix, model, path in (("unet", pipe.unet, LORA_TARGET),
                                ("text_encoder.text_model", pipe.text_encoder, "encoder.layers.0.self_attn.q_proj")):
        out_features, in_features = model.get_submodule(path).weight.shape
        state[f"{prefix}.{path}.lora_A.weight"] = 0.2 * torch.randn(4, in_features, generator=generator)
        state[f"{prefix}.{path}.lora_B.weight"] = 0.2 * torch.randn(out_features, 4, generator=generator)
    return state


def draw(pipe, prompt: str, **kwargs):
    """A seeded 2-step np image; the generator is a CPU one on every device, as in diffusers."""
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                **kwargs).images


def run_cases(pipe) -> dict[str, object]:
    """Each case's image on ``pipe``'s device; adapters are loaded and removed around the cases that need them."""
    images = {"plain": draw(pipe, "a red circle on a blue background")}
    pipe.load_lora_weights(lora_state_dict(pipe), adapter_name="gpu")
    images["LoRA unfused, scale 0.5"] = draw(pipe, "a red circle", cross_attention_kwargs={"scale": 0.5})
    pipe.fuse_lora()
    images["LoRA fused"] = draw(pipe, "a red circle")
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    width = pipe.text_encoder.config.hidden_size
    vectors = 0.05 * torch.randn(2, width, generator=torch.Generator().manual_seed(1))
    pipe.load_textual_inversion({TOKEN: vectors})
    images["textual inversion, 2 vectors"] = draw(pipe, f"a circle, {TOKEN}")
    pipe.unload_textual_inversion()
    images["compel weighting"] = draw(pipe, "a red++ circle, (blue background)0.6", prompt_weighting="compel")
    images["a1111, 2 chunks"] = draw(pipe, "a (red:1.3) circle, " + "[soft] light, " * 30, prompt_weighting="a1111")
    return images


TRAINING_RUNS = {
    "LoRA training, UNet + text encoder": dict(method="lora", train_text_encoder=True),
    "LoRA training, gradient checkpointing": dict(method="lora", train_text_encoder=True, gradient_checkpointing=True),
    "textual-inversion training": dict(method="textual-inversion", instance_prompt=f"a {TOKEN} circle",
                                       placeholder_token=TOKEN, initializer_token="red", num_vectors=2),
}


def draw_training_images(folder: str) -> str:
    """Four scenes of the built-in model's dataset as PNGs in a new ``folder``."""
    os.makedirs(folder)
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        image = render(Scene(colour, "circle", "big", "center", "black"), 32, np.random.default_rng(i))
        PIL.Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    return folder


def flat(parameters) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in parameters])


def train_cases(device: str, images: str, output_root: str, steps: int = 4
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each training run (the built-in model) on ``device``: its weights before and after, flattened."""
    trained = {}
    for case, options in TRAINING_RUNS.items():
        config = TrainConfig(output_dir=os.path.join(output_root, device, case.replace(" ", "-")), train_data_dir=images,
                             **{"instance_prompt": "a photo of sks", **options}, train_batch_size=2, max_train_steps=steps,
                             learning_rate=1e-3, lr_warmup_steps=0, num_sample_images=0, progress=False)
        trainer = Trainer(config, Distributed(device=torch.device(device)))
        initial = flat(trainer.trainable.values())
        trainer.run()
        trained[case] = initial, flat(trainer.trainable.values())
    return trained


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is absent on this machine: nothing was checked. Run scripts/gpu_check.py where "
              "torch.cuda.is_available() is True.")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipe = load_builtin_pipeline()
    pipe.set_progress_bar_config(disable=True)
    on_cpu = run_cases(pipe)
    on_gpu = run_cases(pipe.to("cuda"))
    failed = 0
    print("| case | CPU vs CUDA | verdict |\n|---|---|---|")
    for case, expected in on_cpu.items():
        error = float(abs(on_gpu[case] - expected).max())
        failed += error > TOLERANCE
        print(f"| {case} | {error:.2e} max abs | {'pass' if error <= TOLERANCE else 'FAIL'} (tol {TOLERANCE}) |")
    with tempfile.TemporaryDirectory() as root:
        images = draw_training_images(os.path.join(root, "images"))
        trained_cpu, trained_gpu = train_cases("cpu", images, root), train_cases("cuda", images, root)
    for case, (_, expected) in trained_cpu.items():
        error = float((trained_gpu[case][1] - expected).abs().max() / expected.abs().max())
        failed += error > TRAIN_TOLERANCE
        print(f"| {case} | {error:.2e} max rel | {'pass' if error <= TRAIN_TOLERANCE else 'FAIL'} "
              f"(tol {TRAIN_TOLERANCE}) |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
