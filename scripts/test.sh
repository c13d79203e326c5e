#!/usr/bin/env bash
# One command from a fresh clone to the full test suite: installs everything
# (scripts/setup.sh --test), then runs ruff and pytest (which includes the import-layer contract).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
ruff check omx runtime functions mesh storage cli tests bench
# Two workers, each taking whole test modules (a module shares one cluster): most of a test's time
# is spent waiting on real processes, so two run in about half the wall time on two cores.
pytest -n 2 --dist loadfile "$@"
