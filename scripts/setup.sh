#!/usr/bin/env bash
# Install what pacsai needs on Debian 12 (run as root): Debian packages, then a virtualenv in .venv with the
# CPU build of torch pinned (torch==2.13.0) and pacsai itself. Safe to run again; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server orthanc orthanc-dicomweb dcmtk dicom3tools chromium chromium-driver prometheus)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if ! command -v npm >/dev/null; then  # the viewer tests read our SEG/SR with dcmjs (tests/js) on Debian's node
    missing+=(nodejs npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.pacsai-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv (torch 2.13.0 CPU build first)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
# dcmjs, pinned by tests/js/package-lock.json, for the viewer tests (tests/integration/test_viewers.py)
lock_stamp="tests/js/node_modules/.pacsai-installed"
want_js="$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)"
if [ "$(cat "$lock_stamp" 2>/dev/null)" != "$want_js" ]; then
    echo "setup: npm ci in tests/js (dcmjs)"
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want_js" > "$lock_stamp"
fi
