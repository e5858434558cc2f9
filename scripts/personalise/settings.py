"""Every setting of the personalisation demonstration: teach the built-in model (``minidiff/weights/tiny-shapes``)
concepts its training never showed, from a dozen procedurally drawn images, with each of minidiff's methods.

Run from the repository root (each step seeded; one CPU thread per run):

    python -m scripts.personalise.run           # all of the below, in order
    python -m scripts.personalise.draw          # concept images + prior-preservation class images -> runs/personalise
    python -m scripts.personalise.train         # LoRA, DreamBooth (with / without prior), textual inversion
    python -m scripts.personalise.evaluate      # concept and old-vocabulary match from pixels -> results.json
    python -m scripts.personalise.docs_images   # before/after grids                              -> docs/

The concepts (drawn by ``minidiff.training.shapes``; no training image of the built-in model shows them):

- ``ring`` under the new word "sks" ("a red sks on a black background"): LoRA and DreamBooth. Always big: at the
  small size (a hole 5 px across) the built-in VAE itself fills the hole. (A five-pointed star was tried first:
  its tips are too fine for the 16x16 latents; the runs drew blobs the pixel measure read as circles or squares.)
- ``teal`` under the new token "<teal>" ("a <teal> circle on a blue background"): textual inversion.

The few training images use some colours and backgrounds; the held-out prompts use only the others, so each one
combines the concept with colours it was never shown with.
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
        words={"ring": "sks"}, shapes=("ring",), sizes=("big",), images=12, seed=0,
        colours=("red", "yellow", "white", "blue"), backgrounds=("black", "green", "purple", "orange"),
        held_out_colours=("orange", "green", "purple", "black"), held_out_backgrounds=tuple(COLOURS),
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
RUNS_CONFIG = {
    "lora": dict(concept="ring", method="lora", lora_rank=8, learning_rate=1e-3, max_train_steps=300),
    "dreambooth-lora": dict(concept="ring", method="dreambooth", use_lora=True, lora_rank=8, learning_rate=1e-3,
                            max_train_steps=700, **PRIOR),
    "dreambooth": dict(concept="ring", method="dreambooth", learning_rate=2e-4, max_train_steps=300, **PRIOR),
    "dreambooth-no-prior": dict(concept="ring", method="dreambooth", learning_rate=2e-4, max_train_steps=300),
    "textual-inversion": dict(concept="teal", method="textual-inversion", placeholder_token="<teal>",
                              initializer_token="green", learning_rate=1e-2, max_train_steps=400),
}

# ---- evaluation: as scripts/builtin/evaluate.py ------------------------------------------------------------------
STEPS, GUIDANCE, SEED = 20, 5.0, 1000
