"""The package's metadata: the version is written once, in ``qwen_magic.__version__``."""

from __future__ import annotations

from pathlib import Path

import pytest

import qwen_magic

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_version_is_written_once_and_the_build_reads_it():
    """pyproject.toml holds no version literal of its own: setuptools' reading of it gives
    ``qwen_magic.__version__``, so the wheel and the package always say the same."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from setuptools.config.pyprojecttoml import read_configuration

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    built = read_configuration(PYPROJECT, expand=True)["project"]["version"]
    assert built == qwen_magic.__version__
