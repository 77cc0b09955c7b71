"""Names every layer shares: the API service and the event topics. Queue and exchange names,
which only the bus needs, derive from these in ``zstack_mn.bus.topology``."""

from __future__ import annotations

API_SERVICE = "api"

TOPIC_NODE_JOINED = "node.joined"
TOPIC_NODE_LEFT = "node.left"
TOPIC_NODE_ALL = "node.#"
TOPIC_VM_STATE_CHANGED = "vm.state.changed"
TOPIC_HOST_STATUS_CHANGED = "host.status.changed"
