#!/usr/bin/env bash
# Installs what omx needs on a Debian/Ubuntu machine: system packages (serf, a
# compiler for llama-cpp-python, the test registry), a virtualenv in .venv and
# the Python dependencies. Safe to run again; it only adds what is missing.
#   scripts/setup.sh            # runtime + demo model
#   scripts/setup.sh --test     # also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras="demo"
[ "${1:-}" = "--test" ] && extras="demo,test"

# util-linux: setpriv, with which the serf agent dies with its node. b3sum and curl: the baselines
# bench/peer_transfer.py measures against. iproute2: ip and tc, with which bench/replication.py builds
# its rate-limited network namespaces.
apt_packages=(serf util-linux docker-registry cmake build-essential python3-venv python3-dev curl b3sum iproute2 bubblewrap)
# node and npm (unless some install of node already brings npm): the official Ollama JavaScript
# client, driven by tests/test_integrations.py.
if [ "${1:-}" = "--test" ] && ! command -v npm >/dev/null; then apt_packages+=(nodejs npm); fi
# chromium: the headless browser tests/test_web_dashboard.py drives through Playwright (its executable_path;
# Playwright's own browser download is never used).
if [ "${1:-}" = "--test" ]; then apt_packages+=(chromium); fi
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = "none" ]; then
    echo "setup: cannot install ${missing[*]} (not root and no sudo); continuing without them" >&2
  else
    echo "setup: installing system packages: ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # serf's and docker-registry's service units must not start system-wide daemons.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    for unit in serf docker-registry; do
      $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
echo "setup: installing omx and its Python dependencies (llama-cpp-python compiles once, ~7 min)"
.venv/bin/python -m pip install -q -e ".[$extras]"
if [ "${1:-}" = "--test" ]; then
  # niquests: the HTTP/3 client tests/test_http3_client.py drives (a client omx does not write). It brings
  # urllib3-future, which replaces urllib3 wherever it is installed, so it gets a virtualenv of its own.
  if [ ! -x .venv-h3/bin/python ]; then
    echo "setup: creating .venv-h3 (niquests, for the HTTP/3 client test)"
    "$python" -m venv .venv-h3
  fi
  .venv-h3/bin/python -m pip install -q "niquests>=3.11"
  if command -v npm >/dev/null; then
    echo "setup: installing the npm packages of tests/js (the Ollama JavaScript client)"
    npm ci --prefix tests/js --ignore-scripts --no-audit --no-fund --loglevel=error
  else
    echo "setup: no npm: the JavaScript client's test will be skipped (it fails under CI=true)" >&2
  fi
fi
echo "setup: done"
