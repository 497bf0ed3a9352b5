"""Every shipped config builds and holds only keys its method reads."""

import glob
import importlib.util
import os

import pytest

from jaxmed.config_check import check_keys
from jaxmed.main import method_module
from tests.conftest import REPO

# Every config file under configs/ (configs/<method>/*.py too); common.py files hold shared parts.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                 if os.path.basename(p) != "common.py")


def _name(path):
    return os.path.relpath(path, os.path.join(REPO, "configs"))


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_is_valid(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the command is documented, with this file's own path (catches a moved file's stale doc)
    assert mod.__doc__ and f"jaxmed --config=configs/{_name(path)}" in mod.__doc__
    config = mod.get_config()
    check_keys(config, method_module(config).default_config())
