"""The configs of the released Stable Diffusion models, so single-file checkpoints load with no hub and no folder.

SD1 is v1-5 (CLIP ViT-L/14 text tower), SD2 is 2.1 at 768 px (OpenCLIP ViT-H used at its penultimate layer,
linear projections, per-block head counts, v-prediction); the inpainting variants take 9 input channels.
SDXL is base 1.0 (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 towers, text_time added conditioning with 6 time ids) and
refiner 1.0 (bigG alone, 5 time ids with the aesthetic score: Podell et al. 2023, Sec. 2.2 and 2.5); SDXL inpaint is
the base with 9 input channels (diffusers/stable-diffusion-xl-1.0-inpainting-0.1).
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
# cross_attention_dim 768 + 1280 (both towers' penultimate states); add_embedding input 1280 (pooled) + 6 x 256
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# bigG's states only (1280); add_embedding input 1280 + 5 x 256
REFINER_UNET = dict(
    SDXL_UNET, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4, cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SD1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD2_TEXT = dict(SD1_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512)
BIGG_TEXT = dict(SD1_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)  # all 32 layers kept; SDXL reads the penultimate one
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)

SD_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"
_SD1 = dict(vae=VAE, text_encoder=SD1_TEXT, tokenizer=SD_PAD, prediction_type="epsilon")
_SD2 = dict(vae=VAE, text_encoder=SD2_TEXT, tokenizer=OPENCLIP_PAD)
_SDXL = dict(vae=SDXL_VAE, text_encoder=SD1_TEXT, text_encoder_2=BIGG_TEXT, tokenizer=SD_PAD,
             tokenizer_2=OPENCLIP_PAD, scheduler=("EulerDiscreteScheduler", SDXL_SCHEDULER), prediction_type="epsilon",
             pipeline=dict(force_zeros_for_empty_prompt=True))
# Per variant: model configs (unet, vae, text_encoder[_2]), tokenizers by their pad token, the scheduler
# (class name, config) and its prediction type, and the pipeline's model_index.json options.
VARIANTS = {
    "sd1": dict(_SD1, unet=SD1_UNET),
    "sd1-inpaint": dict(_SD1, unet=dict(SD1_UNET, in_channels=9)),
    "sd2": dict(_SD2, unet=SD2_UNET, prediction_type="v_prediction"),
    "sd2-inpaint": dict(_SD2, unet=dict(SD2_UNET, in_channels=9, sample_size=64, upcast_attention=False),
                        prediction_type="epsilon"),
    "sdxl": dict(_SDXL, unet=SDXL_UNET),
    "sdxl-inpaint": dict(_SDXL, unet=dict(SDXL_UNET, in_channels=9)),
    "sdxl-refiner": dict(_SDXL, unet=REFINER_UNET, text_encoder=None, tokenizer=None,
                         pipeline=dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)),
}
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


def model_class(component: str) -> type:
    from minidiff.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection}[component]


def _folder_configs(folder: str, components: tuple[str, ...]) -> dict[str, Any]:
    """Configs of ``components`` (and their tokenizers), the scheduler and the model_index.json pipeline options
    from a local diffusers pipeline folder."""
    from minidiff import schedulers
    from minidiff.loading.components import component_class
    from minidiff.loading.hub import resolve_folder
    from minidiff.loading.safetensors_io import read_json_object
    from minidiff.text import CLIPTokenizer

    folder = resolve_folder(folder)
    configs: dict[str, Any] = {}
    for component in components:
        cls = model_class(component)
        path = os.path.join(folder, component, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config folder {folder} has no {component}/{cls.config_name}, which this "
                                    f"checkpoint's {component} needs: pass config= a diffusers folder of the same "
                                    "model family (SDXL checkpoints need an SDXL folder, SD 1/2 ones an SD folder)")
        configs[component] = cls.config_from_file_values(cls.load_config(folder, subfolder=component), path)
        if component in TOKENIZER_OF:
            configs[TOKENIZER_OF[component]] = CLIPTokenizer.from_pretrained(folder, subfolder=TOKENIZER_OF[component])
    scheduler_values = schedulers.SchedulerMixin.load_config(folder, subfolder="scheduler")
    scheduler_path = os.path.join(folder, "scheduler", schedulers.SchedulerMixin.config_name)
    scheduler_class = component_class("scheduler", scheduler_values.get("_class_name", "PNDMScheduler"), scheduler_path)
    configs["scheduler"] = scheduler_class.from_config(scheduler_values)
    index_path = os.path.join(folder, "model_index.json")
    index = read_json_object(index_path, "model_index.json") if os.path.isfile(index_path) else {}
    configs["pipeline"] = {key: index[key] for key in PIPELINE_OPTIONS if key in index}
    return configs


def _builtin_configs(variant: str, components: tuple[str, ...], prediction_type: str | None) -> dict[str, Any]:
    from minidiff import schedulers
    from minidiff.text import CLIPTokenizer

    if variant not in VARIANTS:
        raise ValueError(f"minidiff has no built-in config for a {variant} checkpoint (built in: {sorted(VARIANTS)}); "
                         "pass config= a local diffusers folder of the model")
    chosen = VARIANTS[variant]
    configs: dict[str, Any] = {component: dict(chosen[component]) for component in components}
    for component in components:
        if component in TOKENIZER_OF:
            configs[TOKENIZER_OF[component]] = CLIPTokenizer(pad_token=chosen[TOKENIZER_OF[component]])
    scheduler_name, scheduler_config = chosen.get("scheduler", ("PNDMScheduler", SCHEDULER))
    configs["scheduler"] = getattr(schedulers, scheduler_name)(
        **dict(scheduler_config, prediction_type=prediction_type or chosen["prediction_type"]))
    configs["pipeline"] = dict(chosen.get("pipeline", {}))
    return configs


def component_configs(variant: str, config_folder: str | os.PathLike | None, prediction_type: str | None,
                      components: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> dict[str, Any]:
    """kwargs for each model of ``components`` plus ready tokenizer(s) and scheduler objects and the pipeline
    options (``"pipeline"``), from ``config_folder`` or the built-in configs of ``variant``."""
    if config_folder is None:
        return _builtin_configs(variant, components, prediction_type)
    configs = _folder_configs(os.fspath(config_folder), components)
    if prediction_type is not None:
        configs["scheduler"] = type(configs["scheduler"]).from_config(configs["scheduler"].config,
                                                                      prediction_type=prediction_type)
    return configs
