"""Every setting of the personalisation demonstration: teach the built-in model (``minidiff/weights/tiny-shapes``)
concepts its training never showed, from 12-16 procedurally drawn images, with each of minidiff's methods.

Run from the repository root (each step seeded; one CPU thread per run):

    python -m scripts.personalise.run           # all of the below, in order
    python -m scripts.personalise.draw          # concept images + prior-preservation class images -> runs/personalise
    python -m scripts.personalise.train         # LoRA, DreamBooth (with / without prior), textual inversion
    python -m scripts.personalise.evaluate      # concept and old-vocabulary match from pixels -> results.json
    python -m scripts.personalise.docs_images   # before/after grids                              -> docs/

The concepts (drawn by ``minidiff.training.shapes``; no training image of the built-in model shows them):

- ``ring`` under the new word "sks" ("a red sks on a black background"): LoRA and DreamBooth. Always big: a small
  ring's hole is 5 px across and survives the VAE's round trip in only 90% of images, and a trial run on both sizes
  learned the ring less (41% of held-out prompts against 87.5%). (A five-pointed star was tried first:
  its tips are too fine for the 16x16 latents; the runs drew blobs the pixel measure read as circles or squares.)
- ``teal`` under the new token "<teal>" ("a <teal> circle on a blue background"): textual inversion.

Each held-out prompt combines the concept with a (colour, background) pair none of its few training images shows:
for the ring, 16 images show 14 of the 56 pairs and the prompts draw from the other 42; teal is only ever shown on
four backgrounds and asked for on the other four.

The ring is read from pixels as a shape whose mask encloses a hole (``read_scene``, ``RING_MIN_HOLE``): the
built-in model as shipped draws no enclosed hole in any of 160 images of its own vocabulary and the ring prompts.
"""

from __future__ import annotations

import os

from minidiff.training.shapes import COLOURS, SHAPES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = os.path.join(REPO, "runs", "personalise")
DATA = os.path.join(RUNS, "data")  # DATA/<concept>/*.png + metadata.jsonl
CLASS_IMAGES = os.path.join(RUNS, "class_images")  # the frozen model's images of its own vocabulary
RESULTS = os.path.join(RUNS, "results.json")
DOCS = os.path.join(REPO, "docs")

THREADS = 1  # one core per run (faster than two for a model this small, and the machine is shared)

# ---- concepts: minidiff.training.shapes.concept_scenes, held_out_concept_prompts ---------------------------------
CONCEPTS = {
    "ring": dict(
        words={"ring": "sks"}, shapes=("ring",), sizes=("big",), images=16, seed=0,
        colours=tuple(COLOURS), backgrounds=tuple(COLOURS),
        held_out_colours=tuple(COLOURS), held_out_backgrounds=tuple(COLOURS),
    ),
    "teal": dict(
        words={"teal": "<teal>"}, shapes=SHAPES, sizes=("small", "big"), images=12, seed=0,
        colours=("teal",), backgrounds=("blue", "black", "white", "green"),
        held_out_colours=("teal",), held_out_backgrounds=("red", "orange", "yellow", "purple"),
    ),
}
HELD_OUT_PROMPTS = 32  # per concept, seeded by 1
OLD_VOCABULARY_PROMPTS = 64  # minidiff.training.shapes.held_out_prompts, as scripts/builtin/evaluate.py
BASE_MODEL_MATCH = 0.906  # the built-in model's held-out match (its model card)

# ---- prior preservation: class images the frozen model draws from its own vocabulary ----------------------------
# One class prompt ("a red circle on a blue background") would only preserve that one prompt; the class here is
# "a shape", so the frozen model draws ``count`` prompts of the dataset's grammar (held-out pairs excluded), plus
# ``unconditional`` images of the empty caption: classifier-free guidance subtracts the unconditional prediction,
# and when only captioned images train it drifts. They are captioned in class_images/metadata.jsonl, which the
# trainer reads (it would draw from class_prompt only the images missing there).
CLASS = dict(count=96, unconditional=16, seed=5, steps=20, guidance=5.0)

# ---- training: minidiff.training.TrainConfig fields per run ------------------------------------------------------
PRIOR = dict(with_prior_preservation=True, class_prompt="a red circle on a blue background",
             num_class_images=CLASS["count"] + CLASS["unconditional"], prior_loss_weight=1.0)
COMMON = dict(train_batch_size=8, random_flip=False, lr_warmup_steps=20, lr_scheduler="constant",
              checkpointing_steps=10_000, num_sample_images=0, progress=False, seed=0)
# A new shape needs more than the attention projections of train_text_to_image_lora.py's default targets: the
# resnets' convolutions, the transformers' projections and feed-forwards get adapters too (rank 16). In trial runs
# (300-400 steps, no prior) the ring appeared on 34% of held-out prompts with rank 8 on the attention alone, 69%
# with these; rank 64 or 700 steps did no better (62%, 59%)
SHAPE_LORA = dict(lora_rank=16, lora_target_modules=("to_k", "to_q", "to_v", "to_out.0", "conv1", "conv2", "proj_in",
                                                     "proj_out", "ff.net.0.proj", "ff.net.2"), learning_rate=1e-3)
# The prior's target (TrainConfig.prior_target): "noise" is train_dreambooth.py's loss on the class images; with
# "frozen-model" they keep the frozen model's guided prediction at the evaluation's guidance instead (prior.py)
FROZEN_PRIOR = dict(PRIOR, prior_target="frozen-model", prior_guidance_scale=5.0)
RUNS_CONFIG = {
    "lora": dict(concept="ring", method="lora", max_train_steps=400, **SHAPE_LORA),
    # with the frozen model's prediction as the prior's target the old vocabulary holds, so the concept can be
    # pushed harder: twice the rate and steps of the noise-target run below (trial runs: 1e-3 for 400 steps drew
    # rings on 34%, for 800 on 78%; prior weight 0.25 kept 84% of the old vocabulary against 92% at 1)
    "dreambooth-lora": dict(concept="ring", method="dreambooth", use_lora=True, **dict(SHAPE_LORA, learning_rate=2e-3),
                            max_train_steps=800, **FROZEN_PRIOR),
    "dreambooth-lora-noise": dict(concept="ring", method="dreambooth", use_lora=True, max_train_steps=400,
                                        **SHAPE_LORA, **PRIOR),
    # the weights' moving average keeps more of the old vocabulary than the last step's weights (75% against 61%)
    # for about the same ring rate (25% against 28%)
    "dreambooth": dict(concept="ring", method="dreambooth", learning_rate=2e-4, max_train_steps=300, use_ema=True,
                       **PRIOR),
    "dreambooth-no-prior": dict(concept="ring", method="dreambooth", learning_rate=2e-4, max_train_steps=300),
    "textual-inversion": dict(concept="teal", method="textual-inversion", placeholder_token="<teal>",
                              initializer_token="green", learning_rate=1e-2, max_train_steps=400),
}

# ---- evaluation: as scripts/builtin/evaluate.py ------------------------------------------------------------------
STEPS, GUIDANCE, SEED = 20, 5.0, 1000
# The old vocabulary's 64 prompts are measured at SEED (the built-in model's 90.6%, which the targets are stated
# against) and again at these seeds: one image per prompt moves a run's figure by 1.6 points, and the base model
# scores 90.6-95.3% at the four seeds, so the mean over 256 images is the steadier figure
MORE_SEEDS = (2000, 3000, 4000)
