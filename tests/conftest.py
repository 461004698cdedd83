"""Fixtures shared by several test files."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli():
    """``data_scripts/download.py`` imported as a module (its ``main(argv)`` is the CLI)."""
    spec = importlib.util.spec_from_file_location("adlab_download_cli",
                                                  REPO / "data_scripts" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
