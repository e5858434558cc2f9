"""The configs of the released Stable Diffusion models, so single-file checkpoints load with no hub and no folder.

SD1 is v1-5 (CLIP ViT-L/14 text tower), SD2 is 2.1 at 768 px (OpenCLIP ViT-H used at its penultimate layer,
linear projections, per-block head counts, v-prediction); the inpainting variants take 9 input channels.
Values are those of the model cards' diffusers folders.
"""

from __future__ import annotations

import os
from typing import Any

SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768,
)
SD2_UNET = dict(SD1_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                use_linear_projection=True, upcast_attention=True)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    scaling_factor=0.18215,
)
SD1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD2_TEXT = dict(SD1_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")

VARIANTS = {
    "sd1": dict(unet=SD1_UNET, text_encoder=SD1_TEXT, pad_token="<|endoftext|>", prediction_type="epsilon"),
    "sd1-inpaint": dict(unet=dict(SD1_UNET, in_channels=9), text_encoder=SD1_TEXT, pad_token="<|endoftext|>",
                        prediction_type="epsilon"),
    "sd2": dict(unet=SD2_UNET, text_encoder=SD2_TEXT, pad_token="!", prediction_type="v_prediction"),
    "sd2-inpaint": dict(unet=dict(SD2_UNET, in_channels=9, sample_size=64, upcast_attention=False),
                        text_encoder=SD2_TEXT, pad_token="!", prediction_type="epsilon"),
}


def model_class(component: str) -> type:
    from minidiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]


def _folder_configs(folder: str) -> dict[str, Any]:
    """Component configs, tokenizer and scheduler from a local diffusers pipeline folder."""
    from minidiff import schedulers
    from minidiff.loading.components import component_class
    from minidiff.loading.hub import resolve_folder
    from minidiff.text import CLIPTokenizer

    folder = resolve_folder(folder)
    configs: dict[str, Any] = {}
    for component in ("unet", "vae", "text_encoder"):
        cls = model_class(component)
        path = os.path.join(folder, component, cls.config_name)
        configs[component] = cls.config_from_file_values(cls.load_config(folder, subfolder=component), path)
    scheduler_values = schedulers.SchedulerMixin.load_config(folder, subfolder="scheduler")
    scheduler_path = os.path.join(folder, "scheduler", schedulers.SchedulerMixin.config_name)
    scheduler_class = component_class("scheduler", scheduler_values.get("_class_name", "PNDMScheduler"), scheduler_path)
    configs["scheduler"] = scheduler_class.from_config(scheduler_values)
    configs["tokenizer"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return configs


def component_configs(variant: str, config_folder: str | os.PathLike | None, prediction_type: str | None) -> dict[str, Any]:
    """kwargs for unet/vae/text_encoder plus ready tokenizer and scheduler objects."""
    from minidiff.schedulers import PNDMScheduler
    from minidiff.text import CLIPTokenizer

    if config_folder is not None:
        configs = _folder_configs(os.fspath(config_folder))
        if prediction_type is not None:
            configs["scheduler"] = type(configs["scheduler"]).from_config(configs["scheduler"].config,
                                                                          prediction_type=prediction_type)
        return configs
    chosen = VARIANTS[variant]
    return {
        "unet": dict(chosen["unet"]),
        "vae": dict(VAE),
        "text_encoder": dict(chosen["text_encoder"]),
        "scheduler": PNDMScheduler(**dict(SCHEDULER, prediction_type=prediction_type or chosen["prediction_type"])),
        "tokenizer": CLIPTokenizer(pad_token=chosen["pad_token"]),
    }

