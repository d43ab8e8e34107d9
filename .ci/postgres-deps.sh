#!/usr/bin/env bash
# Make sure a PostgreSQL server binary exists for the store's Postgres tests; the tests start
# and stop their own throw-away cluster. Installs from Debian's packages when run as root.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null; then
    echo "installing postgresql from Debian's packages for the store tests" >&2
    apt-get update -qq > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql > /dev/null
else
    echo "warning: no PostgreSQL server found; install it (apt-get install postgresql) to run the Postgres store tests" >&2
fi
