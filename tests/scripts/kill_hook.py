"""The loop hook the kill-and-resume tests run: at step KILL_AT, wait until the checkpoint of
step WAIT_FOR has committed, then SIGKILL this process (the kill lands after a checkpoint,
mid-way through later steps)."""

import os
import signal
import time


def make_kill_hook(workdir: str, wait_for: int, kill_at: int):
    def kill_hook(step, state):
        if step != kill_at:
            return
        if wait_for <= 0:  # no checkpoint to wait for: die before the first one commits
            os.kill(os.getpid(), signal.SIGKILL)
        marker = os.path.join(workdir, "checkpoints", str(wait_for), "commit_success.txt")
        deadline = time.time() + 60
        while not os.path.exists(marker) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    return kill_hook
