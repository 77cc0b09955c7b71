#!/bin/sh
# The official image's interface: a fresh PGDATA is initialised with POSTGRES_USER (default
# postgres, a superuser) and POSTGRES_PASSWORD (required), and POSTGRES_DB (default the user's
# name) is created; then the server runs as `postgres`, listening on all interfaces.
set -eu
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
if [ "${1:-}" = postgres ]; then
  shift
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
      echo "standin-entrypoint: POSTGRES_PASSWORD is not set; a fresh database needs it" >&2
      exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$db" != postgres ]; then
      # Single-user mode: no server is listening until the database exists, so a health check
      # cannot pass early.
      printf 'CREATE DATABASE "%s"\n' "$db" | as_postgres postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "standin-entrypoint: initialised $PGDATA (user $user, database $db)"
  fi
  exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
fi
exec "$@"
