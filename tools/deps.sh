#!/usr/bin/env bash
# Checks that the Debian packages pgfault needs are installed. As root it
# installs the missing ones with apt-get; as anyone else it prints the exact
# command to run and fails. Called first by every make target, so it must be
# quick when nothing is missing (one dpkg-query call).
#
# Usage: tools/deps.sh [check|install] [extra packages...]
set -u
mode=${1:-install}
shift || true
# libjansson-dev: the driver protocol's JSON. python3-psycopg2: the example
# driver (harness/drivers/example). chromium and netpbm: the check that
# reports/index.html renders (screenshot,
# blank-page test). perl: prove, Debian's TAP consumer, which the tests run
# on pgfault's TAP. python3-sqlalchemy and python3-psycopg-pool: the pools
# of the sqlalchemy and psycopg-pool drivers (Debian's Python; no PyPI).
pkgs=(gcc make pkg-config libpq-dev libcmocka-dev lcov postgresql-15 postgresql-client-15
    libjansson-dev python3-psycopg2 perl python3-sqlalchemy python3-psycopg-pool
    chromium netpbm "$@")

# Node.js packages of the shipped drivers: `npm ci` from each committed
# lock file, skipped when node_modules was installed from that same lock
# (its hash is kept in node_modules/.pgfault-lock). Node.js and npm come
# from the machine, or from Debian's nodejs and npm packages.
npm_deps() {
    command -v npm >/dev/null || { echo "deps: npm is missing (Debian: nodejs npm)" >&2; return 1; }
    for lock in harness/drivers/*/package-lock.json; do
        [ -f "$lock" ] || continue
        dir=$(dirname "$lock")
        sum=$(sha256sum "$lock" | cut -d' ' -f1)
        [ "$(cat "$dir/node_modules/.pgfault-lock" 2>/dev/null)" = "$sum" ] && continue
        echo "deps: npm ci in $dir" >&2
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2) ||
            { echo "deps: npm ci in $dir failed" >&2; return 1; }
        echo "$sum" >"$dir/node_modules/.pgfault-lock"
    done
}
command -v node >/dev/null && command -v npm >/dev/null || pkgs+=(nodejs npm)

missing=()
for p in "${pkgs[@]}"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)
    [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    [ "$mode" = check ] && exit 0
    npm_deps
    exit $?
fi

cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$mode" = check ] || [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages: ${missing[*]}" >&2
    echo "deps: install them with (as root):" >&2
    echo "    $cmd" >&2
    exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || { echo "deps: apt-get update failed" >&2; exit 1; }
# The Debian postgresql-common postinst creates and starts a default cluster;
# pgfault never uses it, so tell it not to create one.
if printf '%s\n' "${missing[@]}" | grep -q '^postgresql'; then
    mkdir -p /etc/postgresql-common
    f=/etc/postgresql-common/createcluster.conf
    [ -f "$f" ] && grep -q '^create_main_cluster' "$f" || echo 'create_main_cluster = false' >>"$f"
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    { echo "deps: apt-get install ${missing[*]} failed" >&2; exit 1; }
npm_deps
