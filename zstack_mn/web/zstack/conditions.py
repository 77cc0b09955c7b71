"""ZStack query conditions: parsed from either protocol into one form, checked against the fields
a resource can be queried by, and turned into one SQL clause.

REST sends ``q=<name><op><value>`` (``RestServer.QUERY_OP_MAPPING``: ``!=``, ``>=``, ``<=``,
``!?=`` not in, ``!~=`` not like, ``~=`` like, ``?=`` in, ``=``, ``>``, ``<``, and the suffixes
``is null`` / ``not null``, tried in that order so a longer operator wins); RPC sends
``conditions: [{"name", "op", "value"}]`` with ZStack's ``QueryOp`` names (``=``, ``!=``, ``>``,
``<``, ``>=``, ``<=``, ``in``, ``not in``, ``like``, ``not like``, ``is null``, ``not null``).
``in`` values are comma-separated; ``like`` takes SQL wildcards (``%``, ``_``) and applies to
text fields and uuids (matched in their 32-hex form, as a ZStack client writes them); on a number
or a date it is refused (PostgreSQL has no ``LIKE`` for them).

    spec = QuerySpec.from_rest(params)          # or QuerySpec.from_rpc(message)
    where = spec.where(VM_FIELDS, VM_TABLE)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, not_, true

from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.api import MAX_PAGE
from zstack_mn.web.zstack.wire import internal_uuid


class Op(str, enum.Enum):
    EQ = "="
    NOT_EQ = "!="
    GT = ">"
    LT = "<"
    GE = ">="
    LE = "<="
    IN = "in"
    NOT_IN = "not in"
    LIKE = "like"
    NOT_LIKE = "not like"
    IS_NULL = "is null"
    NOT_NULL = "not null"


REST_OPS: tuple[tuple[str, Op], ...] = (
    ("!=", Op.NOT_EQ),
    (">=", Op.GE),
    ("<=", Op.LE),
    ("!?=", Op.NOT_IN),
    ("!~=", Op.NOT_LIKE),
    ("~=", Op.LIKE),
    ("?=", Op.IN),
    ("=", Op.EQ),
    (">", Op.GT),
    ("<", Op.LT),
    ("is null", Op.IS_NULL),
    ("not null", Op.NOT_NULL),
)
"""In RestServer's order: an operator contained in another comes after it."""


def _bad(field_name: str, why: str) -> ZStackError:
    return ZStackError(ErrorCode.INVALID_ARGUMENT, f"{field_name}: {why}", field=field_name)


@dataclass(frozen=True, slots=True)
class Condition:
    name: str
    op: Op
    value: str | None = None


def _as_int(v: str) -> int:
    return int(v)


def _as_date(v: str) -> datetime:
    return datetime.fromisoformat(v)


def _as_uuid(v: str) -> str:
    return internal_uuid(v, "value")


@dataclass(frozen=True, slots=True)
class Queryable:
    """A field a resource can be queried and sorted by: its column and how a value is read."""

    column: str
    parse: Callable[[str], Any] = str


VM_FIELDS: dict[str, Queryable] = {
    "uuid": Queryable("uuid", _as_uuid),
    "name": Queryable("name"),
    "state": Queryable("state"),
    "hostUuid": Queryable("host_uuid", _as_uuid),
    "lastHostUuid": Queryable("last_host_uuid", _as_uuid),
    "cpuNum": Queryable("cpu_num", _as_int),
    "memorySize": Queryable("memory_size", _as_int),
    "createDate": Queryable("created_at", _as_date),
    "lastOpDate": Queryable("updated_at", _as_date),
}
HOST_FIELDS: dict[str, Queryable] = {
    "uuid": Queryable("uuid", _as_uuid),
    "name": Queryable("name"),
    "state": Queryable("state"),
    "status": Queryable("status"),
    "totalCpuCapacity": Queryable("cpu_total", _as_int),
    "availableCpuCapacity": Queryable("cpu_available", _as_int),
    "totalMemoryCapacity": Queryable("memory_total", _as_int),
    "availableMemoryCapacity": Queryable("memory_available", _as_int),
    "createDate": Queryable("created_at", _as_date),
    "lastOpDate": Queryable("updated_at", _as_date),
}
MANAGEMENT_NODE_FIELDS: dict[str, Queryable] = {
    "uuid": Queryable("uuid", _as_uuid),
    "hostName": Queryable("host_name"),
    "state": Queryable("state"),
    "joinDate": Queryable("join_date", _as_date),
    "heartBeat": Queryable("heartbeat", _as_date),
}


def parse_rest_condition(text: str) -> Condition:
    """One REST ``q`` value, as RestServer reads it: the first operator found splits it."""
    for token, op in REST_OPS:
        if token not in text:
            continue
        if op in (Op.IS_NULL, Op.NOT_NULL):
            return Condition(text.split(token, 1)[0].strip(), op)
        name, _, value = text.partition(token)
        return Condition(name.strip(), op, value)
    raise _bad("q", f"{text!r} has no query operator; valid: {', '.join(t for t, _ in REST_OPS)}")


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(name, "must be true or false")


def _int(value: object, name: str, low: int, high: int) -> int:
    try:
        n = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
    except ValueError:
        n = None
    if n is None or not low <= n <= high:
        raise _bad(name, f"must be an integer from {low} to {high}")
    return n


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """A ZStack query: conditions, paging, sort, projection."""

    conditions: tuple[Condition, ...] = ()
    limit: int = MAX_PAGE
    start: int = 0
    count: bool = False
    reply_with_count: bool = False
    sort_by: str | None = None
    sort_desc: bool = False
    fields: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_rest(cls, params: Sequence[tuple[str, str]]) -> QuerySpec:
        """From a REST query string (``q`` repeated; ``sort=+name`` / ``-name``). Of any other
        parameter given twice the first counts, as in RestServer (the Java SDK before zstackio/zstack
        commit 0527309d3b sends ``start`` as a second ``limit``)."""
        conditions: list[Condition] = []
        values: dict[str, Any] = {}
        for key, value in params:
            if key == "q":
                conditions.append(parse_rest_condition(value))
            elif key in values or (key == "sort" and "sortBy" in values):
                continue
            elif key == "sort":
                desc = value.startswith("-")
                values["sortBy"] = value.lstrip("+-").strip()
                values["sortDirection"] = "desc" if desc else "asc"
            elif key == "fields":
                values["fields"] = [f.strip() for f in value.split(",") if f.strip()]
            elif key in ("limit", "start", "count", "replyWithCount", "groupBy"):
                values[key] = value
            else:
                raise _bad(key, "not a query parameter; use q, limit, start, count, replyWithCount, sort, fields")
        return cls._of(conditions, values)

    @classmethod
    def from_rpc(cls, msg: Mapping[str, Any]) -> QuerySpec:
        """From an RPC ``APIQuery...Msg`` body (session and the like already taken out)."""
        raw = msg.get("conditions") or []
        if not isinstance(raw, list):
            raise _bad("conditions", "must be a list of {name, op, value}")
        conditions = []
        for i, c in enumerate(raw):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("op"), str):
                raise _bad(f"conditions.{i}", "must be {name, op, value}")
            try:
                op = Op(c["op"].strip().lower())
            except ValueError:
                raise _bad(
                    f"conditions.{i}.op", f"{c['op']!r} is not one of {', '.join(o.value for o in Op)}"
                ) from None
            value = c.get("value")
            conditions.append(Condition(c["name"], op, None if value is None else str(value)))
        known = {
            "conditions",
            "limit",
            "start",
            "count",
            "replyWithCount",
            "sortBy",
            "sortDirection",
            "fields",
            "groupBy",
        }
        given = {k: v for k, v in msg.items() if v is not None}  # null: not given (ZStack's bindings send them)
        for key in given:
            if key not in known:
                raise _bad(key, "not a query parameter")
        return cls._of(conditions, given)

    @classmethod
    def _of(cls, conditions: list[Condition], v: Mapping[str, Any]) -> QuerySpec:
        if v.get("groupBy") not in (None, ""):
            raise _bad("groupBy", "zstack-mn does not group query results")
        direction = v.get("sortDirection") or "asc"
        if direction not in ("asc", "desc"):
            raise _bad("sortDirection", "must be asc or desc")
        fields = v.get("fields") or []
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise _bad("fields", "must be a list of field names")
        return cls(
            conditions=tuple(conditions),
            limit=_int(v.get("limit", MAX_PAGE), "limit", 0, MAX_PAGE),
            start=_int(v.get("start", 0), "start", 0, 1 << 31),
            count=_flag(v.get("count", False), "count"),
            reply_with_count=_flag(v.get("replyWithCount", False), "replyWithCount"),
            sort_by=v.get("sortBy") or None,
            sort_desc=direction == "desc",
            fields=tuple(fields),
        )

    def with_uuid(self, uuid: str) -> QuerySpec:
        """``GET /<resources>/{uuid}``: the resource itself (RestServer adds ``uuid=`` alone)."""
        return QuerySpec(conditions=(Condition("uuid", Op.EQ, uuid),), fields=self.fields)

    def where(self, queryable: Mapping[str, Queryable], table: Table) -> ColumnElement[bool]:
        """All conditions as one SQL clause; INVALID_ARGUMENT naming a field that cannot be
        queried or a value that does not fit it."""
        return and_(true(), *(_clause(c, queryable, table) for c in self.conditions))

    def order(self, queryable: Mapping[str, Queryable], table: Table) -> list[Any]:
        if self.sort_by is None:
            return [table.c.created_at, table.c.uuid] if "created_at" in table.c else [table.c.uuid]
        q = queryable.get(self.sort_by)
        if q is None:
            raise _bad("sortBy", f"cannot sort by {self.sort_by!r}; can sort by {', '.join(queryable)}")
        column = table.c[q.column]
        return [column.desc() if self.sort_desc else column.asc(), table.c.uuid]

    def project(self, inventory: dict[str, Any]) -> dict[str, Any]:
        """Only the ``fields`` asked for (all when none were)."""
        return {k: v for k, v in inventory.items() if k in self.fields} if self.fields else inventory

    def reply(self, total: int, page: list[dict[str, Any]]) -> dict[str, Any]:
        """ZStack's ``APIQueryReply``: ``{"total"}`` alone for ``count``; else the page's
        inventories (projected), with ``total`` when ``replyWithCount`` asked for it."""
        if self.count:
            return {"total": total}
        body: dict[str, Any] = {"inventories": [self.project(i) for i in page]}
        if self.reply_with_count:
            body["total"] = total
        return body


def _clause(c: Condition, queryable: Mapping[str, Queryable], table: Table) -> ColumnElement[bool]:
    q = queryable.get(c.name)
    if q is None:
        raise _bad(c.name, f"cannot be queried; queryable fields: {', '.join(queryable)}")
    column = table.c[q.column]
    if c.op is Op.IS_NULL:
        return column.is_(None)
    if c.op is Op.NOT_NULL:
        return column.is_not(None)
    if c.value is None:
        raise _bad(c.name, f"the {c.op.value} condition needs a value")
    if c.op in (Op.LIKE, Op.NOT_LIKE):
        if q.parse is _as_uuid:
            like = func.replace(column, "-", "").like(c.value.lower())  # stored dashed, matched as 32 hex
        elif q.parse is str:
            like = column.like(c.value)
        else:
            raise _bad(c.name, f"{c.op.value} applies to text fields and uuids, not to {c.name}")
        return not_(like) if c.op is Op.NOT_LIKE else like
    try:
        if c.op in (Op.IN, Op.NOT_IN):
            values = [q.parse(v) for v in c.value.split(",")]
            return column.not_in(values) if c.op is Op.NOT_IN else column.in_(values)
        value = q.parse(c.value)
    except (ValueError, ZStackError):
        raise _bad(c.name, f"{c.value!r} is not a valid value for {c.name}") from None
    ops: dict[Op, Callable[[Any, Any], ColumnElement[bool]]] = {
        Op.EQ: lambda a, b: a == b,
        Op.NOT_EQ: lambda a, b: a != b,
        Op.GT: lambda a, b: a > b,
        Op.LT: lambda a, b: a < b,
        Op.GE: lambda a, b: a >= b,
        Op.LE: lambda a, b: a <= b,
    }
    return ops[c.op](column, value)
