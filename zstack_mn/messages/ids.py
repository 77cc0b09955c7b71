"""Ids every node derives the same way: a request's message id from a client's idempotency key,
and a created resource's uuid from the id of the request that created it. A retried or
redelivered request (same id) therefore meets, on one node, the resource it already made.

    request_id_for_key("my-key")           # the same id on every node
    resource_uuid_for(request_id)          # the uuid a create with that id gives its resource
"""

from __future__ import annotations

import uuid

IDEMPOTENCY_HEADER = "idempotencyKey"
"""The request header (HTTP) and envelope header (bus) that carries a client's idempotency key."""
SESSION_HEADER = "session"
"""The envelope header that carries a ZStack API session to ``api.portal`` (checked by
``zstack_mn.web.zstack.sessions.guarded``)."""

_IDEMPOTENCY_NAMESPACE = uuid.UUID("0b6f3c52-9a51-4d7e-a3f1-52c8b8e0d7a1")
_RESOURCE_NAMESPACE = uuid.UUID("6a5f0b8e-3f0e-4c1e-9c55-7a2d0c9e1f42")


def request_id_for_key(key: str) -> str:
    """The message id every node derives from a client's idempotency key."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, key))


def resource_uuid_for(message_id: str) -> str:
    """The uuid of the resource a creational request with ``message_id`` creates."""
    return str(uuid.uuid5(_RESOURCE_NAMESPACE, message_id))
