"""The whole outline-ControlNet demonstration from ``settings.py``: draw, train, evaluate, ship, picture.

    python -m scripts.controlnet.run
"""

from __future__ import annotations

import sys

from scripts.controlnet import docs_images, draw, evaluate, export, train


def main() -> None:
    for step in (draw, train, evaluate, export, docs_images):
        sys.argv = [step.__name__]  # each step with its defaults: everything
        step.main()


if __name__ == "__main__":
    main()
