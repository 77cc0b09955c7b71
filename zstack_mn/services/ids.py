"""Deterministic resource uuids: a creational request's resource uuid derives from its message id,
so a redelivered or retried request (same id) finds the resource it already made."""

from __future__ import annotations

import uuid

NAMESPACE = uuid.UUID("6a5f0b8e-3f0e-4c1e-9c55-7a2d0c9e1f42")


def resource_uuid_for(message_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, message_id))
