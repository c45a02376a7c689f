#!/usr/bin/env bash
# Set up .venv on a fresh machine: the CPU build of torch, the advframe core, every plugin under
# plugins/ (editable, so a change is live at once), and pytest. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch would pull several GB of CUDA packages
.venv/bin/python -m pip install --quiet torch==2.13.0
# the build backend once, then no per-package build environment (each would query the index again)
.venv/bin/python -m pip install --quiet "setuptools>=77" wheel
packages=(-e ".[test]")
for plugin in plugins/*/; do packages+=(-e "$plugin"); done
# PYTHONWARNINGS: setuptools warns once per editable package that it is editable
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-build-isolation "${packages[@]}"
