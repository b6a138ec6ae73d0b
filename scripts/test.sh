#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), runs the linters, type checks and import
# contracts, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CODE=(pacsai dicom_node worker models tests bench scripts)
echo "test: ruff check"; .venv/bin/ruff check "${CODE[@]}"
echo "test: ruff format --check"; .venv/bin/ruff format --check "${CODE[@]}"
echo "test: mypy --strict (product code, tests, bench, scripts)"; .venv/bin/mypy --strict "${CODE[@]}"
echo "test: import contracts"; .venv/bin/lint-imports --no-cache
# Two test processes (PACSAI_TEST_WORKERS), each taking whole files: most end-to-end tests wait on real services.
set +e
.venv/bin/python -m pytest -n "${PACSAI_TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
# pytest's 5 means no test was collected: for the suite that is a failure, never a silent pass.
[ "$status" -eq 5 ] && echo "test: pytest collected no test" >&2
exit "$status"
