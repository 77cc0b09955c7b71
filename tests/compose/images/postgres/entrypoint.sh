#!/bin/sh
# The official image's interface. Started as root, it makes the data and socket directories
# postgres's and runs again as postgres (a compose `user: postgres` starts it there directly).
# A fresh PGDATA is initialised with POSTGRES_USER (default postgres, a superuser) and
# POSTGRES_PASSWORD (required), POSTGRES_DB (default the user's name) is created, and the files of
# /docker-entrypoint-initdb.d/ run in name order (*.sh executed, or sourced when not executable;
# *.sql through psql), all against a temporary server listening only on a unix socket of its own,
# so that neither a client nor `pg_isready` reaches the database before it is ready. Then the
# server runs, listening on all interfaces with password (SCRAM) logins.
set -eu
self=/usr/local/bin/standin-entrypoint
initdb_d=/docker-entrypoint-initdb.d

initialise() {
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "standin-entrypoint: POSTGRES_PASSWORD is not set; a fresh database needs it" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  sockets=$(mktemp -d)
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories='$sockets'" start
  export PGHOST="$sockets"
  if [ "$db" != postgres ]; then
    echo 'CREATE DATABASE :"db";' |
      psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$user" --dbname postgres --set=db="$db" >/dev/null
  fi
  run_init_files "$user" "$db"
  pg_ctl -D "$PGDATA" -m fast -w stop
  unset PGHOST
  rmdir "$sockets"
  echo "standin-entrypoint: initialised $PGDATA (user $user, database $db)"
}

run_init_files() {
  for f in "$initdb_d"/*; do
    case $f in
      *.sh)
        echo "standin-entrypoint: running $f"
        if [ -x "$f" ]; then "$f"; else . "$f"; fi
        ;;
      *.sql)
        echo "standin-entrypoint: running $f"
        psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$1" --dbname "$2" -f "$f" >/dev/null
        ;;
      "$initdb_d/*") ;;
      *) echo "standin-entrypoint: ignoring $f" ;;
    esac
  done
}

if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$self" "$@"
fi
if [ "${1:-}" = postgres ]; then
  shift
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    chmod 700 "$PGDATA"
    initialise
  fi
  exec postgres -D "$PGDATA" "$@"
fi
exec "$@"
