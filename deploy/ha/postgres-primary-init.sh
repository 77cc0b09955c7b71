#!/bin/sh
# Run once by the postgres image on a fresh data directory (/docker-entrypoint-initdb.d/, with a
# server listening on its unix socket only): makes this server a primary that the standby can copy
# and stream from, and that returns a commit only once the standby has written it.
#   REPLICATION_USER / REPLICATION_PASSWORD   the role pg_basebackup and the standby log in as
#   SYNCHRONOUS_STANDBY                       the standby's application_name
# Sourced or executed (the image does either), so it never calls `exit`.
set -eu
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  --set=role="$REPLICATION_USER" --set=password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"role" WITH REPLICATION LOGIN PASSWORD :'password';
SQL
echo "host replication $REPLICATION_USER all scram-sha-256" >>"$PGDATA/pg_hba.conf"
cat >>"$PGDATA/postgresql.conf" <<CONF
# docker-compose.ha.yml: a commit returns once the standby has it (synchronous_commit = on, the
# default), so a fail-over to the standby loses nothing acknowledged.
synchronous_standby_names = '$SYNCHRONOUS_STANDBY'
# WAL the standby has not fetched yet survives a short absence of the standby.
wal_keep_size = '128MB'
CONF
echo "postgres-primary-init: replication role $REPLICATION_USER, synchronous standby $SYNCHRONOUS_STANDBY"
