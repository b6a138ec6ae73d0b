#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two test processes (PACSAI_TEST_WORKERS), each taking whole files: most end-to-end tests wait on real services.
exec .venv/bin/python -m pytest -n "${PACSAI_TEST_WORKERS:-2}" --dist loadfile "$@"
