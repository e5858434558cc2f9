"""The whole personalisation demonstration from ``settings.py``: draw, train, evaluate, pictures.

    python -m scripts.personalise.run
"""

from __future__ import annotations

import sys

from scripts.personalise import docs_images, draw, evaluate, train


def main() -> None:
    for step in (draw, train, evaluate, docs_images):
        sys.argv = [step.__name__]  # each step with its defaults: everything
        step.main()


if __name__ == "__main__":
    main()
