"""The Python client's transport over ZStack's own REST API (``/zstack/v1``): the project's API
messages go out as the ZStack calls the server's catalog names, the way ZStack's SDK sends them
(a login first, ``Authorization: OAuth <session>``, ``X-Job-UUID``, asynchronous calls polled at
their ``location``), and the answers come back in the client's usual shape (``{"inventory"}``,
``{"inventories", "total"}``; uuids in ZStack's 32-hex form).

    async with Client.zstack(["http://10.0.0.1:8080", "http://10.0.0.2:8080"], password="...") as c:
        vm = await c.create_vm("web1", cpu_num=1, memory_size="1G")

Fail-over: a node that does not answer is left for the next URL, and the call is sent again
with the same ``X-Job-UUID`` (the server runs one job per uuid), so a retry is applied once; a
poll goes on at whichever node answers. A session that expired is renewed by one new login.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from typing import Any

import httpx

from zstack_mn.client import ApiTransport, SessionLogin, log_in_by_account, password_digest
from zstack_mn.config import ZSTACK_ADMIN_ACCOUNT, ZSTACK_DEFAULT_PASSWORD
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.messages.api import APIQueryHostMsg, APIQueryManagementNodeMsg, APIQueryVmInstanceMsg
from zstack_mn.web.zstack.catalog import APIS, BY_NAME, To, ZApi, agent_url_of

_JOB_NAMESPACE = uuidlib.UUID("5c0d7a43-8f0e-4b7e-9d2c-1f6a3e9b8c27")
_BY_TARGET: dict[type[Message], ZApi] = {a.target: a for a in APIS if a.target is not None}
_QUERIES: dict[type[Message], tuple[str, tuple[str, ...]]] = {
    APIQueryVmInstanceMsg: ("QueryVmInstance", ("uuid", "name", "state", "hostUuid")),
    APIQueryHostMsg: ("QueryHost", ("uuid", "name", "state", "status")),
    APIQueryManagementNodeMsg: ("QueryManagementNode", ("uuid",)),
}
UUID_FIELDS = frozenset({"uuid", "hostUuid", "vmInstanceUuid", "resourceUuid"})


def _hex(value: Any) -> Any:
    return value.replace("-", "") if isinstance(value, str) else value


def zstack_params(api: ZApi, msg: Message) -> dict[str, Any]:
    """The ZStack parameters of a project API message: each field under the ZStack name whose
    rule copies it (``uuid`` → ``resourceUuid`` for a create), uuids in 32-hex form."""
    ours = msg.to_wire()
    names = {
        rule.name: key for key, rule in api.fields.items() if isinstance(rule, To) and rule.convert is not agent_url_of
    }
    params = {}
    for name, value in ours.items():
        key = names.get(name)
        if key is None:
            raise ZStackError(ErrorCode.NO_HANDLER, f"{msg.type_name}.{name} has no ZStack field in {api.name}")
        params[key] = _hex(value) if key in UUID_FIELDS else value
    return params


def job_uuid_for(key: str | None) -> str:
    """The ``X-Job-UUID`` of a call: derived from the idempotency key, so a retry is one job."""
    return uuidlib.uuid5(_JOB_NAMESPACE, key).hex if key else uuidlib.uuid4().hex


def _error_of(resp: httpx.Response) -> ZStackError:
    try:
        info = resp.json()["error"]
        return ZStackError(ErrorCode.parse(info["code"]), str(info["description"]), **(info.get("opaque") or {}))
    except (ValueError, KeyError, TypeError):
        code = ErrorCode.BUS_UNAVAILABLE if resp.status_code >= 500 else ErrorCode.INTERNAL_ERROR
        return ZStackError(code, f"HTTP {resp.status_code}: {resp.text[:200]}", status=resp.status_code)


class ZStackTransport(ApiTransport):
    def __init__(
        self,
        urls: list[str],
        *,
        account: str = ZSTACK_ADMIN_ACCOUNT,
        password: str = ZSTACK_DEFAULT_PASSWORD,
        polling_interval: float = 0.05,
    ) -> None:
        if not urls:
            raise ValueError("at least one node URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.account = account
        self._digest = password_digest(password)
        self.polling_interval = polling_interval
        self.auth = SessionLogin(self._log_in)
        self.last_handled_by: str | None = None
        self._next = 0
        self._http = httpx.AsyncClient(timeout=30)

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, msg: Message, *, key: str | None, timeout: float) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        return await self.auth.call(deadline, lambda session: self._send(msg, key, session, deadline))

    async def _send(self, msg: Message, key: str | None, session: str, deadline: float) -> dict[str, Any]:
        if type(msg) in _QUERIES:
            return await self._query(msg, session, deadline)
        api = _BY_TARGET.get(type(msg))
        if api is None:
            raise ZStackError(ErrorCode.NO_HANDLER, f"{msg.type_name} has no ZStack API")
        params = zstack_params(api, msg)
        path = api.path
        for var in api.path_vars():
            path = path.replace("{" + var + "}", str(params.pop(var)))
        headers = {"X-Job-UUID": job_uuid_for(key)}
        if api.body_key is None:
            resp = await self._request(api.method, path, deadline, session, params=params, headers=headers)
        else:
            resp = await self._request(
                api.method, path, deadline, session, json={api.body_key: params}, headers=headers
            )
        if resp.status_code == 202:
            return await self._poll(str(resp.json()["location"]), session, deadline)
        return self._body(resp)

    async def login(self, timeout: float = 30.0) -> str:
        """The current session (logging in if there is none), e.g. for ``Client.amqp(..., session=...)``."""
        return await self.auth.login(timeout)

    async def _log_in(self, deadline: float) -> str:
        login, body = log_in_by_account(self.account, self._digest)
        resp = await self._request(login.method, login.path, deadline, None, json=body)
        return str(self._body(resp)["inventory"]["uuid"])

    async def _query(self, msg: Message, session: str, deadline: float) -> dict[str, Any]:
        name, fields = _QUERIES[type(msg)]
        wire = msg.to_wire()
        params: list[tuple[str, str]] = [
            ("q", f"{f}={_hex(wire[f]) if f in UUID_FIELDS else wire[f]}") for f in fields if wire.get(f) is not None
        ]
        params += [("limit", str(wire["limit"])), ("start", str(wire["start"])), ("replyWithCount", "true")]
        return self._body(await self._request("GET", BY_NAME[name].path, deadline, session, params=params))

    async def _poll(self, location: str, session: str, deadline: float) -> dict[str, Any]:
        """Poll a job at its location, on whichever node answers."""
        path = location[location.index("/zstack/v1") + len("/zstack/v1") :]
        while True:
            resp = await self._request("GET", path, deadline, session)
            if resp.status_code != 202:
                return self._body(resp)
            if asyncio.get_running_loop().time() + self.polling_interval > deadline:
                raise ZStackError(ErrorCode.TIMEOUT, f"job {location} did not finish in time")
            await asyncio.sleep(self.polling_interval)

    def _body(self, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            raise _error_of(resp)
        data: dict[str, Any] = resp.json() if resp.content else {}
        return data

    async def _request(self, method: str, path: str, deadline: float, session: str | None, **kw: Any) -> httpx.Response:
        """One request (with ``session``, unless None), moving to the next URL when a node does
        not answer, until ``deadline``."""
        headers = dict(kw.pop("headers", None) or {})
        if session is not None:
            headers["Authorization"] = f"OAuth {session}"
        last: Exception | None = None
        delay = 0.05
        loop = asyncio.get_running_loop()
        for attempt in range(4 * len(self.urls)):
            left = deadline - loop.time()
            if left <= 0:
                break
            url = self.urls[(self._next + attempt) % len(self.urls)]
            try:
                resp = await self._http.request(
                    method, f"{url}/zstack/v1{path}", headers=headers, timeout=min(left, 10.0), **kw
                )
            except httpx.HTTPError as exc:
                last = exc
                await asyncio.sleep(min(delay, max(deadline - loop.time(), 0)))
                delay = min(delay * 2, 1.0)
                continue
            self._next = (self._next + attempt) % len(self.urls)
            self.last_handled_by = url
            return resp
        raise ZStackError(ErrorCode.BUS_UNAVAILABLE, f"no node answered: {type(last).__name__ if last else 'timeout'}")
