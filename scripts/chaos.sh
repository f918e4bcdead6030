#!/usr/bin/env bash
# Randomized kill -9 soak (the long version of tests/faults.rs, for benchmark
# machines): each round picks a target (PostgreSQL, OceanBase, Milvus) and a
# command (migrate, import), kills the run after a random delay, runs it
# again to the end and verifies the target against the source.
#
#   ROUNDS=30 ROWS=20000 MAX_KILL_S=20 scripts/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-20}"
ROWS="${ROWS:-20000}"
DIM="${DIM:-1536}"
CHUNK_ROWS="${CHUNK_ROWS:-2000}"
MAX_KILL_S="${MAX_KILL_S:-15}"
scripts/dbs.sh start
eval "$(scripts/dbs.sh env)"
"$VMIG_VENV/bin/pip" install -q --disable-pip-version-check pymysql
cargo build --release --locked
VMIG="$PWD/target/release/vmig"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
psql="$VMIG_PG_BIN/psql"

"$psql" "$VMIG_TEST_PG_SOURCE" -qc "DROP DATABASE IF EXISTS chaos_src WITH (FORCE)" -c "CREATE DATABASE chaos_src"
"$psql" "$VMIG_TEST_PG_TARGET" -qc "DROP DATABASE IF EXISTS chaos_dst WITH (FORCE)" -c "CREATE DATABASE chaos_dst"
"$VMIG_VENV/bin/python" - "$VMIG_TEST_SEEKDB" <<'PY'
import sys, urllib.parse, pymysql
u = urllib.parse.urlparse(sys.argv[1])
c = pymysql.connect(host=u.hostname, port=u.port, user=u.username or "root", password=u.password or "", autocommit=True)
c.cursor().execute("DROP DATABASE IF EXISTS chaos")
c.cursor().execute("CREATE DATABASE chaos")
PY
SRC="${VMIG_TEST_PG_SOURCE%/*}/chaos_src"
declare -A TARGET=(
  [pg]="${VMIG_TEST_PG_TARGET%/*}/chaos_dst"
  [ob]="${VMIG_TEST_SEEKDB%/*}/chaos"
  [milvus]="$VMIG_TEST_MILVUS/chaos"
)
"$VMIG" generate --to "$SRC" --rows "$ROWS" --dim "$DIM"
"$VMIG" export --from "$SRC" --staging "$WORK/st" --chunk-rows "$CHUNK_ROWS" --quiet

kinds=(pg ob milvus)
commands=(migrate import)
passed=0
for round in $(seq 1 "$ROUNDS"); do
  kind="${kinds[RANDOM % 3]}"
  command="${commands[RANDOM % 2]}"
  to="${TARGET[$kind]}"
  case "$command" in
    migrate) args=(migrate --from "$SRC" --to "$to" --chunk-rows "$CHUNK_ROWS" --job "chaos-$round" --state-root "$WORK/state") ;;
    import)
      # A fresh copy of the staging area and no ledger rows of its job yet.
      rm -rf "$WORK/import"; cp -r "$WORK/st" "$WORK/import"
      "$VMIG" reset --staging "$WORK/import" --to "$to" --yes >/dev/null 2>&1 || true
      rm -rf "$WORK/import"; cp -r "$WORK/st" "$WORK/import"
      args=(import --staging "$WORK/import" --to "$to") ;;
  esac
  delay="$(awk -v m="$MAX_KILL_S" -v r="$RANDOM" 'BEGIN { printf "%.2f", m * r / 32767 }')"
  "$VMIG" "${args[@]}" --on-existing truncate --quiet >"$WORK/killed.log" 2>&1 &
  pid=$!
  sleep "$delay"
  phase="$(grep -ho '"phase": "[^"]*"' "$WORK"/state/chaos-"$round"/status-migrate.json "$WORK"/import/status-import.json 2>/dev/null | head -1 || true)"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if ! "$VMIG" "${args[@]}" --on-existing truncate --quiet >"$WORK/resume.log" 2>&1; then
    echo "round $round: $command into $kind killed after ${delay}s ($phase): the rerun FAILED"; cat "$WORK/resume.log"; exit 1
  fi
  if ! "$VMIG" verify --from "$SRC" --to "$to" >"$WORK/verify.log" 2>&1; then
    echo "round $round: $command into $kind killed after ${delay}s ($phase): verify FAILED"; cat "$WORK/verify.log"; exit 1
  fi
  passed=$((passed + 1))
  echo "round $round: $command into $kind killed after ${delay}s (${phase:-before the status file}) · resumed · verified"
done
echo "chaos: $passed passed, 0 failed"
