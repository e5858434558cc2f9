"""Hypothesis draws the same examples on every run and machine (``derandomize``), so CI is reproducible;
``HYPOTHESIS_PROFILE=explore make test`` draws fresh ones, worth a few runs after touching a model or the tokenizer."""

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
