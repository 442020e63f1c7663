#!/usr/bin/env bash
# Writes constraints.txt from .venv: run after the suite passed (e.g. after `setup.sh test --latest`).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  sed -n '1,/^# --- locked/p' constraints.txt
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | sed 's/+cpu$//' | grep -v '^deltatune=='
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
