"""A ZStack-style client for the tests, written from ZStack's own client sources, not from this
project's server code:

* ``RestClient`` follows the Java SDK's ``ZSClient.Api`` (zstackio/zstack,
  ``sdk/src/main/java/org/zstack/sdk/ZSClient.java``): an ``X-Job-UUID`` of 32 hex characters on
  every call; ``Authorization: OAuth <session>``; queries as ``GET`` with repeated ``q``; GET and
  DELETE parameters in the query string, others in ``{<parameterName>: params}``; a non-2xx
  answer is an ``HTTP_ERROR`` carrying the body; 200 is the result; 202 is polled at its
  ``location`` until 200 (result) or 503 (``{"error"}``), within a polling timeout.
  ``REST_INFO`` is the ``getRestInfo()`` of each SDK action class used here.
* ``RpcClient`` follows zstack-utility's ``apibinding/apibinding/api.py``: ``POST /zstack/api/``
  with ``{<message class>: message}``, the session as ``{"session": {"uuid"}}``, the reply in
  ``result`` (a JSON string) when ``state`` is ``Done``, else polled at ``/zstack/api/result/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx


def sha512(password: str) -> str:
    """ZStack clients send the password's SHA-512 hex digest (apibinding's INITIAL_SYSTEM_ADMIN_PASSWORD)."""
    return hashlib.sha512(password.encode()).hexdigest()


@dataclass(frozen=True)
class RestInfo:
    http_method: str
    path: str
    parameter_name: str
    need_session: bool
    need_poll: bool
    query: bool = False


REST_INFO: dict[str, RestInfo] = {
    "LogInByAccount": RestInfo("PUT", "/accounts/login", "logInByAccount", False, False),
    "LogOut": RestInfo("DELETE", "/accounts/sessions/{sessionUuid}", "", False, False),
    "ValidateSession": RestInfo("GET", "/accounts/sessions/{sessionUuid}/valid", "", False, False),
    "CreateVmInstance": RestInfo("POST", "/vm-instances", "params", True, True),
    "StartVmInstance": RestInfo("PUT", "/vm-instances/{uuid}/actions", "startVmInstance", True, True),
    "StopVmInstance": RestInfo("PUT", "/vm-instances/{uuid}/actions", "stopVmInstance", True, True),
    "RebootVmInstance": RestInfo("PUT", "/vm-instances/{uuid}/actions", "rebootVmInstance", True, True),
    "DestroyVmInstance": RestInfo("DELETE", "/vm-instances/{uuid}", "", True, True),
    "MigrateVm": RestInfo("PUT", "/vm-instances/{vmInstanceUuid}/actions", "migrateVm", True, True),
    "QueryVmInstance": RestInfo("GET", "/vm-instances", "", True, False, query=True),
    "AddKVMHost": RestInfo("POST", "/hosts/kvm", "params", True, True),
    "ChangeHostState": RestInfo("PUT", "/hosts/{uuid}/actions", "changeHostState", True, True),
    "ReconnectHost": RestInfo("PUT", "/hosts/{uuid}/actions", "reconnectHost", True, True),
    "DeleteHost": RestInfo("DELETE", "/hosts/{uuid}", "", True, True),
    "QueryHost": RestInfo("GET", "/hosts", "", True, False, query=True),
    "QueryManagementNode": RestInfo("GET", "/management-nodes", "", True, False, query=True),
    "QueryImage": RestInfo("GET", "/images", "", True, False, query=True),
    "QueryL3Network": RestInfo("GET", "/l3-networks", "", True, False, query=True),
}

RPC_CLASS: dict[str, str] = {
    "LogInByAccount": "org.zstack.header.identity.APILogInByAccountMsg",
    "LogOut": "org.zstack.header.identity.APILogOutMsg",
    "ValidateSession": "org.zstack.header.identity.APIValidateSessionMsg",
    "CreateVmInstance": "org.zstack.header.vm.APICreateVmInstanceMsg",
    "StartVmInstance": "org.zstack.header.vm.APIStartVmInstanceMsg",
    "StopVmInstance": "org.zstack.header.vm.APIStopVmInstanceMsg",
    "RebootVmInstance": "org.zstack.header.vm.APIRebootVmInstanceMsg",
    "DestroyVmInstance": "org.zstack.header.vm.APIDestroyVmInstanceMsg",
    "MigrateVm": "org.zstack.header.vm.APIMigrateVmMsg",
    "QueryVmInstance": "org.zstack.header.vm.APIQueryVmInstanceMsg",
    "AddKVMHost": "org.zstack.kvm.APIAddKVMHostMsg",
    "ChangeHostState": "org.zstack.header.host.APIChangeHostStateMsg",
    "QueryHost": "org.zstack.header.host.APIQueryHostMsg",
    "QueryManagementNode": "org.zstack.header.managementnode.APIQueryManagementNodeMsg",
    "QueryImage": "org.zstack.header.image.APIQueryImageMsg",
    "QueryL3Network": "org.zstack.header.network.l3.APIQueryL3NetworkMsg",
}

REQUIRED: dict[str, dict[str, str]] = {
    "CreateVmInstance": {"name": "required", "imageUuid": "required", "l3NetworkUuids": "nonempty"},
}
"""``@Param(required = true)`` / ``nonempty = true`` of the SDK action classes
(``CreateVmInstanceAction.java``), checked before a call as ``AbstractAction.checkParameters``."""

HTTP_ERROR = "HTTP_ERROR"
POLLING_TIMEOUT_ERROR = "POLLING_TIMEOUT"


def check_parameters(name: str, params: dict[str, Any]) -> None:
    for field_name, rule in REQUIRED.get(name, {}).items():
        value = params.get(field_name)
        if value is None:
            raise ValueError(f"missing mandatory field[{field_name}]")
        if rule == "nonempty" and not value:
            raise ValueError(f"field[{field_name}] cannot be empty")


@dataclass
class ApiResult:
    """The SDK's ``ApiResult``: an error, or the result; ``polls``: how many polls it took."""

    error: dict[str, Any] | None = None
    value: dict[str, Any] | None = None
    polls: int = 0

    def unwrap(self) -> dict[str, Any]:
        if self.error is not None:
            raise AssertionError(f"API error: {self.error}")
        assert self.value is not None
        return self.value


class RestClient:
    def __init__(self, base_url: str, polling_interval: float = 0.05, polling_timeout: float = 60.0) -> None:
        self.base = base_url.rstrip("/") + "/zstack"
        self.http = httpx.AsyncClient(timeout=30)
        self.interval = polling_interval
        self.polling_timeout = polling_timeout
        self.session_id: str | None = None

    async def close(self) -> None:
        await self.http.aclose()

    async def login(self, account: str = "admin", password: str = "password") -> str:
        res = await self.call("LogInByAccount", accountName=account, password=sha512(password))
        self.session_id = res.unwrap()["inventory"]["uuid"]
        return self.session_id

    async def query(self, name: str, conditions: list[str] | None = None, /, **extra: Any) -> ApiResult:
        """A ``QueryAction``: conditions as ``q``, then limit, start, count, replyWithCount, sort, fields."""
        info = REST_INFO[name]
        params: list[tuple[str, str | int | float | bool | None]] = [("q", c) for c in conditions or []]
        for key in ("limit", "start", "count", "replyWithCount"):
            if key in extra:
                params.append((key, str(extra[key]).lower() if isinstance(extra[key], bool) else str(extra[key])))
        if "sortBy" in extra:
            direction = "+" if extra.get("sortDirection", "asc") == "asc" else "-"
            params.append(("sort", f"{direction}{extra['sortBy']}"))
        if "fields" in extra:
            params.append(("fields", ",".join(extra["fields"])))
        headers = self._headers(info, extra.get("sessionId"))
        resp = await self.http.get(f"{self.base}/v1{info.path}", params=params, headers=headers)
        return await self._result(resp, info)

    async def call(self, name: str, /, *, job_uuid: str | None = None, **params: Any) -> ApiResult:
        """A non-query action: path variables from the parameters, the rest in the body or the
        query string; an asynchronous one is polled to its end."""
        return await self._result(await self.send(name, job_uuid=job_uuid, **params), REST_INFO[name])

    async def send(self, name: str, /, *, job_uuid: str | None = None, **params: Any) -> httpx.Response:
        """The first answer to an action, not polled."""
        check_parameters(name, params)
        info = REST_INFO[name]
        session = params.pop("sessionId", self.session_id)
        var_names = re.findall(r"\{(.+?)\}", info.path)
        path = info.path
        for v in var_names:
            if params.get(v) is None:
                raise ValueError(f"missing required field[{v}]")
            path = path.replace("{" + v + "}", str(params.pop(v)))
        url = f"{self.base}/v1{path}"
        headers = self._headers(info, session, job_uuid)
        body = {k: v for k, v in params.items() if v is not None}
        if info.http_method in ("GET", "DELETE"):
            return await self.http.request(info.http_method, url, params=body, headers=headers)
        return await self.http.request(info.http_method, url, json={info.parameter_name: body}, headers=headers)

    def _headers(self, info: RestInfo, session: str | None, job_uuid: str | None = None) -> dict[str, str]:
        headers = {"X-Job-UUID": job_uuid or uuid.uuid4().hex}
        if info.need_session:
            headers["Authorization"] = f"OAuth {session or self.session_id}"
        return headers

    async def _result(self, resp: httpx.Response, info: RestInfo) -> ApiResult:
        if not 200 <= resp.status_code < 300:
            return ApiResult(error={"code": HTTP_ERROR, "status": resp.status_code, "details": resp.text})
        if resp.status_code in (200, 204):
            return ApiResult(value=resp.json() if resp.content else {})
        assert resp.status_code == 202, resp.status_code
        assert info.need_poll, "a 202 for an API that is not asynchronous"
        location = resp.json()["location"]
        return await self.poll(location)

    async def poll(self, url: str) -> ApiResult:
        deadline = time.monotonic() + self.polling_timeout
        polls = 0
        while time.monotonic() < deadline:
            resp = await self.http.get(url, headers={"Authorization": f"OAuth {self.session_id}"})
            polls += 1
            if resp.status_code == 200:
                return ApiResult(value=resp.json() if resp.content else {}, polls=polls)
            if resp.status_code == 503:
                return ApiResult(error=resp.json()["error"], polls=polls)
            if resp.status_code != 202:
                return ApiResult(error={"code": HTTP_ERROR, "status": resp.status_code, "details": resp.text})
            await asyncio.sleep(self.interval)
        return ApiResult(error={"code": POLLING_TIMEOUT_ERROR, "details": url}, polls=polls)


class RpcClient:
    """apibinding's ``Api``: ``sync_call`` and ``async_call_wait_for_complete``."""

    def __init__(self, base_url: str, polling_interval: float = 0.05, polling_timeout: float = 60.0) -> None:
        # as apibinding builds them: zstacklib's ``http.build_url`` ends every URL with a slash
        self.api_url = base_url.rstrip("/") + "/zstack/api/"
        self.result_url = base_url.rstrip("/") + "/zstack/api/result/"
        self.http = httpx.AsyncClient(timeout=30)
        self.interval = polling_interval
        self.polling_timeout = polling_timeout
        self.session_uuid: str | None = None

    async def close(self) -> None:
        await self.http.aclose()

    async def login(self, account: str = "admin", password: str = "password") -> str:
        _, reply = await self.sync_call("LogInByAccount", accountName=account, password=sha512(password))
        assert reply["success"], reply
        self.session_uuid = reply["inventory"]["uuid"]
        return self.session_uuid

    def _message(self, name: str, fields: dict[str, Any], /) -> dict[str, Any]:
        msg = dict(fields)
        if self.session_uuid and name not in ("LogInByAccount", "LogOut", "ValidateSession"):
            msg.setdefault("session", {"uuid": self.session_uuid})
        return {RPC_CLASS[name]: msg}

    async def sync_call(self, name: str, /, **fields: Any) -> tuple[str, dict[str, Any]]:
        rsp = (await self.http.post(self.api_url, content=json.dumps(self._message(name, fields)))).json()
        ((reply_name, reply),) = json.loads(rsp["result"]).items()
        return reply_name, reply

    async def async_call(self, name: str, /, **fields: Any) -> tuple[str, dict[str, Any], int]:
        """(reply class, reply, polls)."""
        check_parameters(name, fields)
        rsp = (await self.http.post(self.api_url, content=json.dumps(self._message(name, fields)))).json()
        polls = 0
        deadline = time.monotonic() + self.polling_timeout
        while rsp["state"] != "Done":
            if time.monotonic() > deadline:
                raise TimeoutError(f"API call[{name}] timeout")
            await asyncio.sleep(self.interval)
            rsp = (await self.http.get(self.result_url + rsp["uuid"])).json()
            polls += 1
        ((reply_name, reply),) = json.loads(rsp["result"]).items()
        return reply_name, reply, polls
