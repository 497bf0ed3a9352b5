import os
import subprocess
import sys
import tempfile

import pytest

# A persistent XLA compilation cache shared by this process and every subprocess it starts:
# the same programs (the tiny model's steps) are compiled once per session, not once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxmed-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles the partitionable threefry PRNG very slowly (seconds per init shape); the
# classic one is 10x faster to compile. jaxmed.main makes the same choice on CPU backends.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def subprocess_env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(args, *, devices: int = 1, timeout: float = 600, check: bool = True, **env):
    """Run `python args...` in a fresh process (own XLA flags); returns CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(devices, **env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.skip("../shared is not beside the checkout")
    return SHARED
