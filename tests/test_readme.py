"""README.md promises one set-up + main-job command and one test command; keep them true."""

import os
import re

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md")).read()
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    test_cmd = ci.strip().splitlines()[-1]
    assert test_cmd.startswith("python -m pytest")
    assert f"`{test_cmd}`" in readme
    assert "bash .ci/run" in readme


def test_readme_quickstart_names_an_existing_config():
    readme = open(os.path.join(REPO, "README.md")).read()
    (cmd,) = re.findall(r"^python3 -m venv .*jaxmed --config=(\S+) --workdir=\S+$", readme,
                        flags=re.M)
    assert os.path.exists(os.path.join(REPO, cmd.split(":")[0]))
