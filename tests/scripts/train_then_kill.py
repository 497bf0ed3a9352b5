"""Train the tiny config and SIGKILL this process at step KILL_AT, once the checkpoint of step
WAIT_FOR has committed (so the kill lands after a checkpoint, mid-way through later steps).

    python tests/scripts/train_then_kill.py WORKDIR WAIT_FOR KILL_AT [TINY_VARIANT]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxmed.methods import supervised  # noqa: E402
from tests.configs import tiny  # noqa: E402
from tests.scripts.kill_hook import make_kill_hook  # noqa: E402

if __name__ == "__main__":
    workdir, wait_for, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    variant = sys.argv[4] if len(sys.argv) > 4 else ""
    supervised.train_and_evaluate(tiny.get_config(variant), workdir,
                                  hooks=[make_kill_hook(workdir, wait_for, kill_at)])
