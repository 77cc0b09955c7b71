#!/bin/sh
# The official image's interface: RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS create the first
# user of a fresh data directory (default guest / guest); RABBITMQ_ERLANG_COOKIE becomes the
# Erlang cookie of a data directory that has none; more configuration is read from
# /etc/rabbitmq/conf.d/*.conf (Debian's 3.10 reads that directory itself); the node is
# rabbit@<hostname> (the server's default, as in the official image); the server runs as `rabbitmq`.
set -eu
cat >/etc/rabbitmq/rabbitmq.conf <<CONF
listeners.tcp.default = 5672
management.tcp.port = 15672
loopback_users = none
default_user = ${RABBITMQ_DEFAULT_USER:-guest}
default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}
CONF
cookie=/var/lib/rabbitmq/.erlang.cookie
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
  if [ ! -e "$cookie" ]; then
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$cookie"
  elif [ "$(cat "$cookie")" != "$RABBITMQ_ERLANG_COOKIE" ]; then
    echo "standin-entrypoint: warning: $cookie does not match RABBITMQ_ERLANG_COOKIE" >&2
  fi
fi
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
[ ! -e "$cookie" ] || chmod 600 "$cookie"
if [ "${1:-}" = rabbitmq-server ]; then
  shift
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
