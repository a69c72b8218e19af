#!/usr/bin/env bash
# The Python package's tests: a fresh virtual environment (.venv-python, or $CALM_VENV) with the
# package built from this checkout, scikit-learn, PyTorch, tqdm and pytest; then pytest over
# python/tests, which also runs python/examples. The parity tests call the CLI, so it is built
# first (the extension then reuses the library it compiled).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CALM_VENV:-.venv-python}"
cargo build --release --locked
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "./python[test,torch]"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests
