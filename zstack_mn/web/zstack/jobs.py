"""Asynchronous ZStack API calls as jobs any node can answer.

A job's uuid (32 hex, chosen by the client through ``X-Job-UUID`` or the RPC message's ``id``,
else new) is also the request id the portal runs the call under (its dashed form), so the call is
idempotent the way every keyed portal request is: a VM operation answers a copy from its op
record, any other action from the portal's stored reply.

The node that accepts the call records the job (database), answers at once, and runs the call in
the background; when it ends, the outcome (ZStack's reply body, or its error) is written to the
job. A run is one portal call of up to ``call_timeout``; while it ends with a retryable error
(its deadline passed while the work went on, a node gone) the job runs again, renewing its
lease (the run's deadline plus a grace) before each run, until ``job_timeout``. A VM operation's
first run waits ``FIRST_RUN_S`` for its answer and each next one twice as long, up to
``call_timeout`` (the request itself carries the call deadline, whatever the wait): a request or
reply lost on the way (a broker member killed under it) costs a few seconds, as it does a
client's keyed retry, not a whole call deadline. A copy of a host operation sent while the
first is still under way would run it again (the portal stores a host operation's reply only
when it ends), so each run of other calls waits ``call_timeout``. A poll on any
node reads the job. When the job is still ``Processing`` but the node running it has left the
ring, or its lease has passed, the polling node claims it (one claimer wins) and runs it again
under the same request id, which finishes it from the records when the work was done and does
it otherwise. After ``MAX_ATTEMPTS`` claims the job ends with a timeout error, so no poll
answers ``Processing`` for ever.

The plain ``/v1`` API's operations become jobs the same way when they outlive their caller's
wait (``adopt``): their ``api`` is ``v1:<message type>`` and their outcome the HTTP status and
body the call would have answered. Each API's polls see only their own kind of job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib
from collections.abc import Awaitable
from typing import Any

import orjson
import structlog

from zstack_mn.db.jobs import JobRepository, JobRow
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.messages.base import registry
from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web.zstack import inventories
from zstack_mn.web.zstack.catalog import BY_NAME, ZApi
from zstack_mn.web.zstack.wire import error_body, internal_error

log = structlog.get_logger(__name__)

LEASE_GRACE_S = 10.0
FIRST_RUN_S = 4.0
"""How long a VM operation's first run waits for its answer before it sends the request again
(then twice as long each time, up to ``call_timeout``); a copy of a request still under way
waits for it in the VM's chain and is answered from its record, so it is never done twice."""
MAX_ATTEMPTS = 3
JOB_RETENTION_S = 24 * 3600
SWEEP_EVERY_S = 600.0
RECORD_RETRY_S = 30.0
V1_JOB = "v1:"
"""The ``api`` of a plain-API job starts with this; a ZStack job's is ZStack's API name."""


def request_id_of(job_uuid: str) -> str:
    """The portal request id of a job: its uuid in the dashed form the portal's ids use."""
    return str(uuidlib.UUID(job_uuid))


class JobRunner:
    def __init__(self, portal: ApiPortal) -> None:
        self.portal = portal
        self.jobs = JobRepository(portal.ctx.db)
        self.node = portal.ctx.node_uuid
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_sweep = 0.0

    async def submit(self, api: ZApi, msg: Message, job_uuid: str, timeout: float) -> None:
        """Record the job and start it. A job uuid already recorded for the same request (a
        client resending it) is left to the run that has it; one recorded for another request is
        refused (ZStack's "Duplicate job uuid"), so that a client never gets another call's
        outcome for its own."""
        await self._start(api.name, msg, job_uuid, timeout)

    async def adopt(self, msg: Message, job_uuid: str, timeout: float) -> None:
        """A plain-API operation that outlived its caller's wait (or that the caller asked to
        run asynchronously) becomes a job of this node: recorded (any node answers its polls,
        and one takes it over if this one goes) and run under its own request id, which the VM
        service answers from the work already under way or its record."""
        await self._start(V1_JOB + msg.type_name, msg, job_uuid, timeout)

    async def _start(self, name: str, msg: Message, job_uuid: str, timeout: float) -> None:
        await self._sweep()
        stored = {"type": msg.type_name, "body": msg.to_wire()}
        if await self.jobs.create(job_uuid, name, stored, self.node, self._first_run_s(msg.type_name) + LEASE_GRACE_S):
            self._spawn(name, msg, job_uuid, timeout)
            return
        existing = await self.jobs.get(job_uuid)
        if existing is not None and (existing.api != name or existing.message != orjson.loads(orjson.dumps(stored))):
            raise ZStackError(
                ErrorCode.DUPLICATE_RESOURCE,
                f"duplicate job uuid {job_uuid}: it was given to another request ({existing.api})",
                job=job_uuid,
            )

    async def poll(self, job_uuid: str, *, plain: bool = False) -> JobRow | None:
        """The job as recorded (None when there is none of this kind: ``plain`` for the /v1
        API's, else ZStack's); a stalled one is claimed and started again here (not awaited)."""
        job = await self.jobs.get(job_uuid)
        if job is None or job.api.startswith(V1_JOB) != plain:
            return None
        if job.done:
            return job
        if self.portal.ctx.is_working(job.node) and not job.lease_expired:
            return job
        timeout = self.portal.ctx.settings.job_timeout
        if job.attempts >= MAX_ATTEMPTS:
            err = ZStackError(ErrorCode.TIMEOUT, f"{job.api} did not finish after {job.attempts} attempts")
            await self.jobs.finish(job_uuid, False, _failure(job.api, err))
            return await self.jobs.get(job_uuid)
        if await self.jobs.claim(job, self.node, self._first_run_s(job.message["type"]) + LEASE_GRACE_S):
            log.info("taking over an API job", job=job_uuid, api=job.api, was=job.node, attempt=job.attempts + 1)
            cls = registry.get(job.message["type"])
            assert issubclass(cls, Message)
            self._spawn(job.api, cls.model_validate(job.message["body"]), job_uuid, timeout)
        return job

    def _spawn(self, name: str, msg: Message, job_uuid: str, timeout: float) -> None:
        task = asyncio.get_running_loop().create_task(self._run(name, msg, job_uuid, timeout), name=f"job-{job_uuid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, name: str, msg: Message, job_uuid: str, timeout: float) -> None:
        """Run the job to an outcome. A retryable error (no route, a node gone, a timeout) is
        tried again under the same request id until the job's deadline, as the HTTP client
        does; one met while this node is out of the ring is not recorded, so the job is taken
        over by a poller on a node that is in it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        call_timeout = self.portal.ctx.settings.call_timeout
        attempt_s = self._first_run_s(msg.type_name)
        delay = 0.1
        first = True
        while True:
            if not first:
                attempt_s = min(attempt_s * 2, call_timeout)
                if not await self._renewed(job_uuid, attempt_s):
                    log.info("an API job is another node's now", job=job_uuid)
                    return
            first = False
            left = max(deadline - loop.time(), 0.1)
            call = self.portal.handle(
                msg, request_id=request_id_of(job_uuid), keyed=True, timeout=min(call_timeout, left)
            )
            success, result, err = await _outcome(name, _waited(call, min(attempt_s, left)))
            if err is None or not err.retryable:
                break
            if self.node not in self.portal.ctx.ring.nodes:
                log.info("leaving an API job to another node", job=job_uuid, error=err.code.value)
                with contextlib.suppress(ZStackError):  # else the lease runs out, later
                    await self.jobs.release(job_uuid, self.node)
                return
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        await self._record(job_uuid, success, result)

    def _first_run_s(self, type_name: str) -> float:
        """How long the first run of a job of message type ``type_name`` waits for its answer, and
        the lease it holds (plus LEASE_GRACE_S): FIRST_RUN_S for an operation whose service
        answers a copy from the work under way or its record, else the call deadline. A job runs
        again while what it gets is retryable, renewing its lease for that run before it, so a
        job whose node stopped running it is taken over within one lease. (The request itself
        always carries the call deadline: a run that stops waiting leaves it to go on.)"""
        call_timeout = self.portal.ctx.settings.call_timeout
        try:
            target = getattr(registry.get(type_name), "TARGET", None)
        except ZStackError:  # a type this node does not know: the claim's run ends the job with it
            return call_timeout
        return min(FIRST_RUN_S, call_timeout) if target is not None and target.RECORDS_OUTCOME else call_timeout

    async def _renewed(self, job_uuid: str, attempt_s: float) -> bool:
        try:
            return await self.jobs.renew(job_uuid, self.node, attempt_s + LEASE_GRACE_S)
        except ZStackError:
            return True  # the database is out: run on; if the lease ends meanwhile, the taker's run is answered from the records

    async def _record(self, job_uuid: str, success: bool, result: dict[str, Any]) -> None:
        """Write the outcome, retrying a database outage for RECORD_RETRY_S; if it still fails,
        the lease runs out and a poller finishes the job from the records."""
        deadline = time.monotonic() + RECORD_RETRY_S
        delay = 0.1
        while True:
            try:
                await self.jobs.finish(job_uuid, success, result)
                return
            except ZStackError as err:
                if not err.retryable or time.monotonic() + delay > deadline:
                    log.warning("could not record an API job's outcome", job=job_uuid, error=str(err))
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        removed = await self.jobs.expire(JOB_RETENTION_S)
        if removed:
            log.info("expired API jobs", removed=removed)


async def _waited(call: Awaitable[tuple[dict[str, Any], str]], wait_s: float) -> tuple[dict[str, Any], str]:
    """``call``'s answer if it comes within ``wait_s``, else the retryable TIMEOUT a run ends
    with (the request goes on with its own deadline; a copy sent next is answered from it)."""
    try:
        async with asyncio.timeout(wait_s):
            return await call
    except TimeoutError:
        raise ZStackError(ErrorCode.TIMEOUT, f"no answer within {wait_s:g}s; sending the request again") from None


async def _outcome(
    name: str, call: Awaitable[tuple[dict[str, Any], str]]
) -> tuple[bool, dict[str, Any], ZStackError | None]:
    """One run of a job's call through the portal: (success, the job's result, the error). A
    ZStack job's result is ZStack's reply body (or ``{"error": ...}``); a plain-API job's is
    the status, body and handling node the /v1 call would have answered with."""
    try:
        body, handled_by = await call
    except ZStackError as err:
        return False, _failure(name, err), err
    except Exception as exc:  # a job must end with an outcome whatever went wrong
        log.exception("API job failed", api=name)
        internal = internal_error(exc)
        return False, _failure(name, internal), internal
    if name.startswith(V1_JOB):
        return True, {"status": 200, "body": body, "handledBy": handled_by}, None
    return True, inventories.reply_body(BY_NAME[name].inventory, body), None


def _failure(name: str, err: ZStackError) -> dict[str, Any]:
    if name.startswith(V1_JOB):
        return {"status": err.code.http_status, "body": {"error": err.to_info().model_dump()}}
    return {"error": error_body(err)}
