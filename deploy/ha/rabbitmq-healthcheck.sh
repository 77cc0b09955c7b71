#!/bin/sh
# Health check of a member of the compose HA stack's RabbitMQ cluster: healthy once this member
# runs the broker and every member named in the peer discovery list (conf.d) belongs to its
# cluster. A member that booted but formed a cluster of its own, or has not joined yet, is not
# healthy, so the management nodes (which wait for every member) declare their quorum queues only
# once the queues can have a replica on each of the three members. One CLI call: each costs an
# Erlang VM start.
set -eu
status=$(rabbitmq-diagnostics -q cluster_status --formatter json)
running=$(printf '%s' "$status" | grep -o '"running_nodes":\[[^]]*\]')
members=$(printf '%s' "$status" | grep -o '"disk_nodes":\[[^]]*\]')
printf '%s' "$running" | grep -q "\"rabbit@$(hostname)\"" || {
  echo "rabbit@$(hostname) is not running"
  exit 1
}
for node in $(sed -n 's/^[[:space:]]*cluster_formation\.classic_config\.nodes\.[0-9]*[[:space:]]*=[[:space:]]*//p' \
  /etc/rabbitmq/conf.d/*.conf); do
  printf '%s' "$members" | grep -q "\"$node\"" || {
    echo "$node is not a member of this cluster yet"
    exit 1
  }
done
