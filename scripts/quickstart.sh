#!/usr/bin/env bash
# A real migration on local databases: start PostgreSQL (source and target),
# seekdb and Milvus, generate a FastGPT-shaped modeldata table, export it to
# staging, import it into the target, migrate it on to OceanBase and to
# Milvus, verify row by row and print the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${ROWS:-5000}"
scripts/dbs.sh start
eval "$(scripts/dbs.sh env)"
cargo build --release --locked
VMIG=target/release/vmig
export PG_URL="$VMIG_TEST_PG_SOURCE"
export TARGET_PG_URL="$VMIG_TEST_PG_TARGET"
export OCEANBASE_URL="$VMIG_TEST_SEEKDB"
export MILVUS_ADDRESS="$VMIG_TEST_MILVUS" MILVUS_TOKEN=none
"$VMIG" generate --to PG_URL --rows "$ROWS" --dim 1536 --replace
# Start from a clean slate so the demo can be run again.
"$VMIG_PG_BIN/psql" "$TARGET_PG_URL" -qc "DROP TABLE IF EXISTS modeldata, vmig_ledger" >/dev/null
rm -rf staging/fastgpt-modeldata
"$VMIG" export --config pipelines/fastgpt-pg-export.json
"$VMIG" inspect staging/fastgpt-modeldata | tail -n 3
"$VMIG" import --config pipelines/fastgpt-staging-import.json --report staging/quickstart-report.json
"$VMIG" verify --from PG_URL --to env:TARGET_PG_URL
"$VMIG" status --staging staging/fastgpt-modeldata
# PostgreSQL -> OceanBase (seekdb). A rerun finds every chunk committed.
"$VMIG" migrate --config pipelines/fastgpt-pg-to-oceanbase.json --on-existing truncate --state-root staging
"$VMIG" verify --from PG_URL --to OCEANBASE_URL
# PostgreSQL -> Milvus (database fastgpt, FastGPT's field names and index).
"$VMIG" migrate --config pipelines/fastgpt-pg-to-milvus.json --on-existing truncate --state-root staging
"$VMIG" verify --from PG_URL --to MILVUS_ADDRESS
echo "report: staging/quickstart-report.json"
