"""The ZStack API in ``/openapi.json``, generated from what the adapters read: the catalog (paths,
methods, body keys, fields and their rules), the target messages' models (a copied field's type),
the session guard's login fields and the wire module's uuid pattern and error body.

REST (``/zstack/v1``): each (method, path) the REST adapter routes, with its path parameter, its
body (``{"params": {...}}`` or one of ``{"<action>": {...}}``) or query string, its answers (202
with ``location`` for an action, 200 for a query or a session API, ZStack's error body for the
rest) and the ``OAuth`` session scheme where a session is needed; the job poll. RPC
(``/zstack/api``): the message envelope and the result poll. No session is needed for the RPC
endpoint at the HTTP level: the session travels inside the message, and an API error comes back
as a ``Done`` answer with ``success: false``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from zstack_mn.messages.errors import ErrorReply
from zstack_mn.web.openapi import SESSION_SECURITY_SCHEME, TEXT_PLAIN, status_description
from zstack_mn.web.openapi import ZSTACK_SESSION_SCHEME as SESSION_SCHEME
from zstack_mn.web.zstack.catalog import (
    APIS,
    COMMON_FIELDS,
    MANAGEMENT_IP,
    Ignore,
    Kind,
    Refuse,
    Rule,
    To,
    ZApi,
    agent_url_of,
    uuid_field,
)
from zstack_mn.web.zstack.rest import BODY_EXTRAS, JOB_HEADER, JOBS_PATH, PREFIX, normalise
from zstack_mn.web.zstack.rpc import API_PATH, RESULT_PATH
from zstack_mn.web.zstack.sessions import LOGIN_FIELDS
from zstack_mn.web.zstack.wire import UUID_PATTERN, ZStackErrorReply

JSON = "application/json"
TAG = "zstack"
RPC_TAG = "zstack-rpc"
JOB_PATTERN = r"^[0-9a-f]{32}$"
"""A job uuid as ``job_uuid_of`` takes it (``X-Job-UUID``, the polls)."""
QUERY_PARAMS: dict[str, dict[str, Any]] = {
    "q": {"type": "array", "items": {"type": "string"}},
    "limit": {"type": "integer", "minimum": 0},
    "start": {"type": "integer", "minimum": 0},
    "count": {"type": "boolean"},
    "replyWithCount": {"type": "boolean"},
    "sort": {"type": "string"},
    "fields": {"type": "string"},
    "groupBy": {"type": "string"},
}
"""The query string ``QuerySpec.from_rest`` reads."""

_ERR = "#/components/schemas/ZStackErrorReply"
_GATE_ERR = "#/components/schemas/ErrorReply"


def _ref(ref: str) -> dict[str, Any]:
    return {"$ref": ref}


def _error(status: int) -> dict[str, Any]:
    """An error answer: ZStack's error body; a body over the limit (413) and a node at its limit
    of requests in flight (503) are answered before the adapters, with the node's own error body
    (or plain text)."""
    description = status_description(status) or "error"
    if status == 413:
        return {"description": description, "content": {JSON: {"schema": _ref(_GATE_ERR)}}}
    if status == 503:
        return {
            "description": description + "; or the node's own error body or plain text when it is at its limit",
            "content": {
                JSON: {"schema": {"anyOf": [_ref(_ERR), _ref(_GATE_ERR)]}},
                TEXT_PLAIN: {"schema": {"type": "string"}},
            },
        }
    return {"description": description, "content": {JSON: {"schema": _ref(_ERR)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _error(s) for s in statuses}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A field sent as null is a field not given (``ZApi.build``)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _rule_schema(rule: Rule, target_props: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    if isinstance(rule, Ignore):
        return {"description": f"accepted and not used: {rule.why}"}
    if isinstance(rule, Refuse):
        return {"enum": list(rule.harmless), "description": f"only these values: {rule.reason}"}
    if rule.convert is uuid_field:
        schema = {"type": "string", "pattern": UUID_PATTERN}
    elif rule.convert is agent_url_of:
        schema = {"type": "string", "pattern": MANAGEMENT_IP.pattern}
    else:
        schema = dict(target_props.get(rule.name, {}))
    return schema if required else _nullable(schema)


def _target_schema(api: ZApi, defs: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The target message's properties and required fields (its ``$defs`` into ``defs``)."""
    if api.target is None:
        return {}, set()
    schema = api.target.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema.get("properties", {}), set(schema.get("required", ()))


def _params_schema(api: ZApi, defs: dict[str, Any]) -> dict[str, Any]:
    """An API's parameters (the body's inner object): its fields and the common ones."""
    if api.kind is Kind.SESSION:
        return {"type": "object", "properties": LOGIN_FIELDS, "required": ["accountName", "password"]}
    props, required = _target_schema(api, defs)
    path_vars = set(api.path_vars())
    rules = {k: r for k, r in {**COMMON_FIELDS, **api.fields}.items() if k not in path_vars}
    keys_of: dict[str, list[str]] = defaultdict(list)
    for key, rule in rules.items():
        if isinstance(rule, To) and rule.name in required and rule.name not in api.defaults:
            keys_of[rule.name].append(key)
    out: dict[str, Any] = {}
    needed: list[str] = []
    for key, rule in rules.items():
        needs = isinstance(rule, To) and keys_of.get(rule.name) == [key]
        out[key] = _rule_schema(rule, props, required=needs)
        if needs:
            needed.append(key)
    schema: dict[str, Any] = {"type": "object", "properties": out, "required": needed}
    either = [keys for keys in keys_of.values() if len(keys) > 1]
    if either:  # one of several names for one field (AddKVMHost: managementIp or agentUrl), not two
        schema["allOf"] = [
            {"oneOf": [{"required": [k], "properties": {k: {"not": {"type": "null"}}}} for k in keys]}
            for keys in either
        ]
    return schema


def _body_schema(api: ZApi, defs: dict[str, Any]) -> dict[str, Any]:
    assert api.body_key is not None
    extras = {key: _rule_schema(COMMON_FIELDS[key], {}) for key in BODY_EXTRAS}
    return {
        "type": "object",
        "properties": {api.body_key: _params_schema(api, defs), **extras},
        "required": [api.body_key],
        "additionalProperties": False,
    }


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _rest_operation(apis: list[ZApi], has_id: bool, path_var: str, defs: dict[str, Any]) -> dict[str, Any]:
    first = apis[0]
    names = ", ".join(a.name for a in apis)
    op: dict[str, Any] = {
        "tags": [TAG],
        "summary": f"ZStack {names}",
        "operationId": "zstack_" + "_".join(a.name for a in apis) + ("_by_uuid" if has_id else ""),
        "parameters": [],
    }
    if has_id:
        session_var = first.kind is Kind.SESSION
        schema = {"type": "string"} if session_var else {"type": "string", "pattern": UUID_PATTERN}
        op["parameters"].append(_path_param(path_var, schema))
    if first.kind is Kind.QUERY:
        op["parameters"] += [_query_param(k, v) for k, v in QUERY_PARAMS.items()]
    elif first.body_key is None and first.kind is Kind.ACTION:
        op["parameters"] += [
            _query_param(k, {"type": "string"}) for k in first.fields if k not in set(first.path_vars())
        ]
    if first.body_key is not None:
        bodies = [_body_schema(a, defs) for a in apis]
        body: dict[str, Any] = bodies[0] if len(bodies) == 1 else {"oneOf": bodies}
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if first.kind is Kind.ACTION:
        op["parameters"].append(
            {
                "name": JOB_HEADER,
                "in": "header",
                "required": False,
                "description": "the job's uuid, chosen by the client",
                "schema": {"type": "string", "pattern": JOB_PATTERN},
            }
        )
        location = {
            "type": "object",
            "properties": {"location": {"type": "string", "format": "uri"}},
            "required": ["location"],
        }
        op["responses"] = {
            "202": _ok(f"started: poll the job at its location ({PREFIX}{JOBS_PATH}/{{uuid}})", location),
            **_errors(400, 401, 409, 413, 503),
        }
    elif first.kind is Kind.QUERY:
        page = {
            "type": "object",
            "properties": {"inventories": {"type": "array", "items": {"type": "object"}}, "total": {"type": "integer"}},
            "description": "inventories is left out when only the count was asked for (count=true)",
        }
        op["responses"] = {"200": _ok("the inventories found", page), **_errors(400, 401, 413, 503)}
    elif first.name == "LogInByAccount":
        session = {"type": "object", "properties": {"inventory": {"type": "object"}}, "required": ["inventory"]}
        op["responses"] = {"200": _ok("the new session", session), **_errors(400, 401, 413, 503)}
    elif first.name == "ValidateSession":
        valid = {"type": "object", "properties": {"valid": {"type": "boolean"}}, "required": ["valid"]}
        op["responses"] = {"200": _ok("whether the session is live", valid), **_errors(400, 413, 503)}
    else:
        op["responses"] = {
            "200": _ok("logged out (or the session was gone)", {"type": "object"}),
            **_errors(400, 413, 503),
        }
    if first.kind is not Kind.SESSION:
        op["security"] = [{SESSION_SCHEME: []}]
    return op


def _rest_paths(defs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[tuple[str, str], list[ZApi]] = defaultdict(list)
    for api in APIS:
        groups[(api.method, normalise(api.path))].append(api)
        if api.kind is Kind.QUERY:
            groups[("GET", api.path + "/{id}")].append(api)
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for (method, path), apis in groups.items():
        has_id = "{id}" in path
        path_var = (apis[0].path_vars() or ["uuid"])[0] if has_id else ""
        doc_path = PREFIX + path.replace("{id}", "{" + path_var + "}")
        paths[doc_path][method.lower()] = _rest_operation(apis, has_id, path_var, defs)
    paths[f"{PREFIX}{JOBS_PATH}/{{uuid}}"]["get"] = {
        "tags": [TAG],
        "summary": "ZStack job poll",
        "operationId": "zstack_poll_job",
        "parameters": [_path_param("uuid", {"type": "string"})],
        "responses": {
            "200": _ok("the job succeeded: the API's reply", {"type": "object"}),
            "202": {"description": "the job is still running (empty body)"},
            "404": _error(404),
            "503": {
                **_error(503),
                "description": "the job failed (ZStack's error body); " + _error(503)["description"],
            },
        },
    }
    return dict(paths)


REST_API_RESPONSE: dict[str, Any] = {
    "type": "object",
    "description": 'ZStack\'s RestAPIResponse; result is a JSON string {"<reply class>": {..., "success": ...}}',
    "properties": {
        "uuid": {"type": "string"},
        "state": {"enum": ["Done", "Processing"]},
        "result": {"type": "string"},
        "createdDate": {"type": ["string", "null"]},
        "finishedDate": {"type": ["string", "null"]},
    },
    "required": ["uuid", "state"],
}


def _rpc_paths() -> dict[str, dict[str, Any]]:
    classes = ", ".join(sorted(a.message_class for a in APIS))
    envelope = {
        "type": "object",
        "description": f'{{"<message class>": {{...}}}}; the classes served: {classes} (any other is answered '
        "Done with success false)",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": {"type": "object"},
    }
    call = {
        "tags": [RPC_TAG],
        "summary": "ZStack RPC call",
        "requestBody": {"required": True, "content": {JSON: {"schema": envelope}}},
        "responses": {
            "200": _ok("Done (a reply, or an API error as success false) or Processing (a job)", REST_API_RESPONSE),
            **_errors(400, 413, 503),
        },
    }
    result = {
        "tags": [RPC_TAG],
        "summary": "ZStack RPC result",
        "operationId": "zstack_rpc_result",
        "parameters": [_path_param("uuid", {"type": "string"})],
        "responses": {"200": _ok("Done or Processing", REST_API_RESPONSE), **_errors(404, 503)},
    }
    return {
        API_PATH: {"post": {**call, "operationId": "zstack_rpc_call"}},
        API_PATH + "/": {"post": {**call, "operationId": "zstack_rpc_call_slash"}},
        RESULT_PATH + "/{uuid}": {"get": result},
    }


def _schema_of(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema


def add_to(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (the node's OpenAPI document) with the ZStack API in it."""
    defs: dict[str, Any] = {}
    paths = {**_rest_paths(defs), **_rpc_paths()}
    doc.setdefault("paths", {}).update(paths)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ZStackErrorReply"] = _schema_of(ZStackErrorReply, defs)
    schemas.setdefault("ErrorReply", _schema_of(ErrorReply, defs))
    for name, schema in defs.items():
        schemas.setdefault(name, schema)
    components.setdefault("securitySchemes", {})[SESSION_SCHEME] = SESSION_SECURITY_SCHEME
    tags = doc.setdefault("tags", [])
    tags.append({"name": TAG, "description": f"ZStack's REST API ({PREFIX})"})
    tags.append({"name": RPC_TAG, "description": f"ZStack's RPC endpoint ({API_PATH})"})
    return doc
