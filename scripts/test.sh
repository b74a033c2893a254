#!/usr/bin/env bash
# Install batchup-service with its test and benchmark dependencies into ./.venv, check
# lint, formatting and types, and run the whole test suite (unit, parity against
# batchup 0.2.3, integration with real server processes). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
