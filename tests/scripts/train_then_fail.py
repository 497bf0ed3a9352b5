"""Train the tiny config and fail (as a corrupt image does) at step FAIL_AT, right after the
checkpoint of the step before it was started, while it may still be in flight.

    python tests/scripts/train_then_fail.py WORKDIR FAIL_AT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxmed.methods import supervised  # noqa: E402
from tests.configs import tiny  # noqa: E402

if __name__ == "__main__":
    workdir, fail_at = sys.argv[1], int(sys.argv[2])

    def fail(step, state):
        if step == fail_at:
            raise ValueError(f"image 17 of the training set is corrupt (step {step})")

    supervised.train_and_evaluate(tiny.get_config(), workdir, hooks=[fail])
