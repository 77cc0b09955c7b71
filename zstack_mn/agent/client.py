"""HTTP client of the hypervisor agent. Every request has a deadline; every failure becomes a
ZStackError with an AGENT_* code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from zstack_mn.agent.protocol import HostFacts, OpState, VmList, VmOp, VmStatus
from zstack_mn.messages import ErrorCode, ZStackError

T = TypeVar("T", bound=BaseModel)
NODE_HEADER = "X-ZStack-Node"


class AgentClient:
    """One pooled HTTP client for every agent this node talks to."""

    def __init__(
        self,
        timeout: float,
        node_uuid: str = "",
        fenced: Callable[[], bool] | None = None,
        max_connections: int = 1_000,
        pool_timeout: float | None = None,
    ) -> None:
        """``fenced``: asked again just before each VM operation leaves this process, so that a
        node frozen since its last check sends nothing once it wakes fenced. ``max_connections``
        bounds the agent requests in flight at once (all kept alive: an operation that waits on
        its agent keeps its connection); a request waits for a free one up to ``pool_timeout``
        (default ``timeout``)."""
        self.timeout = timeout
        self.fenced = fenced
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, pool=timeout if pool_timeout is None else pool_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={NODE_HEADER: node_uuid} if node_uuid else None,
            event_hooks={"request": [self._last_check]},
        )

    async def _last_check(self, request: httpx.Request) -> None:
        if request.method == "POST" and "/vms/" in request.url.path and self.fenced is not None and self.fenced():
            raise ZStackError(ErrorCode.NODE_FENCED, "this node is fenced; the VM operation was not sent")

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, model: type[T], body: BaseModel | None = None) -> T:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            resp = await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise ZStackError(ErrorCode.AGENT_TIMEOUT, f"agent {url} did not answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise ZStackError(ErrorCode.AGENT_UNREACHABLE, f"agent {url} unreachable: {type(exc).__name__}") from None
        if resp.status_code == 503:
            raise ZStackError(ErrorCode.AGENT_UNREACHABLE, f"agent {url} is down")
        if resp.status_code >= 400:
            detail = _detail(resp)
            raise ZStackError(ErrorCode.AGENT_ERROR, f"agent error {resp.status_code}: {detail}", status=resp.status_code)
        try:
            return model.model_validate_json(resp.content)
        except ValidationError:
            raise ZStackError(ErrorCode.AGENT_ERROR, f"agent {url} sent an unreadable answer") from None

    async def connect(self, agent_url: str) -> HostFacts:
        return await self._request("POST", f"{agent_url}/connect", HostFacts)

    async def ping(self, agent_url: str) -> None:
        try:
            resp = await self._http.get(f"{agent_url}/ping")
        except httpx.TimeoutException:
            raise ZStackError(ErrorCode.AGENT_TIMEOUT, f"agent {agent_url} ping timed out") from None
        except httpx.HTTPError as exc:
            raise ZStackError(ErrorCode.AGENT_UNREACHABLE, f"agent {agent_url} unreachable: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise ZStackError(ErrorCode.AGENT_UNREACHABLE, f"agent {agent_url} ping answered {resp.status_code}")

    async def vm_op(self, agent_url: str, vm_uuid: str, op: str, req: VmOp) -> VmStatus:
        return await self._request("POST", f"{agent_url}/vms/{vm_uuid}/{op}", VmStatus, req)

    async def op_state(self, agent_url: str, op_id: str) -> str:
        """``applied``, ``in_flight`` or ``unknown`` (see ``OpState``)."""
        return (await self._request("GET", f"{agent_url}/ops/{op_id}", OpState)).state

    async def list_vms(self, agent_url: str) -> VmList:
        return await self._request("GET", f"{agent_url}/vms", VmList)


def _detail(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        return str(data.get("detail", data))
    except ValueError:
        return resp.text[:200]
