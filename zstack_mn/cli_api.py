"""`zstack-mn api`: parse ``key=value`` arguments into an API message and call it over HTTP:
ZStack's REST API by default (``/zstack/v1``, with a login), the plain ``/v1`` API with ``--plain``."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from zstack_mn.client import ApiTransport, HttpTransport
from zstack_mn.config import ZSTACK_ADMIN_ACCOUNT, ZSTACK_DEFAULT_PASSWORD
from zstack_mn.messages import Message, ZStackError
from zstack_mn.messages.api import ALL_APIS
from zstack_mn.messages.envelope import validation_error
from zstack_mn.zstack_client import ZStackTransport

APIS: dict[str, type[Message]] = {a.type_name: a for a in ALL_APIS}


def resolve(name: str) -> type[Message]:
    for candidate in (name, f"API{name}Msg", f"API{name}"):
        if candidate in APIS:
            return APIS[candidate]
    known = ", ".join(sorted(a[3:-3] for a in APIS))
    raise ValueError(f"unknown API {name!r}; known: {known}")


def parse_call(name: str, args: list[str]) -> Message:
    api = resolve(name)
    data: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {arg!r} is not key=value")
        data[key] = _value(value)
    try:
        return api.model_validate(data)
    except ValidationError as exc:
        raise ValueError(validation_error(exc, api.type_name).description) from None


def _value(text: str) -> Any:
    if text[:1] in "[{" or text in ("true", "false", "null"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    if text.isdigit():
        return int(text)
    return text


def describe_apis() -> str:
    lines = []
    for name in sorted(APIS):
        api = APIS[name]
        fields = []
        for fname, field in api.model_fields.items():
            alias = field.alias or fname
            fields.append(alias if field.is_required() else f"[{alias}]")
        lines.append(f"{name[3:-3]:24} {' '.join(fields)}")
    return "\n".join(lines)


async def run_call(
    msg: Message,
    urls: list[str],
    timeout: float,
    *,
    plain: bool = False,
    account: str = ZSTACK_ADMIN_ACCOUNT,
    password: str = ZSTACK_DEFAULT_PASSWORD,
) -> tuple[bool, Any]:
    """Call over ZStack's REST API (log in, poll the job), or the plain ``/v1`` API with ``plain``."""
    transport: ApiTransport
    if plain:
        transport = HttpTransport(urls, account=account, password=password)
    else:
        transport = ZStackTransport(urls, account=account, password=password)
    try:
        return True, await transport.send(msg, key=None, timeout=timeout)
    except ZStackError as exc:
        return False, {"error": exc.to_info().model_dump()}
    finally:
        await transport.close()
