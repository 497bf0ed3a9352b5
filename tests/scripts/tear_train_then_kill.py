"""One TEAR run of configs/tear/quick.py:tiny in WORKDIR; with KILL_AT, SIGKILL this process at
that step once the checkpoint of step WAIT_FOR has committed.

    python tests/scripts/tear_train_then_kill.py WORKDIR [WAIT_FOR KILL_AT]
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from jaxmed.config_check import sibling  # noqa: E402
from jaxmed.methods.tear import run  # noqa: E402
from jaxmed.train import comparison  # noqa: E402
from tests.scripts.kill_hook import make_kill_hook  # noqa: E402

if __name__ == "__main__":
    workdir = sys.argv[1]
    wait_for, kill_at = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, -1)
    config = sibling(os.path.join(REPO, "configs", "tear", "x.py"), "quick").get_config("tiny")
    sub = comparison.sub_config(config, "ssl", "tear", 0)  # as the comparison's sub-run
    run.run_one("tear", 0, workdir, sub, hooks=[make_kill_hook(workdir, wait_for, kill_at)])
