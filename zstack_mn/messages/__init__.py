"""Message models, the envelope and error codes."""

from zstack_mn.messages.base import Event, Message, ResourceUuid, WireModel, registry
from zstack_mn.messages.envelope import Envelope, decode, encode, new_id
from zstack_mn.messages.errors import ErrorCode, ErrorInfo, ZStackError

__all__ = [
    "Envelope",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "Message",
    "ResourceUuid",
    "WireModel",
    "ZStackError",
    "decode",
    "encode",
    "new_id",
    "registry",
]
