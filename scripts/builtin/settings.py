"""Every setting of the built-in model ``minidiff/weights/tiny-shapes``: data, architectures, training, export.

Run from the repository root, in order (each stage seeded; one CPU thread each):

    python -m scripts.builtin.train_vae         # AutoencoderKL on the shapes images        -> runs/builtin/vae
    python -m scripts.builtin.train_text_unet   # CLIPTextModel + UNet2DConditionModel     -> runs/builtin/text_unet
    python -m scripts.builtin.export            # fp16 safetensors + configs               -> minidiff/weights/tiny-shapes
    python -m scripts.builtin.evaluate          # prompt-match fraction, inversion + edit measurements
    python -m scripts.builtin.docs_images       # the PNGs the README shows                -> docs/

Each training script resumes from its latest checkpoint when rerun with ``--resume``.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = os.path.join(REPO, "runs", "builtin")
VAE_RUN = os.path.join(RUNS, "vae")
TEXT_UNET_RUN = os.path.join(RUNS, "text_unet")
OUTPUT = os.path.join(REPO, "minidiff", "weights", "tiny-shapes")

THREADS = 1  # the machine is shared: one core per run

# ---- data: minidiff.training.shapes.CaptionedShapes ---------------------------------------------------------------
DATASET = dict(num_images=20000, resolution=32, seed=0)

# ---- models (diffusers / transformers config keys) ----------------------------------------------------------------
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
)  # 32x32x3 images <-> 16x16x4 latents (a 4x smaller 8x8 latent blurred the small shapes away)
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)  # cross-attention at 8x8 and 4x4 (and the mid block)
# Stable Diffusion's betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al. 2024,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"; SD 2.x predicts v). With SD 1.x's own schedule
# x_T keeps a little of the image - on latents this small enough to give away the colours - so a first model
# learned to read colours from the noise instead of the prompt and ignored prompts when sampling.
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)

# ---- training ----------------------------------------------------------------------------------------------------
VAE_TRAINING = dict(
    seed=0, steps=2500, batch_size=32, learning_rate=1e-3, warmup_steps=100, weight_decay=0.0,
    kl_weight=1e-4,  # times the per-element KL(q(z|x) || N(0, I)), next to the per-pixel L1 loss
    checkpoint_every=250,
)
TEXT_UNET_TRAINING = dict(
    seed=0, steps=12000, restart_every=6000, batch_size=32, learning_rate=5e-4, warmup_steps=200, weight_decay=1e-2,
    caption_dropout=0.1,  # empty captions teach the unconditional prediction classifier-free guidance needs
    ema_max_decay=0.999, ema_power=0.75, max_grad_norm=1.0, checkpoint_every=250,
)
