#!/usr/bin/env bash
# The long runs that stay out of the default test run: every test marked `soak`
# (the chaos soak in tests/test_soak.py, the long fuzz and crash-point runs).
#
#   scripts/soak.sh                 # 10-minute chaos soak, plus the other soak-marked tests
#   OMX_SOAK_SECONDS=1800 scripts/soak.sh
#   scripts/soak.sh -k chaos        # extra pytest arguments narrow the run
#
# Knobs (environment): OMX_SOAK_SECONDS (600), OMX_SOAK_KILL_EVERY (60 s between kill -9s),
# OMX_SOAK_OP_EVERY (150 s between model operations), OMX_SOAK_SEED (1),
# OMX_SOAK_REPORT (where the summary table is written; default build/soak-report.txt).
# OMX_SOAK=1 is exported so soak-marked tests can size themselves up (e.g. fuzz example counts).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export OMX_SOAK=1
export OMX_SOAK_SECONDS="${OMX_SOAK_SECONDS:-600}"
mkdir -p build
export OMX_SOAK_REPORT="${OMX_SOAK_REPORT:-$PWD/build/soak-report.txt}"
# Hook: everything marked `soak` runs here.
pytest -m soak -s -p no:cacheprovider "$@"
