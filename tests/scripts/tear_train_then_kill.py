"""One TEAR run of configs/tear/quick.py:tiny in WORKDIR; with KILL_AT, SIGKILL this process at
that step once the checkpoint of step WAIT_FOR has committed.

    python tests/scripts/tear_train_then_kill.py WORKDIR [WAIT_FOR KILL_AT]
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxmed.config_check import sibling  # noqa: E402
from jaxmed.methods import tear  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
workdir = sys.argv[1]
wait_for, kill_at = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, -1)


def kill_hook(step, state):
    if step != kill_at:
        return
    marker = os.path.join(workdir, "checkpoints", str(wait_for), "commit_success.txt")
    deadline = time.time() + 60
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    config = sibling(os.path.join(REPO, "configs", "tear", "x.py"), "quick").get_config("tiny")
    tear.run_one(config, "tear", 0, workdir, hooks=[kill_hook])
