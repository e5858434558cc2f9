"""Every setting of the outline ControlNet for the built-in model (``minidiff/weights/tiny-shapes-outline``): a
ControlNet trained beside the frozen built-in model on shape outlines, so that the shape drawn follows the outline
given while its colours follow the prompt.

Run from the repository root (each step seeded):

    python -m scripts.controlnet.run          # all of the below, in order
    python -m scripts.controlnet.draw         # training images + their outlines + metadata.jsonl -> runs/controlnet
    python -m scripts.controlnet.train        # minidiff.training.train(method="controlnet")      -> runs/controlnet
    python -m scripts.controlnet.evaluate     # held-out outlines: mask IoU and colours from pixels -> results.json
    python -m scripts.controlnet.export       # float16 copy beside the built-in model + model card numbers
    python -m scripts.controlnet.docs_images  # outlines and what each prompt draws in them      -> docs/

Each image is one circle, square or triangle anywhere in the frame at any size between the built-in model's small
and twice its big (a continuum: the model itself only knows two sizes and nine positions), captioned with its
colour and shape and, at random, its background. The condition image is the shape's 1-pixel outline, white on black
(``minidiff.pipelines.conditions.outline`` of the drawn mask).
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = os.path.join(REPO, "runs", "controlnet")
DATA = os.path.join(RUNS, "data")  # <k>.png, conditions/<k>.png, metadata.jsonl
RUN = os.path.join(RUNS, "train")
RESULTS = os.path.join(RUNS, "results.json")
SHIPPED = os.path.join(REPO, "minidiff", "weights", "tiny-shapes-outline")
DOCS = os.path.join(REPO, "docs")

THREADS = 1  # one core per run (for a model this small about as fast as two; the machine is shared)

# ---- data: scripts.controlnet.draw ------------------------------------------------------------------------------
IMAGES, DATA_SEED = 4000, 0
RADIUS = (0.15, 0.3)  # half the shape's width, a fraction of the side, drawn uniformly
BACKGROUND_MENTION = 0.6  # captions name the background this often (the built-in dataset's rate)

# ---- training: minidiff.training.TrainConfig fields -------------------------------------------------------------
TRAIN = dict(method="controlnet", conditioning_embedding_out_channels=(16, 32), train_batch_size=16,
             max_train_steps=3000, learning_rate=3e-4, lr_scheduler="constant", lr_warmup_steps=100,
             checkpointing_steps=500, num_sample_images=16, sample_steps=20, progress=False, seed=0)

# ---- evaluation: held-out outlines and colour pairs -------------------------------------------------------------
HELD_OUT, HELD_OUT_SEED = 64, 1
STEPS, GUIDANCE, SEED = 20, 5.0, 1000  # as scripts/builtin/evaluate.py
IOU = 0.7  # the bar: mask IoU >= 0.7 on >= 80% of the held-out prompts
