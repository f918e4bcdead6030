#!/usr/bin/env bash
# The whole test suite against real local databases (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dbs.sh start
eval "$(scripts/dbs.sh env)"
# pyarrow and DuckDB read the staging files in the interoperability test.
"${VMIG_VENV:-$PWD/.venv}/bin/pip" install -q --disable-pip-version-check pyarrow duckdb
export VMIG_TEST_PYTHON="${VMIG_VENV:-$PWD/.venv}/bin/python"
cargo test --locked -- --test-threads 2 "$@"
