"""The Python client: the same methods over HTTP (one or several node URLs, failing over) or over
AMQP (publishes to ``api.portal``, waits on its own reply queue). Errors raise ZStackError with
the code. Every way in needs a ZStack API session: the HTTP transports log in with an account
and password (ZStack's defaults, ``admin``/``password``, unless given); an AMQP client is given a
session from an HTTP client's ``login()`` (the broker has no login); when that session ends
(``session_timeout``, two hours by default) its calls fail with INVALID_SESSION until it is given
a new one (``client.transport.session = ...``).

    async with Client.http(["http://10.0.0.1:8080", "http://10.0.0.2:8080"], password="...") as c:
        vm = await c.create_vm("web1", cpu_num=1, memory_size="1G")
        await c.stop_vm(vm["uuid"])
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import orjson

from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import Delivery, QueueKind
from zstack_mn.config import ZSTACK_ADMIN_ACCOUNT, ZSTACK_DEFAULT_PASSWORD
from zstack_mn.messages import (
    Envelope,
    ErrorCode,
    ErrorInfo,
    Message,
    ZStackError,
    decode,
    encode,
    new_id,
)
from zstack_mn.messages.api import (
    APIAddHostMsg,
    APICreateVmInstanceMsg,
    APIDeleteHostMsg,
    APIDestroyVmInstanceMsg,
    APIMigrateVmMsg,
    APIQueryHostMsg,
    APIQueryManagementNodeMsg,
    APIQueryVmInstanceMsg,
    APIRebootVmInstanceMsg,
    APIStartVmInstanceMsg,
    APIStopVmInstanceMsg,
)
from zstack_mn.messages.ids import IDEMPOTENCY_HEADER, SESSION_HEADER
from zstack_mn.messages.rest import ACTION_PATHS, JOBS_PATH

if TYPE_CHECKING:
    from zstack_mn.web.zstack.catalog import ZApi

RETRYABLE_HTTP = {500, 502, 503, 504}
JOB_POLL_FIRST_S = 0.05
JOB_POLL_MAX_S = 1.0
SUSPECT_FOR = 15.0

T = TypeVar("T")


def password_digest(password: str) -> str:
    """The password as ZStack's ``LogInByAccount`` takes it: its SHA-512 digest in hex."""
    return hashlib.sha512(password.encode()).hexdigest()


def log_in_by_account(account: str, digest: str) -> tuple[ZApi, dict[str, Any]]:
    """ZStack's ``LogInByAccount``: its catalog entry (method, path) and the request body for
    ``account`` with its password digest. Both HTTP clients log in with it; the session uuid is
    the reply's ``inventory.uuid``."""
    from zstack_mn.web.zstack.catalog import BY_NAME  # late: the catalog builds on this module

    api = BY_NAME["LogInByAccount"]
    assert api.body_key is not None
    return api, {api.body_key: {"accountName": account, "password": digest}}


class SessionLogin:
    """The ZStack session of one HTTP client, shared by its concurrent calls.

    The first call that needs a session starts one login (``log_in(deadline)`` returns the new
    session's uuid, trying until that deadline); every caller waits for that same login, each at
    most until its own deadline. A caller with more time left than a login that failed (not for
    a refused account) starts another under its own deadline, so a short call that began the
    login cannot fail a long one. A call that finds its session expired (``INVALID_SESSION``)
    drops it and is tried once more with a new one."""

    def __init__(self, log_in: Callable[[float], Awaitable[str]]) -> None:
        self._log_in = log_in
        self.session: str | None = None
        self._logging_in: asyncio.Task[str] | None = None
        self._login_deadline = 0.0

    async def call(self, deadline: float, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``attempt(session)``, renewing the session once if the node says it ended."""
        renewed = False
        while True:
            session = await self.current(deadline)
            try:
                return await attempt(session)
            except ZStackError as err:
                if err.code is not ErrorCode.INVALID_SESSION or renewed:
                    raise
                renewed = True
                if self.session == session:
                    self.session = None

    async def login(self, timeout: float) -> str:
        """The current session, logging in if there is none (within ``timeout``)."""
        return await self.current(asyncio.get_running_loop().time() + timeout)

    async def current(self, deadline: float) -> str:
        """The current session; without one, the login under way, or a new one."""
        while self.session is None:
            if self._logging_in is None or self._logging_in.done():
                self._logging_in = asyncio.get_running_loop().create_task(self._logged_in(deadline))
                self._logging_in.add_done_callback(lambda t: t.cancelled() or t.exception())
                self._login_deadline = deadline
            login, login_deadline = self._logging_in, self._login_deadline
            try:
                async with asyncio.timeout_at(deadline):
                    return await asyncio.shield(login)
            except ZStackError as err:
                if err.code is ErrorCode.AUTHENTICATION_ERROR or deadline <= login_deadline:
                    raise
            except TimeoutError:
                failed = login.exception() if login.done() and not login.cancelled() else None
                if isinstance(failed, ZStackError):
                    raise failed from None
                raise ZStackError(ErrorCode.TIMEOUT, "no node let this client log in within its deadline") from None
        return self.session

    async def _logged_in(self, deadline: float) -> str:
        self.session = await self._log_in(deadline)
        return self.session


class ApiTransport(ABC):
    @abstractmethod
    async def send(self, msg: Message, *, key: str | None, timeout: float) -> dict[str, Any]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def login(self, timeout: float = 30.0) -> str:
        """Log in now and return the session uuid (transports that log in override this)."""
        raise ZStackError(ErrorCode.NO_HANDLER, f"{type(self).__name__} does not log in")


def _http_route(msg: Message) -> tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]:
    """(method, path, json body, query) of an API message on the REST gateway."""
    data = msg.to_wire()
    uuid = data.pop("uuid", None)
    t = type(msg)
    if t in ACTION_PATHS:
        kind, action = ACTION_PATHS[t]
        return "PUT", f"/v1/{kind}/{uuid}/actions", {action: data}, None
    if t is APICreateVmInstanceMsg:
        return "POST", "/v1/vm-instances", {"params": {**data, **({"uuid": uuid} if uuid else {})}}, None
    if t is APIAddHostMsg:
        return "POST", "/v1/hosts", {"params": {**data, **({"uuid": uuid} if uuid else {})}}, None
    if t is APIDestroyVmInstanceMsg:
        return "DELETE", f"/v1/vm-instances/{uuid}", None, None
    if t is APIDeleteHostMsg:
        return "DELETE", f"/v1/hosts/{uuid}", None, None
    if t is APIQueryVmInstanceMsg:
        return "GET", "/v1/vm-instances", None, _query_string({**data, **({"uuid": uuid} if uuid else {})})
    if t is APIQueryHostMsg:
        return "GET", "/v1/hosts", None, _query_string({**data, **({"uuid": uuid} if uuid else {})})
    if t is APIQueryManagementNodeMsg:
        return "GET", "/v1/management-nodes", None, data
    raise ZStackError(ErrorCode.NO_HANDLER, f"{t.__name__} has no HTTP route")


def _query_string(params: dict[str, Any]) -> dict[str, Any]:
    """Query parameters as the gateway reads them: booleans spelled ``true``/``false``."""
    return {k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in params.items()}


class HttpTransport(ApiTransport):
    """REST over several node URLs: a connection failure, a retryable 5xx or an attempt that takes
    longer than ``attempt_timeout`` (a frozen node) moves to the next URL, within ``timeout``.

    Retries reuse one Idempotency-Key, so a retry on another node is applied once. The first call
    logs in (ZStack's ``LogInByAccount``; the password travels as its SHA-512 digest) and every
    call carries the session as ``Authorization: OAuth <session>``; a session that expired is
    renewed by one new login."""

    def __init__(
        self,
        urls: list[str],
        *,
        account: str = ZSTACK_ADMIN_ACCOUNT,
        password: str = ZSTACK_DEFAULT_PASSWORD,
        attempt_timeout: float = 10.0,
        max_connections: int = 100,
    ) -> None:
        if not urls:
            raise ValueError("at least one node URL is needed")
        self.attempt_timeout = attempt_timeout
        self.urls = [u.rstrip("/") for u in urls]
        self.account = account
        self._digest = password_digest(password)
        self.auth = SessionLogin(self._log_in)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._next = 0
        self._suspect_until: dict[str, float] = {}
        self.last_handled_by: str | None = None

    async def send(self, msg: Message, *, key: str | None, timeout: float) -> dict[str, Any]:
        method, path, body, query = _http_route(msg)
        headers: dict[str, str] = {}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        if method != "GET":
            headers["Idempotency-Key"] = key or str(uuidlib.uuid4())
        deadline = asyncio.get_running_loop().time() + timeout
        return await self.auth.call(
            deadline,
            lambda session: self._answered(
                method, path, data, query, {**headers, "Authorization": f"OAuth {session}"}, deadline
            ),
        )

    async def _answered(
        self,
        method: str,
        path: str,
        data: bytes | None,
        query: dict[str, Any] | None,
        headers: dict[str, str],
        deadline: float,
    ) -> dict[str, Any]:
        """The call's answer: when the node answers with a job (the operation outlived the
        node's wait), the job polled until it answers, within ``deadline``."""
        reply = await self._exchange(method, path, data, query, headers, deadline)
        poll_headers = {"Authorization": headers["Authorization"]}
        delay = JOB_POLL_FIRST_S
        while (job := _job_of(reply)) is not None:
            if asyncio.get_running_loop().time() + delay >= deadline:
                raise ZStackError(ErrorCode.TIMEOUT, f"job {job} was still running at the client's deadline", job=job)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOB_POLL_MAX_S)
            reply = await self._exchange("GET", f"{JOBS_PATH}/{job}", None, None, poll_headers, deadline)
        return reply

    async def login(self, timeout: float = 30.0) -> str:
        return await self.auth.login(timeout)

    async def _log_in(self, deadline: float) -> str:
        from zstack_mn.web.zstack.rest import PREFIX  # late: it builds on this module

        api, login = log_in_by_account(self.account, self._digest)
        headers = {"Content-Type": "application/json"}
        reply = await self._exchange(api.method, PREFIX + api.path, orjson.dumps(login), None, headers, deadline)
        return str(reply["inventory"]["uuid"])

    async def _exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        query: dict[str, Any] | None,
        headers: dict[str, str],
        deadline: float,
    ) -> dict[str, Any]:
        """One call, failing over between the URLs until ``deadline``; the reply body."""
        last: ZStackError | None = None
        delay = 0.05
        attempts = 0
        while asyncio.get_running_loop().time() < deadline and attempts < 4 * len(self.urls):
            url = self._pick()
            attempts += 1
            try:
                left = max(deadline - asyncio.get_running_loop().time(), 0.01)
                async with asyncio.timeout(min(left, self.attempt_timeout)):
                    async with self._http().request(
                        method, url + path, data=data, params=query, headers=headers
                    ) as resp:
                        status, content = resp.status, await resp.read()
                        handled_by = resp.headers.get("X-Handled-By")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = ZStackError(ErrorCode.BUS_UNAVAILABLE, f"{url}: {type(exc).__name__}")
                self._suspect_until[url] = asyncio.get_running_loop().time() + SUSPECT_FOR
                self._next += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.last_handled_by = handled_by
            err, reply = _outcome(status, content)
            if err is None:
                return reply
            if status in RETRYABLE_HTTP and err.retryable:
                last = err
                self._next += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            raise err
        raise last or ZStackError(ErrorCode.TIMEOUT, "no node answered in time")

    def _pick(self) -> str:
        """The next URL in turn that is not suspect (it refused or timed out within SUSPECT_FOR);
        if every URL is suspect, the one whose suspicion ends first."""
        now = asyncio.get_running_loop().time()
        for i in range(len(self.urls)):
            url = self.urls[(self._next + i) % len(self.urls)]
            if self._suspect_until.get(url, 0.0) <= now:
                self._next = (self._next + i) % len(self.urls)
                return url
        return min(self.urls, key=lambda u: self._suspect_until.get(u, 0.0))

    def _http(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use (inside the caller's event loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._max_connections))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _job_of(reply: dict[str, Any]) -> str | None:
    """The uuid of the job a 202 answer names (the operation goes on as that job)."""
    job = reply.get("job")
    if isinstance(job, dict) and job.get("state") == "Processing" and isinstance(job.get("uuid"), str):
        return str(job["uuid"])
    return None


def _outcome(status: int, content: bytes) -> tuple[ZStackError | None, dict[str, Any]]:
    """(None, body) for a success; (the error, {}) for a failure. A 5xx without our JSON body (the
    server was stopping, a proxy answered) counts as a retryable BUS_UNAVAILABLE, so the client
    fails over."""
    try:
        data = orjson.loads(content) if content else {}
    except orjson.JSONDecodeError:
        data = None
    if status < 400 and isinstance(data, dict):
        return None, data
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        try:
            return ZStackError.from_info(ErrorInfo.model_validate(error)), {}
        except ValueError:
            pass
        if isinstance(error.get("code"), str):  # ZStack's own shape (its API's login): details is text
            return ZStackError(ErrorCode.parse(error["code"]), str(error.get("description", "")), status=status), {}
    code = ErrorCode.BUS_UNAVAILABLE if status >= 500 else ErrorCode.INTERNAL_ERROR
    text = content[:200].decode(errors="replace")
    return ZStackError(code, f"HTTP {status}: {text}", status=status), {}


class AmqpApiTransport(ApiTransport):
    """Publishes API messages to ``api.portal`` and waits on a private reply queue."""

    def __init__(self, url: str, queue_prefix: str = "zstack", session: str | None = None) -> None:
        self.session = session
        """A ZStack API session uuid, sent as the envelope's ``session`` header (the portal's
        session check on ``api.portal``)."""
        self.topology = Topology(queue_prefix)
        self.transport = AmqpTransport(url, self.topology, publish_timeout=10, connection_name="zstack-mn client")
        self.reply_queue = self.topology.reply_queue(f"client-{uuidlib.uuid4()}")
        self._pending: dict[str, asyncio.Future[Envelope]] = {}
        self.last_handled_by: str | None = None

    async def start(self) -> None:
        await self.transport.start()
        await self.transport.declare(self.reply_queue, QueueKind.PRIVATE)
        await self.transport.consume(self.reply_queue, self._on_reply, prefetch=256)
        self.transport.on_disconnect = self._fail_all

    def _fail_all(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ZStackError(ErrorCode.BUS_UNAVAILABLE, "broker connection lost; retry"))

    async def _on_reply(self, delivery: Delivery) -> None:
        env = decode(delivery.body, 16 << 20)
        future = self._pending.pop(env.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(env)

    async def send(self, msg: Message, *, key: str | None, timeout: float) -> dict[str, Any]:
        headers = {IDEMPOTENCY_HEADER: key} if key else {}
        if self.session:
            headers[SESSION_HEADER] = self.session
        env = Envelope.request(
            msg, ttl_ms=int(timeout * 1000), reply_to=self.reply_queue, msg_id=new_id(), headers=headers
        )
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[env.id] = fut
        try:
            await self.transport.publish(
                self.topology.api_queue,
                encode(env, 16 << 20),
                message_id=env.id,
                correlation_id=env.id,
                reply_to=self.reply_queue,
                ttl_ms=env.ttl_ms,
            )
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ZStackError(ErrorCode.TIMEOUT, f"no reply to {msg.type_name} within {timeout:g}s") from None
        finally:
            self._pending.pop(env.id, None)
        self.last_handled_by = reply.handled_by
        if reply.ok:
            return reply.body
        assert reply.error is not None
        raise ZStackError.from_info(reply.error)

    async def close(self) -> None:
        await self.transport.close()


class Client:
    """Typed methods over either transport."""

    def __init__(self, transport: ApiTransport, timeout: float = 30.0) -> None:
        self.transport = transport
        self.timeout = timeout

    @classmethod
    def http(
        cls,
        urls: list[str] | str,
        *,
        account: str = ZSTACK_ADMIN_ACCOUNT,
        password: str = ZSTACK_DEFAULT_PASSWORD,
        timeout: float = 30.0,
    ) -> Client:
        """Over the plain ``/v1`` API, logged in as ``account``."""
        transport = HttpTransport([urls] if isinstance(urls, str) else urls, account=account, password=password)
        return cls(transport, timeout)

    @classmethod
    def zstack(
        cls,
        urls: list[str] | str,
        *,
        account: str = ZSTACK_ADMIN_ACCOUNT,
        password: str = ZSTACK_DEFAULT_PASSWORD,
        timeout: float = 30.0,
    ) -> Client:
        """Over ZStack's own REST API (``/zstack/v1``, login and job polling): the default way
        in; ``http`` speaks the plain ``/v1`` API."""
        from zstack_mn.zstack_client import ZStackTransport  # a late import: zstack_client builds on this module

        transport = ZStackTransport([urls] if isinstance(urls, str) else urls, account=account, password=password)
        return cls(transport, timeout)

    @classmethod
    async def amqp(cls, url: str, queue_prefix: str = "zstack", timeout: float = 30.0, *, session: str) -> Client:
        """Over the broker (``api.portal``) with ``session``, e.g. from ``await client.login()``
        on an HTTP client: the broker has no login of its own."""
        t = AmqpApiTransport(url, queue_prefix, session)
        await t.start()
        return cls(t, timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def login(self, timeout: float = 30.0) -> str:
        """Log in now (if not yet) and return the session uuid."""
        return await self.transport.login(timeout)

    @property
    def last_handled_by(self) -> str | None:
        return getattr(self.transport, "last_handled_by", None)

    async def send(self, msg: Message, *, key: str | None = None) -> dict[str, Any]:
        return await self.transport.send(msg, key=key, timeout=self.timeout)

    async def _inventory(self, msg: Message, key: str | None) -> dict[str, Any]:
        inventory: dict[str, Any] = (await self.send(msg, key=key))["inventory"]
        return inventory

    async def add_host(self, name: str, agent_url: str, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIAddHostMsg(name=name, agent_url=agent_url), key)

    async def create_vm(
        self, name: str, *, cpu_num: int, memory_size: int | str, host_uuid: str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        return await self._inventory(
            APICreateVmInstanceMsg(name=name, cpu_num=cpu_num, memory_size=memory_size, host_uuid=host_uuid), key
        )

    async def start_vm(self, uuid: str, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIStartVmInstanceMsg(uuid=uuid), key)

    async def stop_vm(self, uuid: str, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIStopVmInstanceMsg(uuid=uuid), key)

    async def reboot_vm(self, uuid: str, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIRebootVmInstanceMsg(uuid=uuid), key)

    async def destroy_vm(self, uuid: str, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIDestroyVmInstanceMsg(uuid=uuid), key)

    async def migrate_vm(self, uuid: str, host_uuid: str | None = None, *, key: str | None = None) -> dict[str, Any]:
        return await self._inventory(APIMigrateVmMsg(uuid=uuid, host_uuid=host_uuid), key)

    async def query_vms(self, **filters: Any) -> dict[str, Any]:
        return await self.send(APIQueryVmInstanceMsg(**filters))

    async def query_hosts(self, **filters: Any) -> dict[str, Any]:
        return await self.send(APIQueryHostMsg(**filters))

    async def management_nodes(self) -> dict[str, Any]:
        return await self.send(APIQueryManagementNodeMsg())
