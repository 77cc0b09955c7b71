#!/bin/sh
# Entrypoint of the compose HA stack's PostgreSQL standby, run as user postgres. On an empty data
# directory it copies the primary with `pg_basebackup -R -X stream` (retrying, a bounded number of
# times, until the primary answers), then runs postgres as a streaming standby. Its arguments are
# passed to postgres.
#   PRIMARY_HOST                              the primary's address (port 5432)
#   REPLICATION_USER / REPLICATION_PASSWORD   the replication role the primary's init made
#   STANDBY_NAME                              application_name, as the primary's
#                                             synchronous_standby_names names it
# Once promoted (pg_ctl promote) it runs as a primary alone: it waits for no standby, since the
# synchronous_standby_names copied from the primary is overridden by the arguments the compose
# file passes.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
attempts=90
delay=2

copy_primary() {
  pg_basebackup --pgdata="$PGDATA" --write-recovery-conf --wal-method=stream --checkpoint=fast \
    --dbname="host=$PRIMARY_HOST port=5432 user=$REPLICATION_USER password=$REPLICATION_PASSWORD application_name=$STANDBY_NAME connect_timeout=5"
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA"
  n=1
  until copy_primary; do
    if [ "$n" -ge "$attempts" ]; then
      echo "postgres-standby: no base backup from $PRIMARY_HOST after $attempts attempts" >&2
      exit 1
    fi
    echo "postgres-standby: $PRIMARY_HOST not ready (attempt $n of $attempts), retrying in ${delay}s" >&2
    find "$PGDATA" -mindepth 1 -delete
    n=$((n + 1))
    sleep "$delay"
  done
  echo "postgres-standby: copied $PRIMARY_HOST into $PGDATA"
fi
exec postgres -D "$PGDATA" "$@"
