#!/usr/bin/env bash
# The main job, end to end on this machine: installs what it needs, starts Orthanc (the PACS) + Redis + the pacsai
# node + a worker, uploads a real CT study to Orthanc, and shows the SEG + SR results arriving back in Orthanc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
