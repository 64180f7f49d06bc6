#!/usr/bin/env bash
# Builds pgvigil and runs `pgvigil demo`: a throwaway local PostgreSQL and a standby with
# a workload and a timeline of outages, monitored by pgvigil on
# http://127.0.0.1:9187/metrics. Ctrl-C stops and deletes everything. Arguments go to
# `pgvigil demo` (e.g. --no-standby). Installs the PostgreSQL server binaries first if they are missing
# (Debian/Ubuntu, as root or with sudo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null 2>&1; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
    echo "PostgreSQL server binaries not found; installing the postgresql package"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
fi

cargo build --release
exec ./target/release/pgvigil demo "$@"
