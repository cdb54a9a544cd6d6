#!/usr/bin/env bash
# Build the documentation; fails on any warning (broken reference, bad reST, an undocumented
# public name). Run from anywhere; uses the repository's .venv unless PYTHON is set, with the docs
# extra installed, and the lightning and hf extras so that constrained_optim.lightning and
# constrained_optim.transformers are documented (without them their pages show a note instead):
#   .venv/bin/pip install -e ".[docs,lightning,hf]"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
# -E: a fresh environment every time, so warnings of pages unchanged since the last build are
# reported again (an incremental build would silently pass them)
exec "$PYTHON" -m sphinx -E -W --keep-going -b html docs docs/_build/html "$@"
