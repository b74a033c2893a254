"""Command-line tools that are test dependencies (hadolint, kubernetes-validate, Compose)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest


def tool_path(name: str, install_hint: str) -> str:
    """The path of ``name``: beside this interpreter (the venv's bin/, which need not be on
    PATH when pytest runs as ``.venv/bin/python -m pytest``), else on PATH. Missing, the
    test fails under ``CI=true`` and is skipped elsewhere, naming how to install it."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is missing ({install_hint}; it is a test dependency)")
    pytest.skip(f"{name} is not installed ({install_hint})")
