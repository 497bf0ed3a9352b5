"""Every shipped config builds and holds only keys its method reads."""

import glob
import importlib.util
import os

import pytest

from jaxmed.config_check import check_keys
from jaxmed.main import method_module
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__doc__ and "jaxmed --config=" in mod.__doc__  # the command is documented
    config = mod.get_config()
    check_keys(config, method_module(config).default_config())
