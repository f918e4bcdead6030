#!/usr/bin/env bash
# The whole test suite against real local databases (started if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dbs.sh start
eval "$(scripts/dbs.sh env)"
# pyarrow and DuckDB read the staging files in the interoperability test.
"$VMIG_VENV/bin/pip" install -q --disable-pip-version-check pyarrow duckdb
export VMIG_TEST_PYTHON="$VMIG_VENV/bin/python"
# Debian's Chromium renders verify's HTML report in its test; openssl makes
# the certificates of the TLS Milvus test (scripts/dbs.sh milvus-start … tls);
# promtool checks and unit-tests the alert rules (tests/deploy.rs). Each
# command:package pair names the Debian package that has the command.
missing=()
for need in chromium:chromium openssl:openssl promtool:prometheus; do
  command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test: installing ${missing[*]} (Debian) for the HTML report, TLS and alert-rule tests"
  # prometheus without its recommends: they add prometheus-node-exporter, a
  # server on port 9100 that promtool does not need.
  with_recommends=()
  for package in "${missing[@]}"; do
    [ "$package" = prometheus ] || with_recommends+=("$package")
  done
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    { [ ${#with_recommends[@]} -eq 0 ] ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${with_recommends[@]}" >/dev/null; } &&
    { [[ " ${missing[*]} " != *" prometheus "* ]] ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; } ||
    echo "test: could not install ${missing[*]}; the HTML report, TLS or alert-rule test will fail" >&2
  # The package enables a Prometheus server on port 9090, which a running
  # init system starts (a container's policy-rc.d usually forbids that);
  # the tests need only promtool.
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
      /etc/init.d/prometheus stop >/dev/null 2>&1 || true
      update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
  fi
fi
log="$(mktemp)"
set +e
cargo test --locked --no-fail-fast -- --test-threads 2 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The Milvus suite, the online Milvus tests and the Milvus kill tests once
# more against milvus-lite, the newer-protocol server. Not repeated: the test
# that stops its own private Milvus 2.3, the kill between upserts and flush
# (milvus-lite flushes at once: there is no such moment) and repair's second
# copy (milvus-lite keeps one copy per id: there is nothing to repair).
echo "test: the Milvus suites against milvus-lite ($VMIG_TEST_MILVUS_LITE)"
VMIG_TEST_MILVUS="$VMIG_TEST_MILVUS_LITE" cargo test --locked --no-fail-fast --test milvus -- --test-threads 2 \
  --skip with_milvus_stopped "$@" 2>&1 | tee -a "$log"
lite_status=${PIPESTATUS[0]}
VMIG_TEST_MILVUS="$VMIG_TEST_MILVUS_LITE" cargo test --locked --no-fail-fast --test online_sources --test faults -- \
  --test-threads 2 milvus --skip before_its_first_flush "$@" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || lite_status=1
[ "$status" -ne 0 ] || status=$lite_status
set -e
# One closing line over all test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "vmig: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
